//! Migration, source side, as the shim drives it: the request that `pclive migrate` sends inside
//! containerd's CheckpointOptions, and the runc operations the engine's sending end
//! ([`restore_engine::source`]) asks for: the container's processes, the freeze, the final CRIU
//! dump without the (already sent) lazy memory, and the thaw. The container stays frozen from the
//! last round until the destination commits; any failure before that resumes it.

use std::fs;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::info;
use restore_engine::policy::ConvergencePolicy;
use restore_engine::record::{self, Store};
use restore_engine::source::{
    self, ClientsReleased, ConnectionDump, HookError, MigrateParams, MigrationReport, RoundStats,
    SourceError, SourceHooks, TaskIds,
};
use restore_engine::wire::{self, Auth};

use crate::runc::{CheckpointOpts, CriuOpts, DumpNetwork, Runc, RuncError};
use crate::seizable;

/// CRIU's page-server command that ends a lazy dump's serving session.
const PS_IOV_CLOSE: u32 = 0x1023;
/// How long CRIU may take to dump the frozen container (everything but the lazy memory) before
/// it serves pages.
const DUMP_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long runc may take to end after CRIU's page server closed.
const DUMP_END_TIMEOUT: Duration = Duration::from_secs(10);
/// The field of containerd's `CheckpointOptions` that carries a [`MigrateRequest`] (containerd
/// passes unknown fields through to the shim unchanged).
pub const MIGRATE_FIELD: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration request: {0}")]
    Request(String),
    #[error("cannot migrate: {0}. Nothing was sent; the container keeps running here")]
    Unseizable(String),
    #[error("cannot migrate: host paths are bind-mounted into the container: {0}. pclive does not copy them: make them exist on the destination and pass --external-mounts-ok, or move the data into the container's filesystem. Nothing was sent; the container keeps running here")]
    ExternalMounts(String),
    #[error("cannot migrate: the container's root filesystem: {0}. Nothing was sent; the container keeps running here")]
    Filesystem(String),
    #[error("cannot migrate: {0}. Nothing was sent; the container keeps running here")]
    Address(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// What a source shim needs to migrate a container (sent by `pclive migrate` inside containerd's
/// CheckpointOptions, field [`MIGRATE_FIELD`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MigrateRequest {
    /// The receiving shim's address, host:port.
    #[prost(string, tag = "1")]
    pub destination: String,
    /// Pre-shared key file on the source host (at least 16 bytes).
    #[prost(string, tag = "2")]
    pub key_file: String,
    /// Unauthenticated session: only if the user asked for it (and the receiver allows it).
    #[prost(bool, tag = "3")]
    pub insecure: bool,
    #[prost(uint32, tag = "4")]
    pub max_rounds: u32,
    #[prost(uint32, tag = "5")]
    pub target_downtime_ms: u32,
    /// uffd-wp, soft-dirty or content-hash; empty: the best the kernel offers.
    #[prost(string, tag = "6")]
    pub tracker: String,
    /// LZ4-compress page runs (each run goes uncompressed when that saves too little).
    #[prost(bool, tag = "7")]
    pub compress: bool,
    /// The migration's id (32 hex digits), chosen by `pclive migrate` so that it can follow the
    /// migration's record; empty: the shim chooses.
    #[prost(string, tag = "8")]
    pub migration_id: String,
    /// After losing the connection once the images went out, how long to keep asking the
    /// destination for the outcome before declaring the migration in doubt (0: 120 s).
    #[prost(uint32, tag = "9")]
    pub resolve_timeout_seconds: u32,
    /// Both hosts see the container's root filesystem on the same storage: do not copy it (the
    /// destination checks that its tree is the same).
    #[prost(bool, tag = "10")]
    pub shared_rootfs: bool,
    /// The container's bind mounts from the host exist on the destination too (they are not
    /// copied); without this a container with any is refused.
    #[prost(bool, tag = "11")]
    pub external_mounts_ok: bool,
    /// Bytes per second the live pre-copy rounds may send (0: no bound).
    #[prost(uint64, tag = "12")]
    pub max_bandwidth: u64,
    /// The container's address moves with it: it joins a network namespace prepared by its
    /// network plugin, whose interfaces go down here before the final dump and come up on the
    /// destination; its TCP connections continue there.
    #[prost(bool, tag = "13")]
    pub move_address: bool,
    /// Percent of one core the live pre-copy rounds may use (0: no bound).
    #[prost(uint32, tag = "14")]
    pub max_cpu_percent: u32,
    /// Connections the pages travel on (0: as many as the host's cores suggest, see
    /// [`restore_engine::source::streams::default_streams`]).
    #[prost(uint32, tag = "15")]
    pub streams: u32,
}

