//! MicroVM execution (`workload-isolation-type=firecracker`) through a real
//! `hearth up`: QEMU under software emulation here (KVM where the host has
//! it), the Debian cloud kernel, the default image built by
//! scripts/install-vm.sh.

mod common;

use std::time::{Duration, Instant};

use common::vm::*;
use common::*;
use tonic::Code;

#[tokio::test]
async fn action_runs_inside_a_microvm_and_returns_outputs() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let mut spec = ActionSpec::new(
        "uname -r; hostname; cat /proc/1/comm; mkdir -p out && tr a-z A-Z < in.txt > out/result.txt; echo oops >&2; exit 3",
    );
    spec.files = vec![("in.txt", b"made inside the vm")];
    spec.outputs = vec!["out/result.txt"];
    spec.platform = vec![FC];
    let action = make_action(&c, &spec).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    assert_eq!(
        resp.status.clone().unwrap_or_default().code,
        0,
        "{:?}",
        resp.status
    );
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 3);
    let stdout = String::from_utf8(
        read_blob(&c, r.stdout_digest.as_ref().unwrap())
            .await
            .to_vec(),
    )
    .unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        guest_kernel_release(),
        "ran on the guest kernel: {stdout}"
    );
    assert_ne!(
        lines[0],
        String::from_utf8(
            std::process::Command::new("uname")
                .arg("-r")
                .output()
                .unwrap()
                .stdout
        )
        .unwrap()
        .trim()
    );
    assert_eq!(lines[1], "hearth-vm");
    assert_eq!(lines[2], "init", "our agent is PID 1");
    assert_eq!(
        read_blob(&c, r.stderr_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"oops\n"
    );
    assert_eq!(r.output_files.len(), 1);
    assert_eq!(
        read_blob(&c, r.output_files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"MADE INSIDE THE VM"
    );
}

#[tokio::test]
async fn timeout_kills_the_vm() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let mut spec = ActionSpec::new("echo begun; sleep 600");
    spec.platform = vec![FC];
    spec.timeout_secs = Some(3);
    let action = make_action(&c, &spec).await;
    let t = Instant::now();
    let (_, resp) = execute(&c, action, false).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(60));
    let status = resp.status.unwrap();
    assert_eq!(
        status.code,
        Code::DeadlineExceeded as i32,
        "{}",
        status.message
    );
    // The agent enforced the timeout, so what was printed still comes back.
    let r = resp.result.unwrap();
    assert_eq!(
        read_blob(&c, r.stdout_digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"begun\n",
        "partial logs of a timed-out VM action"
    );
    // No VM process and no VM directory outlive the action.
    let vms = h.dir.path().join("data/executor/vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "leftovers: {left:?}");
    let qemus = std::process::Command::new("pgrep")
        .args(["-f", &vms.display().to_string()])
        .output()
        .unwrap();
    assert!(
        qemus.stdout.is_empty(),
        "QEMU still running: {}",
        String::from_utf8_lossy(&qemus.stdout)
    );
}

#[tokio::test]
async fn guest_reaches_allowed_registries_but_no_other_host_service() {
    let allowed = loopback_service("registry-ok\n");
    let secret = loopback_service("host-secret\n");
    let allowed_flag = format!("127.0.0.1:{allowed}");
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "tcg".into());
    let h = up(&["--vm", &accel, "--insecure-registry", &allowed_flag]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let script = format!(
        "try() {{ timeout 5 bash -c \"head -c 12 < /dev/tcp/$1/$2\" 2>/dev/null || echo blocked; }}; \
         echo \"allowed=$(try 127.0.0.1 {allowed})\"; \
         echo \"alias=$(try 10.0.2.2 {secret})\"; \
         echo \"alias-allowed=$(try 10.0.2.2 {allowed})\"; \
         echo \"loopback=$(try 127.0.0.1 {secret})\"; \
         echo \"eth0=$(test -e /sys/class/net/eth0 && echo present || echo none)\""
    );
    let (_, out, _) = run_script(&c, &script, &[FC, ("network", "external")]).await;
    assert!(
        out.contains("allowed=registry-ok"),
        "the allowed registry is reachable at its host address:\n{out}"
    );
    assert!(
        out.contains("alias=blocked"),
        "QEMU's host alias must not reach host services:\n{out}"
    );
    assert!(out.contains("alias-allowed=blocked"), "{out}");
    assert!(out.contains("loopback=blocked"), "{out}");
    assert!(
        out.contains("eth0=present"),
        "network=external has an interface:\n{out}"
    );

    // network=off: no interface at all, and the registry is not reachable.
    let (_, out, _) = run_script(&c, &script, &[FC, ("network", "off")]).await;
    assert!(
        out.contains("eth0=none") && out.contains("allowed=blocked"),
        "{out}"
    );
}

#[tokio::test]
async fn bad_images_fail_with_a_precise_status() {
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "tcg".into());
    // A registry address nothing listens on, allowed over plain HTTP.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let dead_flag = format!("127.0.0.1:{dead_port}");
    let h = up(&["--vm", &accel, "--insecure-registry", &dead_flag]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let cases = [
        (
            format!("docker://127.0.0.1:{dead_port}/team/app:1"),
            Code::Unavailable,
            "team/app",
        ),
        (
            "docker://Not A Reference!".to_string(),
            Code::InvalidArgument,
            "Not A Reference!",
        ),
        (
            "ubuntu:20.04".to_string(),
            Code::InvalidArgument,
            "docker://",
        ),
    ];
    for (image, code, named) in cases {
        let mut spec = ActionSpec::new("true");
        spec.platform = vec![FC, ("container-image", &image)];
        let action = make_action(&c, &spec).await;
        let (_, resp) = execute(&c, action, false).await.unwrap();
        let status = resp.status.unwrap();
        assert_eq!(status.code, code as i32, "{image}: {}", status.message);
        assert!(
            status.message.contains(named),
            "{image}: message should name {named:?}: {}",
            status.message
        );
        assert!(resp.result.is_none() || resp.result.unwrap().exit_code == 0);
    }
}

#[tokio::test]
async fn custom_image_from_a_local_registry_with_credentials_and_user() {
    let dir = tempfile::tempdir().unwrap();
    let auth = hearth_testkit::Registry::htpasswd_yaml(dir.path(), "ci", "s3cret");
    let registry = hearth_testkit::Registry::start_with(&auth, "", dir);
    let basic = format!("Basic {}", base64_encode(b"ci:s3cret"));
    hearth_testkit::push_busybox_image_with_auth(
        &registry.host,
        "team/tools",
        "1",
        &[("etc/hearth-test", b"custom image\n", 0o644)],
        Some(basic),
    )
    .await;
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "tcg".into());
    let h = up(&["--vm", &accel, "--insecure-registry", &registry.host]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let image = format!("docker://{}/team/tools:1", registry.host);

    let mut spec = ActionSpec::new("cat /etc/hearth-test; id -u; echo made-by-$(id -un) > out.txt");
    spec.outputs = vec!["out.txt"];
    spec.platform = vec![
        FC,
        ("container-image", &image),
        ("container-registry-username", "ci"),
        ("container-registry-password", "s3cret"),
        ("dockerUser", "builder"),
    ];
    let action = make_action(&c, &spec).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    assert_eq!(
        resp.status.clone().unwrap_or_default().code,
        0,
        "{:?}",
        resp.status
    );
    let r = resp.result.unwrap();
    let stdout = read_blob(&c, r.stdout_digest.as_ref().unwrap()).await;
    let stderr = read_blob(&c, r.stderr_digest.as_ref().unwrap()).await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "custom image\n1000\n",
        "stderr: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(
        read_blob(&c, r.output_files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"made-by-builder\n"
    );

    // Without credentials the registry refuses the pull, and the action says so.
    let mut spec = ActionSpec::new("true");
    spec.platform = vec![FC, ("container-image", &image)];
    let action = make_action(&c, &spec).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    let status = resp.status.unwrap();
    assert_eq!(
        status.code,
        Code::PermissionDenied as i32,
        "{}",
        status.message
    );
    assert!(status.message.contains("team/tools"), "{}", status.message);
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn killed_executor_takes_its_vms_with_it() {
    let mut h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let mut spec = ActionSpec::new("sleep 600");
    spec.platform = vec![FC];
    let action = make_action(&c, &spec).await;
    let running = tokio::spawn({
        let c = c.clone();
        async move { execute(&c, action, false).await }
    });
    let vms = h.dir.path().join("data/executor/vms");
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu_pids(&vms).is_empty() {
        assert!(Instant::now() < deadline, "the VM never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_pids(&vms).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived its executor: {}",
            qemu_pids(&vms)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.abort();
}

#[tokio::test]
async fn recycled_runner_keeps_state_but_not_the_workspace() {
    let h = up_vm();
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let warm = [FC, ("recycle-runner", "true")];
    let (code, out, cold) = run_script(
        &c,
        &format!("echo kept > /tmp/state; echo leftover > out1.txt; {LEAVE_BACKGROUND_PROCESS}"),
        &warm,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out, resumed) = run_script(
        &c,
        "cat /tmp/state; test ! -e out1.txt && echo clean-workspace; kill -0 $(cat /tmp/bg) && echo bg-alive",
        &warm,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kept"),
        "state from run 1 is visible in run 2: {out}"
    );
    assert!(
        out.contains("clean-workspace"),
        "each action starts with an empty workspace: {out}"
    );
    assert!(
        out.contains("bg-alive"),
        "processes left running survive the pause: {out}"
    );
    assert!(
        resumed < cold,
        "resumed {resumed:?} should beat cold {cold:?}"
    );

    // Another key (runner-recycling-key) never gets that VM.
    let other = [
        FC,
        ("recycle-runner", "true"),
        ("runner-recycling-key", "other"),
    ];
    let (_, out, _) = run_script(&c, "cat /tmp/state 2>/dev/null || echo fresh", &other).await;
    assert!(out.contains("fresh"), "{out}");

    // A failed action's VM is not recycled.
    let (code, _, _) = run_script(&c, "cat /tmp/state; exit 1", &warm).await;
    assert_eq!(code, 1);
    let (_, out, _) = run_script(&c, "cat /tmp/state 2>/dev/null || echo fresh", &warm).await;
    assert!(
        out.contains("fresh"),
        "the VM of a failed action was recycled: {out}"
    );
}

/// `init-dockerd=true`: dockerd answers before the command starts, and with
/// `recycle-runner=true` the next action finds the same dockerd (same start
/// time) still running. An image without dockerd is FAILED_PRECONDITION
/// naming the image.
#[tokio::test]
async fn dockerd_is_started_and_survives_recycling() {
    let registry = hearth_testkit::Registry::start("");
    hearth_testkit::push_busybox_image(&registry.host, "team/nodocker", "1", &[]).await;
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "tcg".into());
    let h = up(&["--vm", &accel, "--insecure-registry", &registry.host]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let docker = [FC, ("init-dockerd", "true"), ("recycle-runner", "true")];
    let (code, out, fresh) = run_script(
        &c,
        "docker info -f 'server={{.ServerVersion}}' && stat -c %Y /var/run/docker.pid > /tmp/dockerd-started",
        &docker,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("server=20."), "{out}");
    let (code, out, recycled) = run_script(
        &c,
        "test \"$(stat -c %Y /var/run/docker.pid)\" = \"$(cat /tmp/dockerd-started)\" && echo same-dockerd; docker info -f 'server={{.ServerVersion}}'",
        &docker,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("same-dockerd") && out.contains("server=20."),
        "{out}"
    );
    eprintln!("init-dockerd action: fresh {fresh:?}, recycled {recycled:?}");
    assert!(recycled < fresh, "recycled {recycled:?} vs fresh {fresh:?}");

    let image = format!("docker://{}/team/nodocker:1", registry.host);
    let mut spec = ActionSpec::new("true");
    spec.platform = vec![FC, ("init-dockerd", "true"), ("container-image", &image)];
    let action = make_action(&c, &spec).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    let status = resp.status.unwrap();
    assert_eq!(
        status.code,
        Code::FailedPrecondition as i32,
        "{}",
        status.message
    );
    assert!(
        status.message.contains("team/nodocker") && status.message.contains("no dockerd"),
        "{}",
        status.message
    );
}

/// The seed scenario: `docker run --rm ubuntu:20.04 echo PASS` inside a VM
/// with `init-dockerd=true`, the image served by a local registry used as
/// dockerd's mirror; then, with `recycle-runner=true`, the next action finds
/// dockerd still up (same start time), the image cached, and a container the
/// first run left behind still running.
#[tokio::test]
async fn docker_in_the_vm_fresh_and_recycled() {
    let registry = hearth_testkit::Registry::start("");
    // A stand-in for ubuntu:20.04 (no registry but ours is reachable here).
    hearth_testkit::push_busybox_image(&registry.host, "library/ubuntu", "20.04", &[]).await;
    let mirror = format!("http://{}", registry.host);
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "tcg".into());
    let h = up(&[
        "--vm",
        &accel,
        "--insecure-registry",
        &registry.host,
        "--docker-mirror",
        &mirror,
    ]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let docker = [FC, ("init-dockerd", "true"), ("recycle-runner", "true")];
    let first = "docker run --rm ubuntu:20.04 echo PASS && \
                 docker run -d --name keeper ubuntu:20.04 sleep 3600 >/dev/null && \
                 stat -c %Y /var/run/docker.pid > /tmp/dockerd-started";
    let (code, out, fresh) = run_script(&c, first, &docker).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PASS"), "{out}");
    let second = "test \"$(stat -c %Y /var/run/docker.pid)\" = \"$(cat /tmp/dockerd-started)\" && echo same-dockerd; \
                  docker image inspect ubuntu:20.04 >/dev/null && echo image-cached; \
                  docker container inspect -f '{{.State.Running}}' keeper; \
                  docker run --rm ubuntu:20.04 echo PASS";
    let (code, out, recycled) = run_script(&c, second, &docker).await;
    assert_eq!(code, 0, "{out}");
    for want in ["same-dockerd", "image-cached", "true", "PASS"] {
        assert!(
            out.contains(want),
            "missing {want:?} in the recycled run:\n{out}"
        );
    }
    eprintln!("docker action: fresh {fresh:?}, recycled {recycled:?}");
    assert!(recycled < fresh, "recycled {recycled:?} vs fresh {fresh:?}");
}

#[tokio::test]
async fn vm_sizes_over_the_operator_caps_are_invalid_argument() {
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into());
    let h = up(&[
        "--vm",
        &accel,
        "--vm-max-memory-mib",
        "2048",
        "--vm-max-cpus",
        "1",
        "--vm-max-disk-bytes",
        "8GiB",
    ]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    for (prop, value, cap) in [
        ("EstimatedMemory", "64GB", "--vm-max-memory-mib=2048"),
        // More vCPUs than allowed is refused, not clamped to the cap.
        ("EstimatedCPU", "2", "--vm-max-cpus=1"),
        (
            "EstimatedFreeDiskBytes",
            "9GiB",
            "--vm-max-disk-bytes=8589934592",
        ),
    ] {
        let mut spec = ActionSpec::new("echo should not run");
        spec.platform = vec![FC, (prop, value)];
        let action = make_action(&c, &spec).await;
        let (_, resp) = execute(&c, action, true).await.unwrap();
        let status = resp.status.unwrap_or_default();
        assert_eq!(
            status.code,
            Code::InvalidArgument as i32,
            "{prop}={value}: {}",
            status.message
        );
        assert!(
            status
                .message
                .contains(&format!("{prop}={value} exceeds this executor's cap {cap}")),
            "{}",
            status.message
        );
    }
    // Within the caps it runs.
    let (code, out, _) = run_script(
        &c,
        "nproc",
        &[FC, ("EstimatedCPU", "1"), ("EstimatedMemory", "512MiB")],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "1"));
}

/// A socket address holds 108 bytes; a VM's sockets live in its run
/// directory under the data dir. However deep that is, VMs are offered and
/// every socket works: the agent's and QMP (boot, pause, save, restore) and
/// the forward to an allowed registry on the host's loopback (served by the
/// executor, connected to by `hearth forward-unix`), after a restore too.
#[tokio::test]
async fn vms_work_under_a_data_dir_deeper_than_a_socket_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = dir.path().to_path_buf();
    for i in 0..5 {
        data.push(format!("{i}-a-rather-long-directory-name"));
    }
    let data = data.to_str().unwrap().to_string();
    assert!(data.len() > 150, "{data}");
    let registry = loopback_service("registry-ok\n");
    let allowed = format!("127.0.0.1:{registry}");
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into());
    let h = spawn_listening(
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--vm",
            &accel,
            "--insecure-registry",
            &allowed,
            // Every recycled VM is evicted at once, so saved and restored.
            "--vm-pool-size",
            "0",
        ],
        dir,
    );
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let snapshots = std::path::Path::new(&data).join("executor/vm-snapshots");
    let saved = || std::fs::read_dir(&snapshots).map_or(0, |l| l.count());
    let reach = format!(
        "cat /tmp/state 2>/dev/null || echo fresh; \
         echo \"registry=$(timeout 20 bash -c 'head -c 11 < /dev/tcp/127.0.0.1/{registry}')\""
    );
    let warm = [FC, ("recycle-runner", "true"), ("network", "external")];
    let (code, out, _) = run_script(&c, &format!("echo kept > /tmp/state; {reach}"), &warm).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("registry=registry-ok"), "{out}");
    // Parking (here: straight to disk) ends after the result is back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while saved() != 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(saved(), 1, "the VM was paused and saved through QMP");

    let (code, out, _) = run_script(&c, &reach, &warm).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kept"),
        "the saved VM was restored, not booted afresh: {out}"
    );
    assert!(
        out.contains("registry=registry-ok"),
        "the restored VM reaches the registry: {out}"
    );
}

/// The attack: team-b sends the same recycle-runner platform (and instance
/// name) as team-a, hoping for team-a's warm VM with its files and
/// processes. It gets a fresh VM; team-a's stays warm for team-a.
#[tokio::test]
async fn a_warm_runner_never_crosses_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path());
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into());
    let h = up_in(dir, &["--vm", &accel, "--auth-keys", &keys]);
    let a = channel_with_key(&h, Some("key-a")).await;
    let b = channel_with_key(&h, Some("key-b")).await;
    wait_for_vm_executor(&a).await;
    let warm = [FC, ("recycle-runner", "true")];
    let (code, out, _) = run_script(&a, "echo team-a-was-here > /tmp/state", &warm).await;
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = run_script(&b, "cat /tmp/state 2>/dev/null || echo fresh", &warm).await;
    assert!(out.contains("fresh") && !out.contains("team-a"), "{out}");
    let (_, out, _) = run_script(&a, "cat /tmp/state 2>/dev/null || echo fresh", &warm).await;
    assert!(
        out.contains("team-a-was-here"),
        "team-a's VM is still its own: {out}"
    );
}
