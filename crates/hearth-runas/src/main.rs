//! `hearth-runas UID GID PROGRAM [ARG…]`: the last step into a host-action
//! sandbox, run by bubblewrap as root inside the sandbox's namespaces. It
//! drops every supplementary group, switches to GID and UID (checking that
//! neither can be regained), sets `no_new_privs`, and execs PROGRAM, found on
//! the `PATH` of its environment (the action's) as `execvp` would.
//!
//! Written here rather than using util-linux's `setpriv`, which does the
//! same: `setpriv` is dynamically linked and took ~1.1 ms per action on the
//! project's machines; this is a static binary of a few system calls, built
//! with the guest agent by `scripts/install.sh`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

fn die(code: i32, message: &str) -> ! {
    eprintln!("hearth-runas: {message}");
    std::process::exit(code)
}

fn id(arg: Option<&OsString>, what: &str) -> u32 {
    arg.and_then(|a| a.to_str())
        .and_then(|s| s.parse().ok())
        .filter(|&n| n != 0)
        .unwrap_or_else(|| {
            die(
                126,
                &format!(
                    "usage: hearth-runas UID GID PROGRAM [ARG…] ({what} must be a non-root id)"
                ),
            )
        })
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let uid = id(args.get(1), "UID");
    let gid = id(args.get(2), "GID");
    let Some(program) = args.get(3) else {
        die(126, "usage: hearth-runas UID GID PROGRAM [ARG…]");
    };
    // SAFETY: plain system calls on integers and a null list; no memory of
    // ours is touched.
    let dropped = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(gid, gid, gid) == 0
            && libc::setresuid(uid, uid, uid) == 0
            && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    };
    // SAFETY: as above; these only read the process's credentials.
    let regained =
        unsafe { libc::setuid(0) == 0 || libc::getuid() != uid || libc::geteuid() != uid };
    if !dropped || regained {
        die(
            126,
            &format!(
                "could not drop to uid {uid} gid {gid}: {}",
                std::io::Error::last_os_error()
            ),
        );
    }
    let err = std::process::Command::new(program).args(&args[4..]).exec();
    let code = if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    die(code, &format!("cannot run {program:?}: {err}"))
}
