use super::*;

fn sandbox() -> Sandbox {
    Sandbox::for_user(
        "hearth-action",
        vec![],
        crate::find_static_binary("hearth-sandbox")
            .expect("scripts/install.sh built a static hearth-sandbox"),
    )
    .expect("the host sandbox works here")
}

/// A workspace (input root and /tmp owned by the action user) and what the
/// command printed.
struct Ran {
    _dir: tempfile::TempDir,
    outcome: RunOutcome,
    stdout: String,
    stderr: String,
}

async fn run(sandbox: &Sandbox, script: &str, timeout: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (root, tmp) = (dir.path().join("root"), dir.path().join("tmp"));
    for d in [&root, &tmp] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(sandbox.uid), Some(sandbox.gid)).unwrap();
    }
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let outcome = sandbox
        .run(
            &root,
            &tmp,
            "",
            &["sh".into(), "-c".into(), script.into()],
            &[("PATH".into(), "/usr/bin:/bin".into())],
            std::fs::File::create(&out).unwrap(),
            std::fs::File::create(&err).unwrap(),
            timeout,
            CancellationToken::new(),
        )
        .await
        .unwrap();
    Ran {
        outcome,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        _dir: dir,
    }
}

fn idle_pids(sandbox: &Sandbox) -> Vec<u32> {
    let idle = sandbox.idle.lock().unwrap();
    idle.iter().filter_map(|c| c.child.id()).collect()
}

/// The attack: an action leaves a file in /tmp, a SysV shared memory
/// segment and a `setsid` process for whoever runs next in the same
/// sandbox. The next action sees none of them.
#[tokio::test]
async fn nothing_of_one_action_reaches_the_next_in_the_same_sandbox() {
    let sandbox = sandbox();
    let first = run(
        &sandbox,
        "echo secret > /tmp/left; ipcmk -M 4096 >/dev/null; \
         setsid sleep 1234.5 </dev/null >/dev/null 2>&1 & echo started",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(first.outcome.exit_code, 0, "{}", first.stderr);
    let reused = idle_pids(&sandbox);
    assert_eq!(reused.len(), 1);

    let next = run(
        &sandbox,
        "ls -A /tmp; ipcs -m | grep -c '^0x' || true; \
         for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(idle_pids(&sandbox), reused, "the same sandbox ran both");
    assert_eq!(next.outcome.exit_code, 0, "{}", next.stderr);
    assert!(!next.stdout.contains("left"), "{}", next.stdout);
    assert!(!next.stdout.contains("1234.5"), "{}", next.stdout);
    let lines: Vec<&str> = next.stdout.lines().collect();
    assert_eq!(lines[0], "0", "no shared memory segments: {}", next.stdout);
}

/// The action cannot reach the host's root, which the sandbox's PID 1
/// keeps (covered) to bind workspaces: not at its mount point, and not
/// through PID 1's /proc entries.
#[tokio::test]
async fn the_host_root_kept_by_pid_1_is_out_of_reach() {
    let sandbox = sandbox();
    let ran = run(
        &sandbox,
        "for p in /.hearth /.hearth/etc /proc/1/root/etc /proc/1/cwd /proc/1/fd; do \
           ls $p >/dev/null 2>&1 && echo reached $p; done; \
         cat /proc/1/root/etc/hostname /proc/1/environ 2>/dev/null; echo done",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(ran.stdout, "done\n");
}

/// An idle sandbox that died (its PID 1 killed while it waited) is not
/// handed an action: a new one runs it.
#[tokio::test]
async fn a_dead_idle_sandbox_is_replaced() {
    let sandbox = sandbox();
    run(&sandbox, "true", Duration::from_secs(20)).await;
    let [pid] = idle_pids(&sandbox)[..] else {
        panic!("one idle sandbox")
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ran = run(&sandbox, "echo fine", Duration::from_secs(20)).await;
    assert_eq!(ran.stdout, "fine\n");
    assert_ne!(idle_pids(&sandbox), vec![pid]);
}

/// After a timeout the sandbox kills everything and is used again.
#[tokio::test]
async fn a_timed_out_action_leaves_a_usable_sandbox() {
    let sandbox = sandbox();
    let ran = run(
        &sandbox,
        "echo partial; setsid sleep 1234.6 & sleep 30",
        Duration::from_millis(300),
    )
    .await;
    assert!(ran.outcome.timed_out);
    assert_eq!(ran.stdout, "partial\n");
    let pids = idle_pids(&sandbox);
    assert_eq!(pids.len(), 1);
    let next = run(
        &sandbox,
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
        Duration::from_secs(20),
    )
    .await;
    assert!(!next.stdout.contains("1234.6"), "{}", next.stdout);
    assert_eq!(idle_pids(&sandbox), pids);
}
