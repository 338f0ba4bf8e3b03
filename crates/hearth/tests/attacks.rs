//! Hostile host actions (`workload-isolation-type=none`) against a real
//! `hearth up` with its default sandbox. Each test is an attack that worked
//! before the boundary existed and must keep failing.
#![allow(deprecated)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth_proto::reapi::{command::EnvironmentVariable, Command, Directory, ExecuteResponse};
use hearth_storage::Digest;
use tonic::Code;

fn sh(script: &str) -> Command {
    Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    }
}

async fn run(c: &Channel, command: &Command, root: &Directory) -> ExecuteResponse {
    let root = upload_msg(c, root).await;
    let cd = upload_msg(c, command).await;
    let action = action_of(c, cd, root).await;
    execute(c, action, true).await.expect("Execute").1
}

fn code_of(r: &ExecuteResponse) -> (Code, String) {
    let s = r.status.clone().unwrap_or_default();
    (Code::from_i32(s.code), s.message)
}

/// Every blob an ActionResult names, read back.
async fn returned_bytes(c: &Channel, r: &ExecuteResponse) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(res) = &r.result {
        for f in &res.output_files {
            out.push(read_blob(c, f.digest.as_ref().unwrap()).await.to_vec());
        }
        for d in &res.output_directories {
            out.push(read_blob(c, d.tree_digest.as_ref().unwrap()).await.to_vec());
        }
    }
    out
}

fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.starts_with("sleep ") && cmdline.contains(marker) {
                found.push(cmdline);
            }
        }
    }
    found
}

fn unique_sleep() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}.{}", 4000 + std::process::id() % 1000, nanos % 1_000_000)
}