impl MigrateRequest {
    /// The convergence policy it asks for (defaults where it says nothing).
    pub fn policy(&self) -> ConvergencePolicy {
        let mut policy = ConvergencePolicy::default();
        if self.max_rounds > 0 {
            policy.max_rounds = self.max_rounds;
        }
        if self.target_downtime_ms > 0 {
            policy.target_downtime = Duration::from_millis(self.target_downtime_ms as u64);
        }
        policy
    }

    fn auth(&self) -> Result<Auth, MigrateError> {
        match (self.key_file.is_empty(), self.insecure) {
            (false, false) => Ok(Auth::Key(
                wire::read_key_file(Path::new(&self.key_file)).map_err(MigrateError::Request)?,
            )),
            (true, true) => Ok(Auth::Insecure),
            (true, false) => Err(MigrateError::Request(
                "no key file: pass --key-file (or --insecure to migrate unauthenticated)".into(),
            )),
            (false, true) => Err(MigrateError::Request(
                "a key file and --insecure together: choose one".into(),
            )),
        }
    }

    /// The engine's parameters for container `id`, the final dump and logs in `work_dir`, the
    /// records under `state_dir`.
    pub fn params(
        &self,
        id: &str,
        work_dir: &Path,
        state_dir: &Path,
        bundle: &Path,
    ) -> Result<MigrateParams, MigrateError> {
        let mounts = crate::rootfs::external_mounts(bundle).map_err(MigrateError::Filesystem)?;
        let refused: Vec<&str> = mounts
            .iter()
            .filter(|m| !m.host_config)
            .map(|m| m.text.as_str())
            .collect();
        if !refused.is_empty() && !self.external_mounts_ok {
            return Err(MigrateError::ExternalMounts(refused.join(", ")));
        }
        // The host's own configuration files are the destination's there (reported, not
        // refused).
        let external_mounts = mounts.into_iter().map(|m| m.text).collect();
        if self.move_address {
            let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
                .map_err(|e| MigrateError::Address(format!("reading its spec: {e}")))?;
            crate::grant::moving_netns(&spec).map_err(MigrateError::Address)?;
        }
        let root = crate::rootfs::root_dir(bundle).map_err(MigrateError::Filesystem)?;
        let layer = crate::rootfs::layer_plan(&root, self.shared_rootfs)
            .map_err(MigrateError::Filesystem)?;
        let migration_id = if self.migration_id.is_empty() {
            record::new_migration_id().map_err(|source| MigrateError::Io {
                what: "choosing a migration id".into(),
                source,
            })?
        } else {
            self.migration_id.clone()
        };
        Ok(MigrateParams {
            migration_id,
            container: id.to_string(),
            destination: self.destination.clone(),
            auth: self.auth()?,
            key_file: (!self.key_file.is_empty()).then(|| PathBuf::from(&self.key_file)),
            store: Store::new(state_dir),
            resolve_timeout: Duration::from_secs(match self.resolve_timeout_seconds {
                0 => 120,
                n => n as u64,
            }),
            policy: self.policy(),
            tracker: (!self.tracker.is_empty()).then(|| self.tracker.clone()),
            compress: self.compress,
            max_bandwidth: (self.max_bandwidth > 0).then_some(self.max_bandwidth),
            max_cpu: (self.max_cpu_percent > 0).then(|| f64::from(self.max_cpu_percent) / 100.0),
            streams: match self.streams {
                0 => restore_engine::source::streams::default_streams(),
                n => n,
            },
            work_dir: work_dir.to_owned(),
            layer: Some(layer),
            external_mounts,
            move_address: self.move_address,
        })
    }
}

/// Host pid → pid in the container's namespace (the last NSpid field).
pub fn namespace_pid(host_pid: i32) -> io::Result<u32> {
    let status = fs::read_to_string(format!("/proc/{host_pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|pids| pids.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no NSpid for pid {host_pid}"),
            )
        })
}

/// The runc operations of a migration's sending end.
struct RuncHooks<'a> {
    runc: &'a Runc,
    id: &'a str,
    /// The container's init (host pid): its cgroup lists the processes while frozen.
    init_pid: u32,
    work_dir: &'a Path,
    /// The container's bundle (its CRIU config).
    bundle: &'a Path,
    network: DumpNetwork,
    /// The port of CRIU's page server for the final dump, fenced before the freeze.
    page_server: PageServerPort,
}

