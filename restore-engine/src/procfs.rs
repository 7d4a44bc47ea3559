//! Fields of a /proc `stat` file. The command name (field 2) may hold spaces and parentheses,
//! so the fields are read after its last ')'.

/// The fields after the command name: state, ppid, ...
fn after_comm(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    stat.rfind(')').map(|at| stat[at + 1..].split_whitespace())
}

/// The state letter (R, S, D, T, t, Z, X, ...).
pub fn stat_state(stat: &str) -> Option<char> {
    after_comm(stat)?.next()?.chars().next()
}

/// The parent's pid.
pub fn stat_ppid(stat: &str) -> Option<i32> {
    after_comm(stat)?.nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_after_the_last_parenthesis_of_the_command() {
        let stat = "12 (a) b) c) T 7 12 12 0 -1";
        assert_eq!(stat_state(stat), Some('T'));
        assert_eq!(stat_ppid(stat), Some(7));
        assert_eq!(stat_state("garbage"), None);
        assert_eq!(stat_ppid("12 (x)"), None);
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_eq!(stat_state(&own), Some('R'));
        assert_eq!(
            stat_ppid(&own),
            Some(std::os::unix::process::parent_id() as i32)
        );
    }
}
