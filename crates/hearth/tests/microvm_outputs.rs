//! MicroVM outputs through a real `hearth up`: the guest is root in its VM
//! and shapes its workspace as it likes, so symlinks to `/` where outputs
//! or the working directory should be must never make the host return (or
//! write) anything of its own. Also: FIFOs fail promptly, ordinary outputs
//! round-trip, and a recycled VM's output disk starts empty.

#![allow(deprecated)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::vm::*;
use common::*;
use hearth_proto::reapi::{self, ActionResult, Command, Directory, ExecuteResponse, Tree};
use prost::Message;
use tonic::Code;

#[derive(Default)]
struct Outputs<'a> {
    wd: &'a str,
    files: Vec<&'a str>,
    dirs: Vec<&'a str>,
    paths: Vec<&'a str>,
}

async fn run(
    c: &Channel,
    script: &str,
    out: Outputs<'_>,
    props: &[(&str, &str)],
) -> ExecuteResponse {
    let root = upload_msg(c, &Directory::default()).await;
    let mut all = vec![FC];
    all.extend_from_slice(props);
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        working_directory: out.wd.into(),
        output_files: out.files.iter().map(|s| s.to_string()).collect(),
        output_directories: out.dirs.iter().map(|s| s.to_string()).collect(),
        output_paths: out.paths.iter().map(|s| s.to_string()).collect(),
        platform: Some(platform(&all)),
        ..Default::default()
    };
    let cd = upload_msg(c, &command).await;
    let action = upload_msg(
        c,
        &reapi::Action {
            command_digest: Some(cd.to_proto()),
            input_root_digest: Some(root.to_proto()),
            timeout: Some(hearth_proto::protobuf::Duration {
                seconds: 400,
                nanos: 0,
            }),
            do_not_cache: true,
            ..Default::default()
        },
    )
    .await;
    execute(c, action, true).await.unwrap().1
}

/// Every blob an ActionResult refers to: logs, files, trees and the files
/// in them.
async fn blobs(c: &Channel, r: &ActionResult) -> Vec<Bytes> {
    let mut digests: Vec<reapi::Digest> = r
        .output_files
        .iter()
        .filter_map(|f| f.digest.clone())
        .chain(r.stdout_digest.clone())
        .chain(r.stderr_digest.clone())
        .collect();
    let mut out = Vec::new();
    for d in &r.output_directories {
        let tree = read_blob(c, d.tree_digest.as_ref().unwrap()).await;
        let t = Tree::decode(tree.clone()).unwrap();
        for dir in t.root.iter().chain(&t.children) {
            digests.extend(dir.files.iter().filter_map(|f| f.digest.clone()));
        }
        out.push(tree);
    }
    for d in digests {
        out.push(read_blob(c, &d).await);
    }
    out
}

/// The action must fail with FAILED_PRECONDITION naming `name`, or succeed
/// without any of the host's /etc/shadow in what it returns.
async fn assert_host_shadow_not_returned(c: &Channel, resp: ExecuteResponse, name: &str) {
    let status = resp.status.clone().unwrap_or_default();
    if status.code != 0 {
        assert_eq!(
            status.code,
            Code::FailedPrecondition as i32,
            "{}",
            status.message
        );
        assert!(
            status.message.contains(&format!("{name} is a symlink")),
            "names the symlink {name}: {}",
            status.message
        );
        return;
    }
    let r = resp.result.unwrap();
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    assert!(
        shadow.len() > 16,
        "the test needs a readable host /etc/shadow"
    );
    for b in blobs(c, &r).await {
        assert!(
            !b.windows(shadow.len()).any(|w| w == shadow.as_slice()),
            "the host's /etc/shadow came back"
        );
    }
    assert!(
        r.output_files.iter().all(|f| !f.path.ends_with("shadow")),
        "{r:?}"
    );
}