/// The port CRIU's lazy page server will listen on in the final dump, chosen and (in the
/// host's network namespace) fenced before the container is frozen: two iptables runs (about
/// 30 ms) were part of every host-network container's downtime. A listener holds the port
/// until the dump, so that no other server takes it meanwhile. The fence goes when this is
/// dropped (after the migration), in the background.
struct PageServerPort {
    port: u16,
    holder: Option<TcpListener>,
    _fence: Option<PageServerFence>,
}

impl PageServerPort {
    fn prepare(network: DumpNetwork) -> Result<PageServerPort, DumpError> {
        let (holder, port) = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| {
                let port = l.local_addr()?.port();
                Ok((l, port))
            })
            .map_err(|source| DumpError::Io {
                what: "choosing a port for CRIU's page server".into(),
                source,
            })?;
        // CRIU's lazy page server ignores runc's address and listens on every address: in the
        // host's namespace (host-network containers) a firewall keeps it to root on this host.
        let fence = match network {
            DumpNetwork::Host => Some(PageServerFence::raise(port)?),
            DumpNetwork::Private => None,
        };
        Ok(PageServerPort {
            port,
            holder: Some(holder),
            _fence: fence,
        })
    }

    /// The port, released for CRIU.
    fn take(&mut self) -> u16 {
        self.holder = None;
        self.port
    }
}

/// How often `runc pause` is tried before the migration fails (the source keeps running).
const PAUSE_ATTEMPTS: u32 = 5;
/// How long to wait before trying to freeze again.
const PAUSE_RETRY: Duration = Duration::from_millis(50);
/// How often the freeze is retried while a task is blocked in vfork for a moment.
const FREEZE_ATTEMPTS: u32 = 25;
/// How long to wait between looks at tasks CRIU cannot seize.
const UNSEIZABLE_POLL: Duration = Duration::from_millis(20);
/// How long a task may stay blocked in vfork before a migration is refused up front.
const VFORK_PATIENCE: Duration = Duration::from_secs(1);

