//! Setting up the microVM runner for an executor: find the kernel, agent and
//! default image, build the initramfs, pick the accelerator with a probe
//! boot, and only then offer `firecracker`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hearth_executor::Runner;
use hearth_guest::protocol::{ROOT_SERIAL, SCRATCH_SERIAL, WORK_SERIAL};
use hearth_vm::{
    detect_accel, host_tsc_khz, initramfs, Accel, BootFiles, DiskFormat, DiskSpec, QemuVmm,
    VmRunner, VmRunnerConfig, VmSpec, Vmm,
};

use crate::cli::VmOptions;

/// `container-image` references resolved by the OCI image store.
struct Images(hearth_image::ImageStore);

#[async_trait::async_trait]
impl hearth_vm::ImageSource for Images {
    async fn resolve(
        &self,
        reference: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<hearth_vm::ResolvedImage, hearth_executor::ExecError> {
        let creds = credentials.map(|(u, p)| hearth_image::Credentials {
            username: u.to_string(),
            password: p.to_string(),
        });
        match self.0.resolve(reference, creds.as_ref()).await {
            Ok(image) => Ok(hearth_vm::ResolvedImage {
                path: image.path,
                env: image.config.env,
                name: format!("image {reference} ({})", image.manifest_digest),
                hold: hearth_vm::ImageHold::new(image.lease),
            }),
            Err(e) => Err(hearth_executor::ExecError::Coded {
                code: e.grpc_code(),
                message: format!("container-image=docker://{reference}: {e}"),
            }),
        }
    }
}

/// The static agent binary built by scripts/install.sh for the guest target
/// (a dynamically linked build of it, e.g. from `cargo build`, can't be /init).
fn find_agent(opts: &VmOptions) -> Result<PathBuf> {
    if let Some(p) = &opts.guest_agent {
        if !hearth_executor::is_static_elf(p) {
            bail!(
                "--guest-agent {} is not a statically linked executable",
                p.display()
            );
        }
        return Ok(p.clone());
    }
    hearth_executor::find_static_binary("hearth-guest").with_context(|| {
        format!(
            "no statically linked hearth-guest agent near {} (build it with scripts/install.sh, or pass --guest-agent)",
            std::env::current_exe().unwrap_or_default().display()
        )
    })
}

async fn probe(vmm: &QemuVmm, dir: &Path, image: &Path) -> Result<()> {
    let run = dir.join(format!("probe-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&run)?;
    let scratch = run.join("scratch.img");
    let work = run.join("work.img");
    for p in [&scratch, &work] {
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal"])
            .arg(p)
            .arg("64M")
            .output()?;
        if !out.status.success() {
            bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let spec = VmSpec {
        vcpus: 1,
        memory_mib: 256,
        disks: vec![
            DiskSpec {
                path: image.to_path_buf(),
                serial: ROOT_SERIAL.into(),
                read_only: true,
                format: DiskFormat::Raw,
            },
            DiskSpec {
                path: scratch,
                serial: SCRATCH_SERIAL.into(),
                read_only: false,
                format: DiskFormat::Raw,
            },
            DiskSpec {
                path: work,
                serial: WORK_SERIAL.into(),
                read_only: false,
                format: DiskFormat::Raw,
            },
        ],
        network: false,
        forwards: vec![],
        run_dir: run.join("run"),
        memory_file: None,
        memory_private: false,
        incoming: None,
    };
    let result = vmm.boot(&spec).await;
    let _ = std::fs::remove_dir_all(&run);
    let mut vm = result?;
    vm.kill().await;
    Ok(())
}

/// The host's RAM in MiB (MemTotal in /proc/meminfo).
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// The largest VM an action may ask for: `--vm-max-memory-mib` (default the
/// host's RAM), `--vm-max-cpus` (default the host's cores),
/// `--vm-max-disk-bytes`. The default size must fit under them.
fn max_vm_size(opts: &VmOptions) -> Result<hearth_vm::VmSize> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = match opts.vm_max_memory_mib {
        Some(m) => m,
        None => host_memory_mib().context("reading MemTotal from /proc/meminfo")?,
    };
    let max = hearth_vm::VmSize {
        vcpus: opts.vm_max_cpus.unwrap_or(cores),
        memory_mib,
        disk_bytes: opts.vm_max_disk_bytes,
    };
    check_default_fits(opts, max)?;
    Ok(max)
}

fn check_default_fits(opts: &VmOptions, max: hearth_vm::VmSize) -> Result<()> {
    if max.vcpus == 0 {
        bail!("--vm-max-cpus must be at least 1");
    }
    if opts.vm_memory_mib > max.memory_mib {
        bail!(
            "--vm-memory-mib={} is over --vm-max-memory-mib={}",
            opts.vm_memory_mib,
            max.memory_mib
        );
    }
    if opts.vm_disk_bytes > max.disk_bytes {
        bail!(
            "--vm-disk-bytes={} is over --vm-max-disk-bytes={}",
            opts.vm_disk_bytes,
            max.disk_bytes
        );
    }
    Ok(())
}

/// The VM runner, or why there is none: microVMs are off, or don't work
/// here. The reason is logged (at INFO, WARN when `--vm kvm` or `tcg` asked
/// for them), and the executor reports it to the server for `hearth status`.
pub async fn runner(
    opts: &VmOptions,
    work_dir: &Path,
    cas: &hearth_executor::LocalCas,
) -> Result<(Arc<dyn Runner>, Accel), String> {
    let why = if opts.mode == "off" {
        "off (--vm off)".to_string()
    } else {
        match setup(opts, work_dir, cas.clone()).await {
            Ok(r) => return Ok(r),
            Err(e) => format!("{e:#}"),
        }
    };
    if opts.mode == "kvm" || opts.mode == "tcg" {
        tracing::warn!("microVMs unavailable, not offering firecracker: {why}");
    } else {
        tracing::info!("microVMs unavailable, not offering firecracker: {why}");
    }
    Err(why)
}

async fn setup(
    opts: &VmOptions,
    work_dir: &Path,
    cas: hearth_executor::LocalCas,
) -> Result<(Arc<dyn Runner>, Accel)> {
    let max_size = max_vm_size(opts)?;
    let kdir = &opts.vm_kernel_dir;
    let release = std::fs::read_to_string(kdir.join("release")).with_context(|| {
        format!(
            "no guest kernel in {} (run scripts/install-vm.sh)",
            kdir.display()
        )
    })?;
    // The uncompressed kernel boots faster; the bzImage works too.
    let kernel = [kdir.join("vmlinux"), kdir.join("vmlinuz")]
        .into_iter()
        .find(|k| k.is_file())
        .with_context(|| format!("no vmlinux or vmlinuz in {}", kdir.display()))?;
    let modules = kdir.join("modules").join(release.trim());
    let agent = find_agent(opts)?;
    if !opts.vm_default_image.is_file() {
        bail!(
            "no default image at {} (run scripts/install-vm.sh)",
            opts.vm_default_image.display()
        );
    }
    let vm_dir = work_dir.join("vms");
    let clean_dir = work_dir.join("vm-clean");
    hearth_vm::kill_stale(&vm_dir);
    hearth_vm::kill_stale(&clean_dir);
    if vm_dir.exists() {
        let _ = std::fs::remove_dir_all(&vm_dir);
    }
    std::fs::create_dir_all(&vm_dir)?;
    let initrd = initramfs::build(&agent, &modules, &work_dir.join("vm-cache"))
        .context("building the initramfs")?;
    let version = hearth_vm::qemu_version(&opts.qemu)
        .await
        .with_context(|| format!("running {}", opts.qemu.display()))?;
    let k = kernel.clone();
    let kernel_id = tokio::task::spawn_blocking(move || hearth_vm::hash_file(&k))
        .await
        .context("hashing the guest kernel")??;
    let make = |accel: Accel| QemuVmm {
        kernel_id: kernel_id.clone(),
        version: version.clone(),
        qemu: opts.qemu.clone(),
        boot: BootFiles {
            kernel: kernel.clone(),
            initramfs: initrd.clone(),
        },
        accel,
        tsc_khz: host_tsc_khz(),
        boot_timeout: match accel {
            Accel::Kvm => Duration::from_secs(10),
            // Emulated boots take ~2.5 s alone, much longer on a busy host.
            Accel::Tcg => Duration::from_secs(90),
        },
        control_timeout: Duration::from_secs(opts.vm_control_timeout_secs.max(1)),
        forward_exe: std::env::current_exe().unwrap_or_else(|_| "hearth".into()),
    };
    let forced = match opts.mode.as_str() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    };
    let accel = detect_accel(forced, |a| {
        let vmm = make(a);
        let dir = vm_dir.clone();
        let image = opts.vm_default_image.clone();
        async move {
            match probe(&vmm, &dir, &image).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!("KVM probe boot failed, using software emulation: {e:#}");
                    false
                }
            }
        }
    })
    .await;
    let vmm = make(accel);
    let t = std::time::Instant::now();
    // One retry: an emulated boot on a loaded host can hang (see FACTS).
    if let Err(first) = probe(&vmm, &vm_dir, &opts.vm_default_image).await {
        tracing::warn!("probe boot with {accel} failed, retrying: {first:#}");
        probe(&vmm, &vm_dir, &opts.vm_default_image)
            .await
            .with_context(|| format!("probe boot with {accel}"))?;
    }
    tracing::info!(accelerator = %accel, probe_boot_ms = t.elapsed().as_millis() as u64, "microVMs ready");
    // Registries on this host's loopback that VMs may use, at the same address.
    let loopback: Vec<std::net::SocketAddr> = opts
        .insecure_registries
        .iter()
        .filter_map(|r| {
            r.replace("localhost", "127.0.0.1")
                .parse::<std::net::SocketAddr>()
                .ok()
        })
        .filter(|a| a.ip().is_loopback())
        .collect();
    let forwarder = hearth_vm::forward::Forwarder::start(&work_dir.join("vm-forward"), &loopback)
        .context("serving forwards to host registries")?;
    let forwards = forwarder.sockets().to_vec();
    let default_size = hearth_vm::VmSize {
        vcpus: 1,
        memory_mib: opts.vm_memory_mib,
        disk_bytes: opts.vm_disk_bytes,
    };
    let config = VmRunnerConfig {
        work_dir: vm_dir,
        default_image: opts.vm_default_image.clone(),
        default_size,
        max_size,
        forwards,
        docker_mirrors: opts.docker_mirrors.clone(),
        insecure_registries: opts.insecure_registries.clone(),
        pool_max_vms: opts.vm_pool_size,
        pool_max_memory_mib: opts.vm_pool_memory_mib,
        snapshot_dir: (opts.vm_snapshots > 0).then(|| work_dir.join("vm-snapshots")),
        snapshot_max: opts.vm_snapshots,
        clean_dir: (opts.vm_clean_snapshots == "on").then_some(clean_dir),
        clean_max_bytes: opts.vm_snapshot_bytes,
        dockerd_timeout: Duration::from_secs(opts.vm_dockerd_timeout_secs.max(1)),
    };
    let images = hearth_image::ImageStore::new(hearth_image::ImageConfig {
        cache_dir: work_dir.join("images"),
        insecure_registries: opts.insecure_registries.clone(),
        max_bytes: opts.image_cache_max_bytes,
    })
    .context("opening the image cache")?;
    let images: Arc<dyn hearth_vm::ImageSource> = Arc::new(Images(images));
    let runner = Arc::new(
        VmRunner::new(Arc::new(vmm), Some(images), config, Some(cas)).with_forwarder(forwarder),
    );
    let r = runner.clone();
    tokio::spawn(async move { r.prepare_default_snapshot().await });
    Ok((runner, accel))
}
