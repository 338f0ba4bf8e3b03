//! Letting a VM reach chosen services on the executor host's loopback (the
//! operator's `--insecure-registry 127.0.0.1:PORT`) and nothing else there.
//!
//! A VM with networking runs in its own network namespace, where 127.0.0.1
//! and QEMU's host alias 10.0.2.2 reach nothing. For each allowed service the
//! executor serves a Unix socket (filesystem, not network, namespace) that
//! connects to the service; QEMU's `guestfwd` runs `hearth forward-unix SOCK`
//! per guest connection to 10.0.2.100:PORT, and the guest agent relays
//! 127.0.0.1:PORT there, so the service has the same address inside the VM.
//! The sockets are bound and connected through [`SocketDir`], so their
//! paths may be of any length.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpStream;

use crate::sockdir::{self, SocketDir};

/// Unix sockets that connect to host TCP services, served until dropped.
pub struct Forwarder {
    sockets: Vec<(u16, PathBuf)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Forwarder {
    /// Serves `dir/PORT.sock` for each target; `dir` is made private
    /// (0700).
    pub fn start(dir: &Path, targets: &[SocketAddr]) -> io::Result<Self> {
        let sd = SocketDir::create_private(dir)?;
        let mut sockets = Vec::new();
        let mut tasks = Vec::new();
        for target in targets {
            let name = format!("{}.sock", target.port());
            let path = sd.real(&name);
            let listener = sd.bind(&name)?;
            let target = *target;
            tasks.push(tokio::spawn(async move {
                while let Ok((mut unix, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        match TcpStream::connect(target).await {
                            Ok(mut tcp) => {
                                let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                            }
                            Err(e) => tracing::warn!(%target, error = %e, "forward to host service failed"),
                        }
                    });
                }
            }));
            sockets.push((target.port(), path));
        }
        Ok(Forwarder { sockets, tasks })
    }

    pub fn sockets(&self) -> &[(u16, PathBuf)] {
        &self.sockets
    }
}

/// `hearth forward-unix SOCK`: joins stdin/stdout (QEMU's guestfwd pipe) to
/// the Unix socket. Blocking; returns when either side closes.
pub fn stdio_to_unix(path: &Path) -> io::Result<()> {
    let sock = sockdir::connect_std(path)?;
    let mut to_sock = sock.try_clone()?;
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut to_sock);
        let _ = to_sock.shutdown(std::net::Shutdown::Write);
    });
    // Not io::copy into stdout: Rust's stdout is line-buffered, and a
    // response body that doesn't end in a newline would sit in the buffer.
    let mut from_sock = sock;
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = io::Read::read(&mut from_sock, &mut buf)?;
        if n == 0 {
            break;
        }
        io::Write::write_all(&mut out, &buf[..n])?;
        io::Write::flush(&mut out)?;
    }
    drop(out);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unix_socket_reaches_the_tcp_service() {
        let tmp = tempfile::tempdir().unwrap();
        // Deeper than a socket address can name.
        let dir = tmp.path().join("f".repeat(100)).join("g".repeat(100));
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = service.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = service.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let fwd = Forwarder::start(&dir, &[addr]).unwrap();
        let (port, path) = fwd.sockets()[0].clone();
        assert_eq!(port, addr.port());
        assert!(path.starts_with(&dir));
        let c = tokio::task::spawn_blocking(move || sockdir::connect_std(&path))
            .await
            .unwrap()
            .unwrap();
        c.set_nonblocking(true).unwrap();
        let mut c = tokio::net::UnixStream::from_std(c).unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PING");
    }
}