impl RuncHooks<'_> {
    /// `runc pause`, tried again when it fails: on cgroup v1 a container whose processes fork
    /// fast can stay FREEZING past runc's patience ("unable to freeze"; measured with the
    /// workload suite on a loaded host). runc thaws on that failure; so does this, to be sure.
    fn pause(&self) -> Result<(), RuncError> {
        let mut attempt = 1;
        loop {
            match self.runc.pause(self.id) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < PAUSE_ATTEMPTS => {
                    log::warn!(
                        "{}: freezing failed (attempt {attempt} of {PAUSE_ATTEMPTS}): {e}; trying again",
                        self.id
                    );
                    let _ = self.runc.resume(self.id);
                    thread::sleep(PAUSE_RETRY);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The container's network namespace (its init's).
    fn netns(&self) -> PathBuf {
        crate::netns::of_pid(self.init_pid)
    }

    fn host_pids(&self) -> Result<Vec<u32>, RuncError> {
        Ok(self
            .runc
            .ps(self.id)?
            .into_iter()
            .map(|p| p as u32)
            .collect())
    }

    /// Refuses, before anything is sent, a container with a task CRIU cannot seize: a stopped
    /// one at once, one blocked in vfork if it stays so for [`VFORK_PATIENCE`].
    fn check_seizable(&self) -> Result<(), MigrateError> {
        let since = Instant::now();
        loop {
            let pids = self.host_pids().map_err(|e| MigrateError::Io {
                what: "listing the container's processes".into(),
                source: io::Error::other(e.to_string()),
            })?;
            let blocked = seizable::find(&pids);
            if blocked.is_empty() {
                return Ok(());
            }
            let only_vfork = blocked.iter().all(|t| t.why == seizable::Why::Vfork);
            if !only_vfork || since.elapsed() >= VFORK_PATIENCE {
                return Err(MigrateError::Unseizable(seizable::describe(&blocked)));
            }
            thread::sleep(UNSEIZABLE_POLL);
        }
    }
}

impl SourceHooks for RuncHooks<'_> {
    fn tasks(&mut self) -> Result<Vec<TaskIds>, HookError> {
        // A process that exits between the listing and here is skipped.
        Ok(self
            .host_pids()?
            .into_iter()
            .filter_map(|pid| {
                namespace_pid(pid as i32).ok().map(|ns_pid| TaskIds {
                    host_pid: pid,
                    ns_pid,
                })
            })
            .collect())
    }

    fn freeze(&mut self) -> Result<(), HookError> {
        // Frozen with a task CRIU cannot seize, the final dump would hang or fail after the
        // downtime began: thaw and, for a vfork of a moment, try again.
        for attempt in 1.. {
            self.pause()?;
            // Read from the cgroup rather than `runc ps`: this is downtime.
            let pids = match crate::cgroups::container_procs(self.init_pid as i32) {
                Ok(pids) => pids,
                Err(e) => {
                    log::warn!("{}: {e}; listing the processes with runc ps", self.id);
                    self.host_pids()?
                }
            };
            let blocked = seizable::find(&pids);
            if blocked.is_empty() {
                return Ok(());
            }
            self.runc.resume(self.id)?;
            let only_vfork = blocked.iter().all(|t| t.why == seizable::Why::Vfork);
            if !only_vfork || attempt == FREEZE_ATTEMPTS {
                let why = seizable::describe(&blocked);
                return Err(format!("{why}. Thawed: the container keeps running here").into());
            }
            thread::sleep(UNSEIZABLE_POLL);
        }
        unreachable!()
    }

    fn final_dump(
        &mut self,
        image_dir: &Path,
        connections: ConnectionDump,
    ) -> Result<(), HookError> {
        let _tcp_close = match connections {
            ConnectionDump::Closed => {
                let guard = crate::network_lock::closing_connections(self.bundle)?;
                match &guard {
                    Some(_) => log::info!(
                        "{}: the destination restores TCP connections closed: the final dump records them closed, without locking them",
                        self.id
                    ),
                    None => log::info!(
                        "{}: the destination restores TCP connections closed, but the container's CRIU config is the user's: the final dump records and locks them",
                        self.id
                    ),
                }
                guard
            }
            ConnectionDump::State => None,
        };
        Ok(lazy_final_dump(
            self.runc,
            self.id,
            image_dir,
            self.work_dir,
            self.network,
            self.page_server.take(),
        )?)
    }

    fn resume(&mut self) -> Result<(), HookError> {
        Ok(self.runc.resume(self.id)?)
    }

    fn release_clients(&mut self) -> Result<ClientsReleased, HookError> {
        let pids = crate::cgroups::container_procs(self.init_pid as i32)?;
        let released = crate::release::release(self.id, self.init_pid, &pids)?;
        info!(
            "{}: the destination runs it: refused new connections to port(s) {:?} here and reset {} connection(s)",
            self.id, released.ports, released.connections_reset
        );
        Ok(released)
    }

    fn address_links(&mut self) -> Result<Vec<String>, HookError> {
        let links = crate::netns::links(&self.netns())?;
        Ok(links.into_iter().filter(|l| l.up).map(|l| l.name).collect())
    }

    fn set_address_links(&mut self, names: &[String], up: bool) -> Result<(), HookError> {
        crate::netns::set_links(&self.netns(), names, up)?;
        info!(
            "{}: interface(s) {} {} (its address moves)",
            self.id,
            names.join(", "),
            if up { "up again" } else { "down" }
        );
        Ok(())
    }

    fn round_done(&mut self, round: &RoundStats) {
        // Progress for `pclive migrate`, which follows this file while it waits.
        if let Ok(line) = serde_json::to_string(round) {
            if let Ok(mut f) = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(progress_path(self.work_dir))
            {
                let _ = writeln!(f, "{line}");
            }
        }
        info!(
            "{}: round {}: {} pages ({:.1} MiB), {} zero, {:.3}s{}",
            self.id,
            round.round,
            round.pages,
            round.bytes as f64 / (1 << 20) as f64,
            round.zero_pages,
            round.seconds,
            if round.frozen { " (frozen)" } else { "" }
        )
    }
}

/// Firewall rules that keep CRIU's page server (listening on every address of the host's
/// network namespace) to root on this host: other hosts are dropped, other local users refused.
/// Removed when dropped (in the background: not part of the container's downtime).
struct PageServerFence {
    rules: Vec<Vec<String>>,
}

