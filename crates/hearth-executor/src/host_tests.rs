use super::*;
use hearth_scheduler::Platform;
use std::time::{Duration, Instant};

/// The user `scripts/install.sh` creates for host actions.
const ACTION_USER: &str = "hearth-action";

fn spec(dir: &Path, args: &[&str], timeout: Duration) -> RunSpec {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    RunSpec {
        instance_name: String::new(),
        tenant: String::new(),
        shared_snapshot: None,
        input_root: root,
        working_directory: String::new(),
        output_paths: vec![],
        arguments: args.iter().map(|s| s.to_string()).collect(),
        environment: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("X".into(), "42".into()),
        ],
        timeout,
        stdout_path: dir.join("stdout"),
        stderr_path: dir.join("stderr"),
        platform: Platform::default(),
    }
}

fn sandboxed() -> HostRunner {
    HostRunner::new(Some(
        Sandbox::for_user(
            ACTION_USER,
            vec![],
            crate::find_static_binary("hearth-sandbox")
                .expect("scripts/install.sh built a static hearth-sandbox"),
        )
        .expect("the host sandbox works here"),
    ))
}

/// Both runners, unconfined first.
fn runners() -> [HostRunner; 2] {
    [HostRunner::new(None), sandboxed()]
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) && !cmdline.contains("sh -c") {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// A `sleep` with a duration no other process uses, to find it by.
fn unique_sleep() -> String {
    format!("{}.{}", 3000 + std::process::id() % 1000, rand_suffix())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 1_000_000
}

#[tokio::test]
async fn runs_with_env_and_captures_output() {
    for runner in runners() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            &["sh", "-c", "echo out $X; echo err >&2; exit 3"],
            Duration::from_secs(10),
        );
        let out = runner.run(&s, CancellationToken::new()).await.unwrap();
        assert_eq!(out, RunOutcome::exited(3));
        assert_eq!(std::fs::read_to_string(&s.stdout_path).unwrap(), "out 42\n");
        assert_eq!(std::fs::read_to_string(&s.stderr_path).unwrap(), "err\n");
    }
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    for runner in runners() {
        let dir = tempfile::tempdir().unwrap();
        let sleep = unique_sleep();
        let script = format!("(sleep {sleep}) & sleep 30");
        let s = spec(
            dir.path(),
            &["sh", "-c", &script],
            Duration::from_millis(300),
        );
        let t = Instant::now();
        let out = runner.run(&s, CancellationToken::new()).await.unwrap();
        assert!(out.timed_out);
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(processes_with(&sleep), Vec::<String>::new());
    }
}

#[tokio::test]
async fn missing_program_exits_127_with_a_message() {
    for runner in runners() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), &["./no-such-tool"], Duration::from_secs(5));
        let out = runner.run(&s, CancellationToken::new()).await.unwrap();
        assert_eq!(out.exit_code, 127);
        assert!(std::fs::read_to_string(&s.stderr_path)
            .unwrap()
            .contains("no-such-tool"));
    }
}

/// The attack: a child that leaves the process group and the session
/// (`setsid`), or double-forks, outlives the action. In the sandbox the
/// whole PID namespace ends with the command.
#[tokio::test]
async fn setsid_and_double_fork_leftovers_end_with_the_action() {
    let runner = sandboxed();
    let sleep = unique_sleep();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "setsid sleep {sleep} </dev/null >/dev/null 2>&1 & \
         (sh -c 'sleep {sleep} </dev/null >/dev/null 2>&1 &' &) ; sleep 0.2; exit 0"
    );
    let s = spec(dir.path(), &["sh", "-c", &script], Duration::from_secs(20));
    let out = runner.run(&s, CancellationToken::new()).await.unwrap();
    assert_eq!(out.exit_code, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        processes_with(&sleep),
        Vec::<String>::new(),
        "leftovers after exit"
    );

    // And after a timeout.
    let script = format!("setsid sleep {sleep} </dev/null >/dev/null 2>&1 & sleep 30");
    let s = spec(
        dir.path(),
        &["sh", "-c", &script],
        Duration::from_millis(500),
    );
    let out = runner.run(&s, CancellationToken::new()).await.unwrap();
    assert!(out.timed_out);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        processes_with(&sleep),
        Vec::<String>::new(),
        "leftovers after timeout"
    );
}

#[tokio::test]
async fn the_sandbox_runs_as_the_action_user_and_hides_the_host() {
    let runner = sandboxed();
    let dir = tempfile::tempdir().unwrap();
    // Stands for the server's data dir and other workspaces: any host path
    // outside the input root and the visible system directories.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"private").unwrap();
    let script = format!(
        "id -u; cat {} 2>&1 || echo hidden; ls /root /var /home 2>&1 | head -3; \
         touch /etc/x 2>&1 || echo ro; echo ok > /tmp/t && cat /tmp/t",
        secret.display()
    );
    let s = spec(dir.path(), &["sh", "-c", &script], Duration::from_secs(20));
    let out = runner.run(&s, CancellationToken::new()).await.unwrap();
    let stdout = std::fs::read_to_string(&s.stdout_path).unwrap();
    assert_eq!(out.exit_code, 0, "{stdout}");
    let uid = nix::unistd::User::from_name(ACTION_USER)
        .unwrap()
        .unwrap()
        .uid;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], uid.to_string(), "{stdout}");
    assert!(!stdout.contains("private"), "{stdout}");
    assert!(stdout.contains("hidden"), "{stdout}");
    assert!(stdout.contains("ro"), "{stdout}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
