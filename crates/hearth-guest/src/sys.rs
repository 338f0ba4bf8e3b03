//! Thin, checked wrappers over the system calls PID 1 needs.

use std::ffi::CString;
use std::io;
use std::path::Path;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} contains NUL")))
}

fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{}: {e}", what())))
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    check(ret, || format!("mount {source} on {target} ({fstype})"))
}

pub fn move_mount(source: &str, target: &str) -> io::Result<()> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    // SAFETY: valid C strings; MS_MOVE ignores fstype and data.
    let ret = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    check(ret, || format!("move mount {source} to {target}"))
}

pub fn umount(target: &str) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid C string.
    let ret = unsafe { libc::umount2(t.as_ptr(), 0) };
    check(ret, || format!("umount {target}"))
}

pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: valid C string.
    check(unsafe { libc::chroot(p.as_ptr()) }, || {
        format!("chroot {path}")
    })?;
    std::env::set_current_dir("/")
}

/// Loads a kernel module from a file; an already-loaded module is fine.
pub fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = cstr("")?;
    use std::os::fd::AsRawFd;
    // SAFETY: fd is open for the duration of the call; params is a valid C string.
    let ret =
        unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(io::Error::new(
        e.kind(),
        format!("loading {}: {e}", path.display()),
    ))
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

pub fn power_off() -> ! {
    sync();
    // SAFETY: we are PID 1; RB_POWER_OFF ends the VM.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(0)
}

pub fn set_clock(unix_nanos: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    check(
        unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) },
        || "clock_settime".into(),
    )
}

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` from `<linux/random.h>`
/// (`_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)`); the libc crate has
/// neither.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Adds `seed` to the kernel's entropy pool, credited in full, and makes
/// the CRNG reseed from it now (not at its next scheduled reseed), so that
/// clones of one snapshot diverge before anything reads random numbers.
/// Writing to /dev/urandom would mix without crediting or reseeding: two
/// clones could still hand out the same numbers.
pub fn reseed(seed: &[u8]) -> io::Result<()> {
    if seed.is_empty() || seed.len() > 512 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a seed of {} bytes (1 to 512)", seed.len()),
        ));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as libc::c_int).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as libc::c_int).to_ne_bytes());
    info.extend_from_slice(seed);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    use std::os::fd::AsRawFd;
    let fd = random.as_raw_fd();
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes
    // that follow its header; the kernel only reads it.
    let added = unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) };
    check(added, || "RNDADDENTROPY".into())?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) }, || {
        "RNDRESEEDCRNG".into()
    })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        || "sethostname".into(),
    )
}

/// Drops the block device's cached buffers, so that content written to its
/// backing file by the host is seen afresh.
pub fn flush_block_device(dev: &str) -> io::Result<()> {
    let f = std::fs::File::open(dev)?;
    use std::os::fd::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument; fd is open.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) }, || {
        format!("BLKFLSBUF {dev}")
    })
}

/// Brings a network interface up, optionally with an IPv4 address/netmask.
pub fn interface_up(name: &str, addr: Option<([u8; 4], [u8; 4])>) -> io::Result<()> {
    // SAFETY: socket() with constant arguments.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        if let Some((ip, mask)) = addr {
            for (value, op) in [(ip, libc::SIOCSIFADDR), (mask, libc::SIOCSIFNETMASK)] {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(value),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in the ifreq union's sockaddr.
                unsafe {
                    std::ptr::write(
                        std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                        sin,
                    );
                }
                // SAFETY: req is a valid ifreq for this ioctl.
                check(unsafe { libc::ioctl(sock, op as _, &req) }, || {
                    format!("configuring {name}")
                })?;
            }
        }
        check(
            // SAFETY: req is a valid ifreq naming the interface; the kernel
            // fills its flags.
            unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) },
            || format!("flags of {name}"),
        )?;
        // SAFETY: reading/writing the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        check(
            // SAFETY: req is a valid ifreq with the flags just set.
            unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req) },
            || format!("bringing {name} up"),
        )
    })();
    // SAFETY: closing our own socket.
    unsafe { libc::close(sock) };
    result
}

/// Adds a default IPv4 route via `gateway`.
pub fn default_route(gateway: [u8; 4]) -> io::Result<()> {
    // SAFETY: socket() with constant arguments.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: rtentry is plain data; zeroed is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    let any = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let gw = libc::sockaddr_in {
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(gateway),
        },
        ..any
    };
    // SAFETY: sockaddr_in fits in sockaddr.
    unsafe {
        std::ptr::write(
            std::ptr::addr_of_mut!(rt.rt_dst).cast::<libc::sockaddr_in>(),
            any,
        );
        std::ptr::write(
            std::ptr::addr_of_mut!(rt.rt_genmask).cast::<libc::sockaddr_in>(),
            any,
        );
        std::ptr::write(
            std::ptr::addr_of_mut!(rt.rt_gateway).cast::<libc::sockaddr_in>(),
            gw,
        );
    }
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: rt is a valid rtentry.
    let ret = unsafe { libc::ioctl(sock, libc::SIOCADDRT as _, &rt) };
    // SAFETY: closing our own socket.
    unsafe { libc::close(sock) };
    check(ret, || "adding the default route".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request's layout is the kernel's: the running kernel (tests run
    /// as root, as the agent does) takes it. A wrong rand_pool_info header
    /// is EINVAL.
    #[test]
    fn the_kernel_takes_a_reseed() {
        reseed(&[0x5a; 32]).expect("RNDADDENTROPY and RNDRESEEDCRNG");
    }

    #[test]
    fn an_empty_or_huge_seed_is_refused() {
        assert_eq!(reseed(&[]).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            reseed(&[0; 513]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