impl PageServerFence {
    fn raise(port: u16) -> Result<PageServerFence, DumpError> {
        let port = port.to_string();
        let rules: Vec<Vec<String>> = [
            vec![
                "INPUT", "-p", "tcp", "--dport", &port, "!", "-i", "lo", "-j", "DROP",
            ],
            vec![
                "OUTPUT",
                "-p",
                "tcp",
                "-o",
                "lo",
                "--dport",
                &port,
                "-m",
                "owner",
                "!",
                "--uid-owner",
                "0",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        ]
        .iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect();
        let mut fence = PageServerFence { rules: Vec::new() };
        for rule in rules {
            iptables("-I", &rule).map_err(|source| DumpError::Io {
                what: format!(
                    "fencing CRIU's page server with iptables ({}); install iptables (scripts/setup.sh does)",
                    rule.join(" ")
                ),
                source,
            })?;
            fence.rules.push(rule);
        }
        Ok(fence)
    }
}

impl Drop for PageServerFence {
    fn drop(&mut self) {
        let rules = std::mem::take(&mut self.rules);
        thread::spawn(move || {
            for rule in rules {
                if let Err(e) = iptables("-D", &rule) {
                    log::warn!("removing iptables rule {}: {e}", rule.join(" "));
                }
            }
        });
    }
}

/// Runs iptables through the shim's reaper (which owns every child's exit status).
fn iptables(action: &str, rule: &[String]) -> io::Result<()> {
    let args: Vec<String> = ["-w", action]
        .iter()
        .map(|s| s.to_string())
        .chain(rule.iter().cloned())
        .collect();
    crate::tools::run_tool("iptables", &args, None)
        .map(drop)
        .map_err(io::Error::other)
}

/// How often the connection to CRIU's page server is tried while the final dump runs.
const CONNECT_RETRY: Duration = Duration::from_micros(250);

/// Connects to CRIU's page server: from the shim, or, when the dump runs in a network
/// namespace of its own, from a thread that joined it (the page server is reachable there only).
struct Connector {
    streams: std::sync::mpsc::Receiver<TcpStream>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Connector {
    fn start(runc_pid: Arc<AtomicI32>, port: u16, network: DumpNetwork) -> Connector {
        let (tx, streams) = std::sync::mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        thread::spawn(move || {
            let running = || !halt.load(Ordering::SeqCst);
            if network == DumpNetwork::Private {
                // runc (and CRIU, its child) run in the new namespace: join it.
                let mut pid = 0;
                while pid <= 0 && running() {
                    pid = runc_pid.load(Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(1));
                }
                let joined = fs::File::open(format!("/proc/{pid}/ns/net")).and_then(|ns| {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)
                });
                if let Err(e) = joined {
                    log::warn!("cannot join the final dump's network namespace: {e}");
                    return;
                }
            }
            // CRIU opens its page server last, when the dump is written: the connection is
            // tried often, as each moment here is downtime (a refused connection on loopback
            // costs microseconds).
            while running() {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => {
                        let _ = tx.send(s);
                        return;
                    }
                    Err(_) => thread::sleep(CONNECT_RETRY),
                }
            }
        });
        Connector { streams, stop }
    }

