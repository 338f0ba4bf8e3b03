//! The table of kept exit statuses. (The reaper itself is tested in
//! tests/reaper.rs, a process of its own, since it waits for every child.)

use super::*;

fn code(exit_code: i32) -> ExitStatus {
    ExitStatus {
        exit_code,
        ..Default::default()
    }
}

#[test]
fn orphans_never_crowd_out_a_watched_status() {
    let mut exits = Exits::new();
    // More watchers than the old table's 10,000-entry limit, some exited.
    let keys: Vec<(i32, u64)> = (1..=12_000).map(|pid| (pid, exits.watch(pid))).collect();
    for &(pid, _) in keys.iter().step_by(2) {
        assert!(exits.record(pid, code(pid % 256)));
    }
    // A flood of orphan exits is not kept at all.
    for pid in 100_000..200_000 {
        assert!(!exits.record(pid, code(1)));
    }
    assert_eq!(exits.statuses.len(), keys.len());
    for (i, &(pid, key)) in keys.iter().enumerate() {
        match exits.exit(key) {
            Some(s) => {
                assert_eq!(i % 2, 0, "pid {pid} has a status it never had");
                assert_eq!(s.exit_code, pid % 256);
            }
            None => assert_eq!(i % 2, 1, "pid {pid} lost its status"),
        }
    }
    // The ones still running get theirs too.
    for &(pid, key) in keys.iter().skip(1).step_by(2) {
        assert!(exits.record(pid, code(7)));
        assert_eq!(exits.exit(key).map(|s| s.exit_code), Some(7));
    }
}

#[test]
fn a_status_stays_until_its_handle_lets_go() {
    let mut exits = Exits::new();
    let key = exits.watch(42);
    assert!(exits.record(42, code(3)));
    // Asking doesn't consume it: try_exit can be called again.
    assert_eq!(exits.exit(key).map(|s| s.exit_code), Some(3));
    assert_eq!(exits.exit(key).map(|s| s.exit_code), Some(3));
    exits.unwatch(42, key);
    assert!(exits.exit(key).is_none());
    assert!(exits.statuses.is_empty() && exits.running.is_empty());
}

#[test]
fn a_reused_pid_neither_overwrites_nor_steals_a_status() {
    let mut exits = Exits::new();
    let first = exits.watch(42);
    assert!(exits.record(42, code(3)));
    // The reaped pid goes to an orphan whose exit nobody asked for...
    assert!(!exits.record(42, code(9)));
    // ...and then to a child we start while the first handle still lives.
    let second = exits.watch(42);
    assert!(exits.exit(second).is_none());
    assert!(exits.record(42, code(5)));
    assert_eq!(exits.exit(first).map(|s| s.exit_code), Some(3));
    assert_eq!(exits.exit(second).map(|s| s.exit_code), Some(5));
    // Dropping the first handle leaves the second alone.
    exits.unwatch(42, first);
    assert_eq!(exits.exit(second).map(|s| s.exit_code), Some(5));
}

#[test]
fn a_child_let_go_before_it_exits_is_dropped_like_an_orphan() {
    let mut exits = Exits::new();
    let key = exits.watch(42);
    exits.unwatch(42, key);
    assert!(!exits.record(42, code(0)));
    assert!(exits.statuses.is_empty() && exits.running.is_empty());
}