/// Waits until no process matches, for a little while (a killed process
/// takes a moment to be reaped).
async fn gone(marker: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_with(marker);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn outputs_are_never_collected_through_a_symlinked_parent() {
    let h = up(&[]);
    let c = channel(&h).await;
    let shadow = std::fs::read("/etc/shadow").expect("the test runs as root");
    let empty = Directory::default();

    // A declared file beneath a parent the action replaced by a link to /.
    let mut file = sh("rm -rf out; ln -s / out");
    file.output_files = vec!["out/etc/shadow".into()];
    // A declared directory beneath one.
    let mut dir = sh("rm -rf d; ln -s / d");
    dir.output_directories = vec!["d/etc".into()];
    // The working directory itself replaced by a link to /.
    let mut wd = sh("cd .. && rm -rf wd && ln -s / wd");
    wd.working_directory = "wd".into();
    wd.output_files = vec!["etc/shadow".into()];
    // The same through output_paths.
    let mut paths = sh("rm -rf e; ln -s /etc e");
    paths.output_paths = vec!["e/shadow".into()];

    for (what, command) in [
        ("file", file),
        ("directory", dir),
        ("working directory", wd),
        ("output_paths", paths),
    ] {
        let r = run(&c, &command, &empty).await;
        let (code, message) = code_of(&r);
        let stderr = match &r.result {
            Some(res) => read_blob(&c, res.stderr_digest.as_ref().unwrap()).await,
            None => Default::default(),
        };
        assert_eq!(
            code,
            Code::FailedPrecondition,
            "{what}: {message} {stderr:?}"
        );
        assert!(message.contains("is a symlink"), "{what}: {message}");
        for blob in returned_bytes(&c, &r).await {
            assert_ne!(blob, shadow, "{what}: the host's /etc/shadow came back");
        }
    }

    // A symlink output itself is returned as a symlink, not followed.
    let mut link = sh("ln -s /etc/shadow s");
    link.output_files = vec!["s".into()];
    let r = run(&c, &link, &empty).await;
    let res = r.result.expect("a result");
    assert!(res.output_files.is_empty());
    assert_eq!(res.output_file_symlinks[0].target, "/etc/shadow");
}

#[tokio::test]
async fn inputs_cannot_be_rewritten_appended_or_chmodded() {
    let h = up(&[]);
    let c = channel(&h).await;
    let data = b"pristine input\n".as_slice();
    let tool = b"#!/bin/sh\necho pristine tool\n".as_slice();
    upload(&c, &[data, tool]).await;
    let mut root = Directory::default();
    root.files.push(file_node("in.txt", data, false));
    root.files.push(file_node("tool.sh", tool, true));

    let attack = sh(
        "printf x > in.txt; printf y >> in.txt; chmod u+w in.txt; chmod 666 in.txt; printf z > in.txt; \
         printf 'echo pwned' > tool.sh; chmod u+w tool.sh; printf 'echo pwned' >> tool.sh; \
         dd if=/dev/zero of=in.txt bs=1 count=1 conv=notrunc; exit 0",
    );
    let r = run(&c, &attack, &root).await;
    assert_eq!(code_of(&r).0, Code::Ok, "{:?}", r.status);

    for (d, bytes) in [(Digest::of(data), data), (Digest::of(tool), tool)] {
        assert_eq!(
            read_blob(&c, &d.to_proto()).await.as_ref(),
            bytes,
            "the CAS blob"
        );
        let on_disk = h
            .dir
            .path()
            .join("data/cas")
            .join(&d.hash_hex()[..2])
            .join(d.hash_hex());
        assert_eq!(std::fs::read(&on_disk).unwrap(), bytes, "the store's file");
    }
    let mut check = sh("cat in.txt; ./tool.sh");
    check.output_files = vec![];
    let r = run(&c, &check, &root).await;
    let out = read_blob(&c, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
    assert_eq!(
        out.as_ref(),
        b"pristine input\npristine tool\n",
        "the next action sees pristine inputs"
    );
}

#[tokio::test]
async fn actions_cannot_reach_the_data_dir_or_other_workspaces() {
    let h = up(&[]);
    let c = channel(&h).await;
    let data = h.dir.path().join("data");
    let mut command = sh(
        "ls \"$DATA\" 2>&1; mkdir -p \"$DATA/ac\" 2>&1; echo forged > \"$DATA/ac/forged\" 2>&1; \
         ls \"$DATA/executor/actions\" 2>&1; cat /etc/shadow 2>&1; id -un; exit 0",
    );
    command.environment_variables.push(EnvironmentVariable {
        name: "DATA".into(),
        value: data.display().to_string(),
    });
    let r = run(&c, &command, &Directory::default()).await;
    let res = r.result.expect("a result");
    let out = String::from_utf8_lossy(&read_blob(&c, res.stdout_digest.as_ref().unwrap()).await)
        .into_owned();
    assert!(!data.join("ac/forged").exists(), "{out}");
    assert!(!out.contains("cas"), "the data dir's listing leaked: {out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("root:"), "/etc/shadow was readable: {out}");
    assert!(out.trim_end().ends_with("hearth-action"), "{out}");
}

#[tokio::test]
async fn processes_end_with_the_action_after_exit_and_timeout() {
    let h = up(&[]);
    let c = channel(&h).await;
    let sleep = unique_sleep();
    let exits = sh(&format!(
        "setsid sleep {sleep} </dev/null >/dev/null 2>&1 & (sleep {sleep} </dev/null >/dev/null 2>&1 &) ; exit 0"
    ));
    let r = run(&c, &exits, &Directory::default()).await;
    assert_eq!(code_of(&r).0, Code::Ok);
    assert_eq!(
        gone(&sleep).await,
        Vec::<String>::new(),
        "leftovers after exit"
    );

    let root = upload_msg(&c, &Directory::default()).await;
    let cd = upload_msg(
        &c,
        &sh(&format!(
            "setsid sleep {sleep} </dev/null >/dev/null 2>&1 & sleep 60"
        )),
    )
    .await;
    let action = upload_msg(
        &c,
        &hearth_proto::reapi::Action {
            command_digest: Some(cd.to_proto()),
            input_root_digest: Some(root.to_proto()),
            timeout: Some(hearth_proto::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    let (_, r) = execute(&c, action, true).await.unwrap();
    assert_eq!(code_of(&r).0, Code::DeadlineExceeded);
    assert_eq!(
        gone(&sleep).await,
        Vec::<String>::new(),
        "leftovers after a timeout"
    );
}

#[tokio::test]
async fn processes_end_when_the_executor_is_killed() {
    let mut h = up(&[]);
    let c = channel(&h).await;
    let sleep = unique_sleep();
    let root = upload_msg(&c, &Directory::default()).await;
    let cd = upload_msg(
        &c,
        &sh(&format!(
            "setsid sleep {sleep} </dev/null >/dev/null 2>&1 & sleep 60"
        )),
    )
    .await;
    let action = action_of(&c, cd, root).await;
    let cc = c.clone();
    let pending = tokio::spawn(async move { execute(&cc, action, true).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(&sleep).is_empty() {
        assert!(Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.child.kill().expect("kill -9 hearth up");
    h.child.wait().expect("reaping hearth");
    assert_eq!(
        gone(&sleep).await,
        Vec::<String>::new(),
        "leftovers after kill -9 of the executor"
    );
    pending.abort();
}

#[tokio::test]
async fn odd_outputs_fail_promptly_naming_the_path() {
    let h = up(&[]);
    let c = channel(&h).await;
    let empty = Directory::default();
    let mut fifo = sh("mkfifo out");
    fifo.output_paths = vec!["out".into()];
    let mut fifo_inside = sh("mkdir -p d && mkfifo d/p");
    fifo_inside.output_directories = vec!["d".into()];
    let mut dir_as_file = sh("mkdir -p f");
    dir_as_file.output_files = vec!["f".into()];
    let mut file_as_dir = sh("echo x > d");
    file_as_dir.output_directories = vec!["d".into()];
    for (command, path, kind) in [
        (fifo, "\"out\"", "FIFO"),
        (fifo_inside, "\"d/p\"", "FIFO"),
        (dir_as_file, "\"f\"", "is a directory"),
        (file_as_dir, "\"d\"", "is a regular file"),
    ] {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(30), run(&c, &command, &empty))
            .await
            .expect("the executor never hangs on an odd output");
        let (code, message) = code_of(&r);
        assert_eq!(code, Code::FailedPrecondition, "{message}");
        assert!(
            message.contains(path) && message.contains(kind),
            "{message}"
        );
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

#[tokio::test]
async fn dot_segments_that_stay_beneath_the_root_are_accepted() {
    let h = up(&[]);
    let c = channel(&h).await;
    // BuildStream 2's shape: a nested working directory, "." and a path
    // climbing back to the root.
    let mut command = sh("echo here > f && mkdir -p ../../install && echo i > ../../install/x");
    command.working_directory = "a/b".into();
    command.output_paths = vec![".".into(), "../../install".into()];
    let r = run(&c, &command, &Directory::default()).await;
    assert_eq!(code_of(&r).0, Code::Ok, "{:?}", r.status);
    let res = r.result.unwrap();
    let paths: Vec<&str> = res
        .output_directories
        .iter()
        .map(|d| d.path.as_str())
        .collect();
    assert_eq!(paths, [".", "../../install"]);

    let mut out = sh("true");
    out.output_paths = vec!["../x".into()];
    let root = upload_msg(&c, &Directory::default()).await;
    let cd = upload_msg(&c, &out).await;
    let action = action_of(&c, cd, root).await;
    let e = execute(&c, action, true).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("climbs out"), "{e}");
}
