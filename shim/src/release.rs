//! Releasing the clients of a migration's frozen source once the destination runs the container.
//!
//! Between the destination's restore and its commit (the background fill of the memory, seconds
//! for a large container) the source stays frozen so that it can still resume if the operator
//! must decide an in-doubt migration. Its sockets do not know that: the kernel goes on accepting
//! connections into the frozen listeners' queues and acknowledging requests nobody will answer,
//! so a client that waits on its connection (most do) waits until the commit removes the source.
//! At the switchover this module
//!
//! - refuses new connections to the container's listening ports in the container's network
//!   namespace (an iptables `REJECT --reject-with tcp-reset` rule tagged with the container's
//!   id), and
//! - resets the container's established connections on those ports (the kernel's SOCK_DESTROY,
//!   through `ss -K`): their clients get a reset at once and reconnect, to the destination.
//!
//! The processes stay frozen and keep their listening sockets, so a source an operator resumes
//! serves again once [`unrelease`] has removed the rule. The rule names the container, so a
//! restarted shim finds and removes it too.
//!
//! iptables and ss are run rather than netlink spoken here: both are already what the host's
//! operators use to look at the same state (`iptables -S`, `ss -t`), and they are installed
//! with the runtime's other tools (scripts/setup.sh).

use std::collections::HashSet;
use std::fs;
use std::io;

use restore_engine::source::ClientsReleased;

/// iptables' multiport match takes at most 15 ports per rule.
const PORTS_PER_RULE: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot read the container's sockets ({what}): {source}")]
    Sockets {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed: {detail} (install iptables and iproute2: scripts/setup.sh does)")]
    Tool { tool: String, detail: String },
}

/// One line of /proc/PID/net/tcp or tcp6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    /// The kernel's TCP state (1 established, 10 listen, ...).
    pub state: u8,
    pub inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;

