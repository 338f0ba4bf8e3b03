//! Warm runners shared across executors through the CAS (issue 11): a key
//! warmed on one executor is started on another from the snapshot the first
//! stored (its file and its cached Docker image are there); a snapshot with
//! a damaged chunk, or of another format, is not used, and the action runs
//! in a fresh VM.

mod common;

use common::remote::*;
use common::vm::*;
use common::*;

fn accel() -> String {
    std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into())
}

/// Waits until executor `id` offers microVMs.
/// A shared snapshot's manifest: the files' sizes, the data chunks, and
/// the bytes its blobs take.
async fn manifest_stats(c: &Channel, s: &hearth_proto::worker::SharedSnapshot) -> (u64, u64, u64) {
    let d = s.manifest.clone().unwrap();
    let body = read_blob(
        c,
        &hearth_proto::reapi::Digest {
            hash: d.hash,
            size_bytes: d.size_bytes,
        },
    )
    .await;
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let (mut files, mut chunks, mut stored) = (0, 0, 0);
    for f in m["files"].as_array().unwrap() {
        files += f["size"].as_u64().unwrap();
        for chunk in f["chunks"].as_array().unwrap() {
            chunks += 1;
            stored += chunk["blob_size"].as_u64().unwrap();
        }
    }
    (files, chunks, stored)
}

/// Files under `dir` whose name holds `hash`.
fn blob_files(dir: &std::path::Path, hash: &str, found: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            blob_files(&p, hash, found);
        } else if p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(hash))
        {
            found.push(p);
        }
    }
}