    /// The connection, if made; waits a moment otherwise.
    fn poll(&self) -> Option<TcpStream> {
        self.streams.recv_timeout(Duration::from_millis(5)).ok()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Why the final dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error("{0}")]
    Server(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A CRIU dump of the paused container that leaves the lazy memory out (the destination has it
/// from the rounds): `runc checkpoint --lazy-pages` makes CRIU serve those pages after writing
/// the images; closing its page server at once ends the dump, the container still paused.
/// `port`: the page server's, prepared (and fenced) before the freeze ([`PageServerPort`]).
fn lazy_final_dump(
    runc: &Runc,
    id: &str,
    image_dir: &Path,
    work_dir: &Path,
    network: DumpNetwork,
    port: u16,
) -> Result<(), DumpError> {
    let opts = CheckpointOpts {
        criu: CriuOpts {
            image_path: image_dir.to_owned(),
            work_path: Some(work_dir.to_owned()),
            tcp_established: true,
            ext_unix_sk: true,
            file_locks: true,
            lazy_pages: true,
            ..Default::default()
        },
        leave_running: true,
        parent_path: None,
        status_fd: None,
        page_server: Some(format!("127.0.0.1:{port}")),
        // A server under load has clients connecting while it is paused: their connections
        // wait in the listen queue, and CRIU would refuse to dump them. They are dropped (the
        // clients see a reset and reconnect to the destination) instead of failing the move.
        tcp_skip_in_flight: true,
    };
    let runc = runc.clone();
    let id = id.to_owned();
    // runc and its CRIU run in a process group of their own: a dump that does not end in time
    // is stopped as a whole before the container may resume.
    let group = Arc::new(AtomicI32::new(0));
    // The dump's end is signalled, not polled: the wait for it is downtime.
    let (ended, end) = std::sync::mpsc::channel::<()>();
    let dump = {
        let group = Arc::clone(&group);
        thread::spawn(move || {
            let result = runc.checkpoint_in_group(&id, &opts, network, |pgid| {
                group.store(pgid, Ordering::SeqCst)
            });
            let _ = ended.send(());
            result
        })
    };
    let give_up = |what: String| {
        let pgid = group.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: killpg has no memory-safety preconditions; the group is runc's own.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        DumpError::Server(format!(
            "{what}; runc and CRIU were stopped (CRIU's dump.log in the work directory says where it hung)"
        ))
    };
    let deadline = Instant::now() + DUMP_START_TIMEOUT;
    // Fault point for the test that CRIU's page server is reachable from nowhere else: a
    // stall here leaves it listening for a while.
    let _ = restore_engine::fault::point("source::before-page-server-connect");
    let connector = Connector::start(Arc::clone(&group), port, network);
    let mut stream = loop {
        if dump.is_finished() {
            return match dump.join() {
                Ok(Ok(())) => Err(DumpError::Server(
                    "CRIU finished without serving pages".into(),
                )),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(DumpError::Server("the dump thread panicked".into())),
            };
        }
        match connector.poll() {
            Some(s) => break s,
            None if Instant::now() < deadline => {}
            None => {
                let error = give_up(format!(
                    "CRIU did not finish the final dump within {DUMP_START_TIMEOUT:?}"
                ));
                let _ = dump.join();
                return Err(error);
            }
        }
    };
    // struct page_server_iov { u32 cmd; (pad); u64 nr_pages; u64 vaddr; u64 dst_id; }
    let mut close = [0u8; 32];
    close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
    // No waiting for CRIU's 4-byte acknowledgement: its page server corks the socket, so the
    // reply sits up to 200 ms in the kernel (measured: 0.2 s of every migration's downtime).
    // Whether the dump ended well is what runc's exit status says.
    stream.write_all(&close).map_err(|source| DumpError::Io {
        what: "closing CRIU's page server".into(),
        source,
    })?;
    drop(stream);
    match end.recv_timeout(DUMP_END_TIMEOUT) {
        // Ended, or the thread is gone (a panic, which join reports).
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let error = give_up(format!(
                "runc checkpoint did not end within {DUMP_END_TIMEOUT:?} after its page server closed"
            ));
            let _ = dump.join();
            return Err(error);
        }
    }
    match dump.join() {
        Ok(result) => Ok(result?),
        Err(_) => Err(DumpError::Server("the dump thread panicked".into())),
    }
}

/// Migrates container `id` to `request.destination`; `work_dir` holds the final dump and its
/// logs; `network` says where the final dump runs (a private namespace for a container with
/// its own network, so that CRIU's page server is reachable from nowhere else). On success the caller removes the (frozen) source and records that; on
/// [`SourceError::InDoubt`] it stays frozen; on any other error it has been resumed.
#[allow(clippy::too_many_arguments)]
pub fn migrate_out(
    runc: &Runc,
    id: &str,
    init_pid: u32,
    bundle: &Path,
    request: &MigrateRequest,
    work_dir: &Path,
    state_dir: &Path,
    network: DumpNetwork,
) -> Result<MigrationReport, MigrateError> {
    let params = request.params(id, work_dir, state_dir, bundle)?;
    let page_server = PageServerPort::prepare(network).map_err(|e| MigrateError::Io {
        what: "preparing CRIU's page server for the final dump (nothing was sent; the container keeps running here)".into(),
        source: io::Error::other(e.to_string()),
    })?;
    let mut hooks = RuncHooks {
        runc,
        id,
        init_pid,
        work_dir,
        bundle,
        network,
        page_server,
    };
    hooks.check_seizable()?;
    let processes = hooks.tasks().map(|t| t.len()).unwrap_or(0);
    info!(
        "{id}: migrating {processes} process(es) to {}",
        request.destination
    );
    Ok(source::migrate(&params, &mut hooks)?)
}

/// Where the rounds of a running migration are appended (JSON lines).
pub fn progress_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.progress")
}

/// Where the report of a migration goes.
pub fn report_path(work_dir: &Path) -> PathBuf {
    work_dir.join("pclive-migration.json")
}