/// Parses the kernel's TCP socket table (/proc/net/tcp format); lines it cannot read are
/// skipped.
pub fn parse_tcp_table(text: &str) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, port) = fields.get(1)?.rsplit_once(':')?;
            Some(TcpSocket {
                local_port: u16::from_str_radix(port, 16).ok()?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The socket inodes the processes hold open.
fn socket_inodes(pids: &[u32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for pid in pids {
        // A process that exited since the listing holds nothing.
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

/// The container's listening ports by address family (IPv4 table, IPv6 table), as seen in
/// the network namespace of `pid`.
fn listening_ports(pid: u32, pids: &[u32]) -> Result<(Vec<u16>, Vec<u16>), ReleaseError> {
    let inodes = socket_inodes(pids);
    let ports = |table: &str| -> Result<Vec<u16>, ReleaseError> {
        let path = format!("/proc/{pid}/net/{table}");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // No IPv6 on this host.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table == "tcp6" => String::new(),
            Err(source) => return Err(ReleaseError::Sockets { what: path, source }),
        };
        let mut ports: Vec<u16> = parse_tcp_table(&text)
            .into_iter()
            .filter(|s| s.state == TCP_LISTEN && inodes.contains(&s.inode))
            .map(|s| s.local_port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    };
    Ok((ports("tcp")?, ports("tcp6")?))
}

/// The iptables comment that names the rules of container `id`.
fn tag(id: &str) -> String {
    format!("pclive-release:{id}")
}

/// Runs `program args` in the network namespace of `pid`; its stdout.
fn in_netns(pid: u32, program: &str, args: &[String]) -> Result<String, ReleaseError> {
    crate::tools::run_tool(program, args, Some(pid)).map_err(|detail| ReleaseError::Tool {
        tool: program.to_string(),
        detail,
    })
}

/// The rule that refuses connections to `ports` (one multiport rule).
fn reject_rule(ports: &[u16], tag: &str) -> Vec<String> {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    [
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--dports",
        &ports,
        "-m",
        "comment",
        "--comment",
        tag,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Releases the clients of container `id` (frozen; `init_pid` its init, `pids` its processes):
/// refuses new connections to its listening ports and resets its connections on them.
pub fn release(id: &str, init_pid: u32, pids: &[u32]) -> Result<ClientsReleased, ReleaseError> {
    let (v4, v6) = listening_ports(init_pid, pids)?;
    let mut all: Vec<u16> = v4.iter().chain(&v6).copied().collect();
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        return Ok(ClientsReleased::default());
    }
    let tag = tag(id);
    // An IPv6 listener on [::] takes IPv4 connections too: its port is refused for both.
    for (tool, ports) in [("iptables", &all), ("ip6tables", &v6)] {
        for chunk in ports.chunks(PORTS_PER_RULE) {
            let mut args: Vec<String> = vec!["-w".into(), "-I".into(), "INPUT".into()];
            args.extend(reject_rule(chunk, &tag));
            in_netns(init_pid, tool, &args)?;
        }
    }
    // SOCK_DESTROY on every connected socket whose local port is a listening one: the kernel
    // sends the peer a reset. (`ss -K` lists what it destroyed.)
    let filter = all
        .iter()
        .map(|p| format!("sport = :{p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let args: Vec<String> = ["-K", "-t", "-n", "-H", "state", "connected"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("( {filter} )")])
        .collect();
    let destroyed = in_netns(init_pid, "ss", &args)?;
    Ok(ClientsReleased {
        ports: all,
        connections_reset: destroyed.lines().filter(|l| !l.trim().is_empty()).count() as u32,
        ..Default::default()
    })
}

/// The arguments that name `rule` (a line of `iptables -S`) for deletion when it carries `tag`.
/// iptables-nft prints the comment quoted, iptables-legacy not; tags hold no spaces.
fn tagged_rule(rule: &str, tag: &str) -> Option<Vec<String>> {
    let spec: Vec<String> = rule
        .strip_prefix("-A ")?
        .split_whitespace()
        .map(|word| word.trim_matches('"').to_string())
        .collect();
    spec.windows(2)
        .any(|w| w[0] == "--comment" && w[1] == tag)
        .then_some(spec)
}

/// Removes the rules [`release`] added for container `id` in the network namespace of `pid`
/// (found by their tag: also after a restart of the shim). Nothing to remove is no error.
pub fn unrelease(id: &str, pid: u32) -> Result<usize, ReleaseError> {
    let tag = tag(id);
    let mut removed = 0;
    for tool in ["iptables", "ip6tables"] {
        let rules = match in_netns(pid, tool, &["-w".into(), "-S".into(), "INPUT".into()]) {
            Ok(rules) => rules,
            // ip6tables missing or IPv6 disabled: release added nothing there either.
            Err(_) if tool == "ip6tables" => continue,
            Err(e) => return Err(e),
        };
        for spec in rules.lines().filter_map(|rule| tagged_rule(rule, &tag)) {
            let mut args: Vec<String> = vec!["-w".into(), "-D".into()];
            args.extend(spec);
            in_netns(pid, tool, &args)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from /proc/net/tcp of a host running a listener on 6379 with one client.
    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:18EB 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 123457 1 0000000000000000 20 4 30 10 -1
   2: garbage
";

    #[test]
    fn the_kernels_tcp_table_is_read() {
        assert_eq!(
            parse_tcp_table(TABLE),
            vec![
                TcpSocket {
                    local_port: 6379,
                    state: TCP_LISTEN,
                    inode: 123456
                },
                TcpSocket {
                    local_port: 6379,
                    state: 1,
                    inode: 123457
                },
            ]
        );
    }

    #[test]
    fn tagged_rules_are_found_quoted_or_not() {
        let rule = "-A INPUT -p tcp -m multiport --dports 7777 -m comment --comment \"pclive-release:echo\" -j REJECT --reject-with tcp-reset";
        let spec = tagged_rule(rule, "pclive-release:echo").unwrap();
        assert_eq!(spec[..2], ["INPUT", "-p"]);
        assert!(spec.contains(&"pclive-release:echo".to_string()));
        assert!(tagged_rule(&rule.replace('"', ""), "pclive-release:echo").is_some());
        assert!(tagged_rule(rule, "pclive-release:ech").is_none());
        assert!(tagged_rule("-P INPUT ACCEPT", "pclive-release:echo").is_none());
    }

    #[test]
    fn the_reject_rule_names_the_container_and_resets() {
        let rule = reject_rule(&[80, 443], &tag("web"));
        assert_eq!(
            rule.join(" "),
            "-p tcp -m multiport --dports 80,443 -m comment --comment pclive-release:web -j REJECT --reject-with tcp-reset"
        );
    }
}