#[tokio::test]
async fn a_warm_runner_moves_to_another_executor_through_the_cas() {
    let registry = hearth_testkit::Registry::start("");
    // A stand-in for ubuntu:20.04 (no registry but ours is reachable here).
    hearth_testkit::push_busybox_image(&registry.host, "library/ubuntu", "20.04", &[]).await;
    let mirror = format!("http://{}", registry.host);
    let srv = server(&[]);
    let c = channel(&srv).await;
    let accel = accel();
    let flags = [
        "--capacity",
        "1",
        "--vm",
        &accel,
        "--insecure-registry",
        &registry.host,
        "--docker-mirror",
        &mirror,
    ];
    let e1 = executor_with(&srv, &srv.addr, "e1", &flags);
    wait_for_vm_on(&c, "e1").await;

    // Warmed on e1: a file and a pulled image.
    let docker = [
        FC,
        ("init-dockerd", "true"),
        ("recycle-runner", "true"),
        ("runner-recycling-key", "shared"),
    ];
    let r = run_vm_script(
        &c,
        "docker pull -q ubuntu:20.04 && echo kept > /tmp/state",
        &docker,
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.text);
    let shared = wait_for_within(&c, "e1 to share its runner", 300, |s| {
        !s.shared_snapshots.is_empty()
    })
    .await;
    assert_eq!(shared.shared_snapshots.len(), 1, "{shared:?}");
    let docker_key = shared.shared_snapshots[0].affinity_key.clone();
    let (files, chunks, stored) = manifest_stats(&c, &shared.shared_snapshots[0]).await;
    eprintln!(
        "shared snapshot of a recycled Docker VM: {files} bytes of files, {chunks} data chunks, {stored} bytes stored"
    );
    assert!(
        stored > 0 && stored < files,
        "zero chunks left out, others compressed"
    );

    // e2 has never run the key; e1 goes away (killed: its warm VM with it).
    let e2 = executor_with(&srv, &srv.addr, "e2", &flags);
    wait_for_vm_on(&c, "e2").await;
    drop(e1);
    let r = run_vm_script(
        &c,
        "cat /tmp/state 2>/dev/null || echo fresh; \
         docker image inspect ubuntu:20.04 >/dev/null 2>&1 && echo image-cached; \
         docker run --rm ubuntu:20.04 echo PASS",
        &docker,
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.text);
    for want in ["kept", "image-cached", "PASS"] {
        assert!(r.text.contains(want), "missing {want:?} on e2:\n{}", r.text);
    }
    assert_eq!(r.kind(), "fetched", "{}", r.text);
    eprintln!(
        "e2's first warm action: ready in {:?} ms (fetch included), round trip {:?}",
        r.start.as_ref().map(|s| s.ready_millis),
        r.took
    );

    // A plain key warmed on e2, its snapshot damaged in the server's CAS:
    // e3 does not use it, and runs the action in a fresh VM.
    let plain = [
        FC,
        ("recycle-runner", "true"),
        ("runner-recycling-key", "plain"),
    ];
    let r = run_vm_script(&c, "echo kept > /tmp/state", &plain).await;
    assert_eq!(r.code, 0, "{}", r.text);
    let s = wait_for_within(&c, "e2 to share the plain runner", 300, |s| {
        s.shared_snapshots.len() == 2
    })
    .await;
    let manifest = s
        .shared_snapshots
        .iter()
        .find(|s| s.affinity_key != docker_key)
        .and_then(|s| s.manifest.clone())
        .unwrap();
    let body = read_blob(
        &c,
        &hearth_proto::reapi::Digest {
            hash: manifest.hash.clone(),
            size_bytes: manifest.size_bytes,
        },
    )
    .await;
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut damaged = 0;
    for f in m["files"].as_array().unwrap() {
        for chunk in f["chunks"].as_array().unwrap() {
            let mut files = vec![];
            blob_files(
                &srv.dir.path().join("data"),
                chunk["blob"].as_str().unwrap(),
                &mut files,
            );
            for p in files {
                let mut bytes = std::fs::read(&p).unwrap();
                bytes[0] ^= 0xff;
                let _ = std::fs::remove_file(&p);
                std::fs::write(&p, &bytes).unwrap();
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0, "found the chunks in the server's CAS");
    let e3 = executor_with(&srv, &srv.addr, "e3", &flags);
    wait_for_vm_on(&c, "e3").await;
    drop(e2);
    let r = run_vm_script(&c, "cat /tmp/state 2>/dev/null || echo fresh", &plain).await;
    assert_eq!(r.code, 0, "{}", r.text);
    assert!(r.text.contains("fresh"), "{}", r.text);
    assert_ne!(r.kind(), "fetched", "{}", r.text);

    // e3 shares the plain runner it just ran. An executor of another
    // version reports a snapshot of another format for it (the same files,
    // intact): e4 refuses it, saying why, and runs the action fresh.
    let damaged_hash = manifest.hash.clone();
    let s = wait_for_within(&c, "e3 to share the plain runner", 300, |s| {
        s.shared_snapshots.iter().any(|x| {
            x.affinity_key != docker_key
                && x.manifest.as_ref().is_some_and(|m| m.hash != damaged_hash)
        })
    })
    .await;
    let ours = s
        .shared_snapshots
        .iter()
        .find(|s| s.affinity_key != docker_key)
        .unwrap()
        .clone();
    let theirs = ours.manifest.clone().unwrap();
    let body = read_blob(
        &c,
        &hearth_proto::reapi::Digest {
            hash: theirs.hash,
            size_bytes: theirs.size_bytes,
        },
    )
    .await;
    let mut m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["format"], 1, "the format this executor writes");
    m["format"] = 2.into();
    let other = serde_json::to_vec(&m).unwrap();
    let other_digest = upload(&c, &[&other]).await.remove(0).to_proto();
    let newer = common::worker::FakeExecutor::connect(&c, "newer", vec![]).await;
    newer.report(hearth_proto::worker::Report {
        shared_snapshots: vec![hearth_proto::worker::SharedSnapshot {
            manifest: Some(hearth_proto::worker::Digest {
                hash: other_digest.hash.clone(),
                size_bytes: other_digest.size_bytes,
            }),
            ..ours.clone()
        }],
        ..Default::default()
    });
    wait_for(&c, "the server to know the other format", |s| {
        s.shared_snapshots.iter().any(|x| {
            x.manifest
                .as_ref()
                .is_some_and(|m| m.hash == other_digest.hash)
        })
    })
    .await;
    let log = srv.dir.path().join("e4.log");
    let e4 = executor_logging(&srv, &srv.addr, "e4", &flags, &log);
    wait_for_vm_on(&c, "e4").await;
    drop(e3);
    let r = run_vm_script(&c, "cat /tmp/state 2>/dev/null || echo fresh", &plain).await;
    assert_eq!(r.code, 0, "{}", r.text);
    assert!(r.text.contains("fresh"), "{}", r.text);
    assert_ne!(r.kind(), "fetched", "{}", r.text);
    drop(e4);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("has format 2/"),
        "e4 names the format it refused:\n{log}"
    );
    drop(newer);
}
