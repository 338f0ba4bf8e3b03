//! Boot: from the initramfs to the container image's root. Loads the modules
//! shipped in the initramfs, mounts the image read-only with a writable
//! scratch layer on top (overlayfs), switches root into it and sets up the
//! pseudo-filesystems a build (and dockerd) expects.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use hearth_guest::protocol::{ROOT_SERIAL, SCRATCH_SERIAL, WORK_SERIAL};

use crate::log;
use crate::sys;

/// Kernel command line options we read: `hearth.net=1` (configure eth0) and
/// `hearth.fwd=PORT,PORT` (host registries reachable at 127.0.0.1:PORT).
pub struct BootOptions {
    pub network: bool,
    pub forwards: Vec<u16>,
}

fn cmdline() -> BootOptions {
    let line = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let forwards = line
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("hearth.fwd="))
        .flat_map(|v| {
            v.split(',')
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    BootOptions {
        network: line.split_whitespace().any(|w| w == "hearth.net=1"),
        forwards,
    }
}

/// Finds `/dev/vdX` whose virtio serial is `serial`, waiting for it to appear.
pub fn disk_by_serial(serial: &str, wait: Duration) -> io::Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == serial) {
                    return Ok(format!("/dev/{name}"));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no disk with serial {serial}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Network drivers, loaded only when the VM has a network device (each
/// module load costs tens of milliseconds under emulation).
const NET_MODULES: &[&str] = &["failover.ko", "net_failover.ko", "virtio_net.ko"];

fn load_modules(network: bool) {
    let order = fs::read_to_string("/modules/order").unwrap_or_default();
    for name in order.lines().filter(|l| !l.trim().is_empty()) {
        if !network && NET_MODULES.contains(&name.trim()) {
            continue;
        }
        if let Err(e) = sys::load_module(&Path::new("/modules").join(name.trim())) {
            log(&format!("module {name}: {e}"));
        }
    }
}

/// Everything from power-on to a ready root filesystem.
pub fn boot() -> io::Result<BootOptions> {
    sys::mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    sys::mount("proc", "/proc", "proc", 0, "")?;
    sys::mount("sysfs", "/sys", "sysfs", 0, "")?;
    let opts = cmdline();
    load_modules(opts.network);

    let root = disk_by_serial(ROOT_SERIAL, Duration::from_secs(20))?;
    let scratch = disk_by_serial(SCRATCH_SERIAL, Duration::from_secs(20))?;
    // noload: never replay a journal on the shared read-only image.
    sys::mount(&root, "/lower", "ext4", libc::MS_RDONLY, "noload")?;
    sys::mount(&scratch, "/scratch", "ext4", 0, "")?;
    fs::create_dir_all("/scratch/upper")?;
    fs::create_dir_all("/scratch/work")?;
    sys::mount(
        "overlay",
        "/newroot",
        "overlay",
        0,
        "lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work",
    )?;
    // The scratch disk stays reachable inside the new root for tools that
    // need a real (non-overlay) filesystem, such as dockerd's data root.
    fs::create_dir_all("/newroot/.hearth/scratch")?;
    sys::move_mount("/scratch", "/newroot/.hearth/scratch")?;

    // Switch root: the initramfs can't be pivoted away, so move the new root
    // over / and chroot into it.
    std::env::set_current_dir("/newroot")?;
    sys::move_mount(".", "/")?;
    sys::chroot(".")?;

    sys::mount("proc", "/proc", "proc", 0, "")?;
    sys::mount("sysfs", "/sys", "sysfs", 0, "")?;
    sys::mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    sys::mount(
        "devpts",
        "/dev/pts",
        "devpts",
        0,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    sys::mount("tmpfs", "/dev/shm", "tmpfs", 0, "mode=1777")?;
    sys::mount("tmpfs", "/run", "tmpfs", 0, "mode=0755")?;
    sys::mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, "")?;
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = sys::sethostname("hearth-vm");
    if let Err(e) = sys::interface_up("lo", Some(([127, 0, 0, 1], [255, 0, 0, 0]))) {
        log(&format!("lo: {e}"));
    }
    // The workspace disk, when attached at boot, is ready at /work.
    if let Ok(work) = disk_by_serial(WORK_SERIAL, Duration::ZERO) {
        sys::mount(&work, "/work", "ext4", 0, "")?;
    }
    if opts.network {
        // QEMU user networking's fixed addresses.
        sys::interface_up("eth0", Some(([10, 0, 2, 15], [255, 255, 255, 0])))?;
        sys::default_route([10, 0, 2, 2])?;
        let _ = fs::write("/etc/resolv.conf", "nameserver 10.0.2.3\n");
    }
    Ok(opts)
}
