//! `init-dockerd=true`: a Docker daemon that outlives the action (and, in a
//! recycled VM, the next ones), with its data on the scratch disk (a real
//! ext4, since overlay2 can't sit on overlayfs).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_guest::reap;

const SOCKET: &str = "/var/run/docker.sock";
const DATA_ROOT: &str = "/.hearth/scratch/docker";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// True when dockerd answers `GET /_ping` with OK.
fn answers() -> bool {
    let Ok(mut s) = UnixStream::connect(SOCKET) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.ends_with("OK")
}

fn find_dockerd() -> Option<String> {
    PATH.split(':')
        .map(|d| format!("{d}/dockerd"))
        .find(|p| fs::metadata(p).is_ok())
}

pub fn ensure_running(args: &[String], timeout: Duration) -> Result<(), String> {
    if answers() {
        return Ok(());
    }
    let dockerd = find_dockerd().ok_or("the image has no dockerd (looked in /usr/local/sbin, /usr/local/bin, /usr/sbin, /usr/bin, /sbin, /bin)")?;
    fs::create_dir_all(DATA_ROOT).map_err(|e| format!("creating {DATA_ROOT}: {e}"))?;
    let log = fs::File::create("/run/dockerd.log")
        .map_err(|e| format!("creating /run/dockerd.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    // Once `child` is dropped the reaper drops dockerd's exit status: it
    // outlives this request, and a later one finds it by its socket.
    let child = reap::spawn(
        Command::new(&dockerd)
            .arg("--data-root")
            .arg(DATA_ROOT)
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2),
    )
    .map_err(|e| format!("starting {dockerd}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if answers() {
            return Ok(());
        }
        if let Some(status) = child.try_exit() {
            return Err(format!(
                "dockerd exited (code {}) before it answered: {}",
                status.exit_code,
                log_tail()
            ));
        }
        if Instant::now() > deadline {
            child.kill(false);
            return Err(format!(
                "dockerd did not answer within {}s: {}",
                timeout.as_secs(),
                log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail() -> String {
    let text = fs::read_to_string("/run/dockerd.log").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
