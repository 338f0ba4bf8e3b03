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

/// Longest one probe waits for dockerd's whole answer: a process squatting
/// on the socket and sending a byte now and then must not hold the agent
/// (a read timeout alone applies to each read, not the answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A ping answer is a few hundred bytes; more is not dockerd.
const PROBE_MAX_BYTES: usize = 4096;

/// True when dockerd answers `GET /_ping` with OK.
fn answers() -> bool {
    answers_at(std::path::Path::new(SOCKET), PROBE_TIMEOUT)
}

fn answers_at(socket: &std::path::Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_write_timeout(Some(limit));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if reply.len() + n <= PROBE_MAX_BYTES => reply.extend_from_slice(&buf[..n]),
            Ok(_) | Err(_) => return false,
        }
    }
    let reply = String::from_utf8_lossy(&reply);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve(
        dir: &std::path::Path,
        answer: impl Fn(UnixStream) + Send + 'static,
    ) -> std::path::PathBuf {
        let path = dir.join("docker.sock");
        let listener = UnixListener::bind(&path).expect("binding");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                answer(conn);
            }
        });
        path
    }

    #[test]
    fn a_real_answer_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = serve(dir.path(), |mut c| {
            let mut req = [0u8; 64];
            let _ = c.read(&mut req);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK");
        });
        assert!(answers_at(&path, Duration::from_secs(2)));
    }

    /// The attack: an action leaves a process on the socket that sends a
    /// byte every 100 ms, forever. The probe gives up within its bound.
    #[test]
    fn a_dribbling_socket_cannot_hold_the_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = serve(dir.path(), |mut c| {
            std::thread::spawn(move || {
                while c.write_all(b"H").is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        });
        let t = Instant::now();
        assert!(!answers_at(&path, Duration::from_millis(700)));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_flood_is_not_dockerd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = serve(dir.path(), |mut c| {
            std::thread::spawn(move || {
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
                let junk = vec![b'x'; 1 << 20];
                let _ = c.write_all(&junk);
            });
        });
        assert!(!answers_at(&path, Duration::from_secs(2)));
    }
}