#[tokio::test]
async fn symlinked_outputs_and_working_directory_never_reach_the_host() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;

    // (a) an output file's parent replaced by a symlink to /.
    let out = Outputs {
        files: vec!["out/etc/shadow"],
        ..Default::default()
    };
    let resp = run(&c, "rm -rf out; ln -s / out", out, &[]).await;
    assert_host_shadow_not_returned(&c, resp, "out").await;

    // (b) an output directory's parent.
    let out = Outputs {
        dirs: vec!["d/etc"],
        ..Default::default()
    };
    let resp = run(&c, "rm -rf d; ln -s / d", out, &[]).await;
    assert_host_shadow_not_returned(&c, resp, "d").await;

    // (c) the working directory itself.
    let out = Outputs {
        wd: "wd",
        files: vec!["etc/shadow"],
        ..Default::default()
    };
    let resp = run(&c, "cd /work/root && rm -rf wd && ln -s / wd", out, &[]).await;
    assert_host_shadow_not_returned(&c, resp, "wd").await;

    // Nothing of the guest's was created on the host beside the workspace.
    assert!(!std::path::Path::new("/out").exists());
}

#[tokio::test]
async fn a_fifo_output_fails_promptly_naming_it() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let t = Instant::now();
    let out = Outputs {
        paths: vec!["out"],
        ..Default::default()
    };
    let resp = run(&c, "mkfifo out", out, &[]).await;
    let status = resp.status.unwrap_or_default();
    assert_eq!(
        status.code,
        Code::FailedPrecondition as i32,
        "{}",
        status.message
    );
    assert!(
        status.message.contains("output \"out\" is a FIFO"),
        "{}",
        status.message
    );
    assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
}

#[tokio::test]
async fn files_dirs_symlinks_and_executable_bits_round_trip() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let out = Outputs {
        wd: "w",
        files: vec!["t", "tl", "../up.txt"],
        dirs: vec!["d", "missing"],
        ..Default::default()
    };
    let script =
        "mkdir -p d/sub && echo a > d/sub/f && printf '#!/bin/sh\\n' > d/x && chmod 4755 d/x \
                  && ln -s sub/f d/l && echo top > t && ln -s t tl && echo up > ../up.txt";
    let resp = run(&c, script, out, &[]).await;
    assert_eq!(resp.status.clone().unwrap_or_default().code, 0, "{resp:?}");
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0);
    let mut files: Vec<(&str, bool)> = r
        .output_files
        .iter()
        .map(|f| (f.path.as_str(), f.is_executable))
        .collect();
    files.sort();
    assert_eq!(files, [("../up.txt", false), ("t", false)]);
    assert_eq!(r.output_file_symlinks.len(), 1);
    assert_eq!(r.output_file_symlinks[0].target, "t");
    assert_eq!(r.output_directories.len(), 1, "missing outputs are absent");
    let tree =
        Tree::decode(read_blob(&c, r.output_directories[0].tree_digest.as_ref().unwrap()).await)
            .unwrap();
    let d = tree.root.unwrap();
    assert_eq!(d.files.len(), 1);
    assert_eq!(d.files[0].name, "x");
    assert!(d.files[0].is_executable);
    assert_eq!(d.symlinks[0].name, "l");
    assert_eq!(d.symlinks[0].target, "sub/f");
    assert_eq!(d.directories[0].name, "sub");
    assert_eq!(
        read_blob(&c, tree.children[0].files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"a\n"
    );
}

/// Shell that prints how many non-zero bytes the first MiB of the output
/// disk holds, read from inside the guest.
const OUT_DISK_BYTES: &str = "for d in /sys/block/*; do \
     [ \"$(cat $d/serial 2>/dev/null)\" = hearth-out ] && \
     echo nonzero=$(head -c 1048576 /dev/${d##*/} | tr -d '\\000' | wc -c); done";

#[tokio::test]
async fn a_recycled_vm_starts_with_an_empty_output_disk() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let warm = [("recycle-runner", "true")];
    let out = || Outputs {
        paths: vec!["o"],
        ..Default::default()
    };
    let resp = run(
        &c,
        "echo first-action-output > o; echo kept > /tmp/state",
        out(),
        &warm,
    )
    .await;
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.output_files.len(), 1);

    let script = format!("cat /tmp/state; {OUT_DISK_BYTES}");
    let resp = run(&c, &script, out(), &warm).await;
    let r = resp.result.unwrap();
    let stdout = String::from_utf8_lossy(&read_blob(&c, r.stdout_digest.as_ref().unwrap()).await)
        .into_owned();
    assert!(stdout.contains("kept"), "the VM was recycled: {stdout}");
    assert!(
        stdout.contains("nonzero=0"),
        "the output disk was reset before the second action: {stdout}"
    );
    assert!(r.output_files.is_empty(), "{:?}", r.output_files);
}
