//! Builds the sandbox's root, once per sandbox: a read-only tmpfs holding the
//! host's visible directories (read-only, no setuid, no devices), a private
//! `/proc` and `/dev`, and empty mount points for each action's input root
//! (`/work/root`) and `/tmp`. The host's root stays mounted, covered, at
//! [`HOST`]; only PID 1 holds a descriptor to it, to bind each action's
//! workspace (a bind mount's source must be in the caller's namespace).

use std::ffi::CString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root};

/// Where the host's root stays, covered by an empty, unreadable tmpfs.
pub const HOST: &str = "/.hearth";
/// Where each action's input root is bound.
pub const WORK_ROOT: &str = "/work/root";
/// Where each action's `/tmp` is bound.
pub const TMP: &str = "/tmp";

/// Device nodes bound from the host's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn ctx<T>(r: nix::Result<T>, what: impl FnOnce() -> String) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn io<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn none() -> Option<&'static str> {
    None
}

fn mkdir(path: &Path, mode: u32) -> Result<(), String> {
    io(
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path),
        || format!("creating {}", path.display()),
    )?;
    // The mode of the last component, whatever the umask.
    io(
        fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        || format!("chmod {}", path.display()),
    )
}

fn tmpfs(target: &str, flags: MsFlags, options: &str) -> Result<(), String> {
    ctx(
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options)),
        || format!("mounting a tmpfs at {target}"),
    )
}

/// `mount_setattr(2)` (Linux 5.12) is not wrapped by nix or libc yet.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// Makes the mount at `path`, and every mount beneath it, read-only, nosuid
/// and nodev (a remount would change only the top one).
fn read_only_tree(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte", path.display()))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a path and a struct that live across the call; the kernel
    // only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(format!(
            "making {} read-only: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Shows the host's `path` (file or directory, read-only) at the same place
/// in the sandbox; a symlink is recreated as the same symlink. Missing paths
/// are skipped.
fn show(path: &Path) -> Result<(), String> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let host = Path::new(HOST).join(rel);
    let Ok(meta) = fs::symlink_metadata(&host) else {
        return Ok(());
    };
    if let Some(parent) = path.parent() {
        mkdir(parent, 0o755)?;
    }
    if meta.file_type().is_symlink() {
        let target = io(fs::read_link(&host), || {
            format!("reading {}", host.display())
        })?;
        return io(symlink(&target, path), || {
            format!("linking {} to {}", path.display(), target.display())
        });
    }
    if meta.is_dir() {
        mkdir(path, 0o755)?;
    } else {
        io(fs::File::create(path), || {
            format!("creating {}", path.display())
        })?;
    }
    ctx(
        mount(
            Some(&host),
            path,
            none(),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none(),
        ),
        || format!("binding {}", path.display()),
    )?;
    read_only_tree(path)
}

fn dev() -> Result<(), String> {
    mkdir(Path::new("/dev"), 0o755)?;
    tmpfs("/dev", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, "mode=0755")?;
    for name in DEVICES {
        let node = Path::new("/dev").join(name);
        let host = Path::new(HOST).join("dev").join(name);
        io(fs::File::create(&node), || {
            format!("creating {}", node.display())
        })?;
        ctx(
            mount(Some(&host), &node, none(), MsFlags::MS_BIND, none()),
            || format!("binding {}", node.display()),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        io(symlink(target, Path::new("/dev").join(link)), || {
            format!("linking /dev/{link}")
        })?;
    }
    // Root's, as in bubblewrap's /dev: not a place actions share files.
    mkdir(Path::new("/dev/shm"), 0o755)?;
    mkdir(Path::new("/dev/pts"), 0o755)?;
    ctx(
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        ),
        || "mounting /dev/pts".into(),
    )
}

/// Builds the root in a new mount namespace (the caller is already PID 1 of
/// its own PID namespace) and returns a descriptor of the host's root.
pub fn build(visible: &[PathBuf]) -> Result<OwnedFd, String> {
    ctx(unshare(CloneFlags::CLONE_NEWNS), || {
        "unsharing the mount namespace".into()
    })?;
    // Nothing done here reaches the host's namespace, nor the reverse.
    ctx(
        mount(
            none(),
            "/",
            none(),
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            none(),
        ),
        || "making / private".into(),
    )?;
    tmpfs("/tmp", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755")?;
    ctx(chdir("/tmp"), || "entering the new root".into())?;
    mkdir(Path::new(HOST.trim_start_matches('/')), 0o700)?;
    ctx(pivot_root(".", HOST.trim_start_matches('/')), || {
        "pivot_root".into()
    })?;
    ctx(chdir("/"), || "entering /".into())?;

    for path in visible {
        show(path)?;
    }
    mkdir(Path::new("/proc"), 0o555)?;
    ctx(
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none(),
        ),
        || "mounting /proc".into(),
    )?;
    dev()?;
    mkdir(Path::new(WORK_ROOT), 0o755)?;
    mkdir(Path::new(TMP), 0o1777)?;

    let host = ctx(
        open(
            HOST,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ),
        || format!("opening {HOST}"),
    )?;
    // SAFETY: `open` just returned this descriptor, owned by no one else.
    let host = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(host) };
    tmpfs(
        HOST,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=0000,size=4k",
    )?;
    ctx(
        mount(
            none(),
            "/",
            none(),
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            none(),
        ),
        || "making the root read-only".into(),
    )?;
    Ok(host)
}
