//! Registries the operator allowed on the executor host's loopback are
//! reachable in the guest at the same address, 127.0.0.1:PORT: the agent
//! relays each connection to QEMU's forwarding address 10.0.2.100:PORT,
//! which the host connects to the registry.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};

use crate::log;

/// The guest-side address QEMU forwards to the host (see the VM runner).
pub const HOST_FORWARD_ADDR: &str = "10.0.2.100";

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn relay(client: TcpStream, port: u16) -> io::Result<()> {
    let upstream = TcpStream::connect((HOST_FORWARD_ADDR, port))?;
    let (c2, u2) = (client.try_clone()?, upstream.try_clone()?);
    std::thread::spawn(move || pump(c2, u2));
    pump(upstream, client);
    Ok(())
}

/// Listens on 127.0.0.1:PORT for the life of the VM.
pub fn spawn(port: u16) {
    std::thread::spawn(move || {
        let listener = match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => l,
            Err(e) => return log(&format!("forward 127.0.0.1:{port}: {e}")),
        };
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = relay(client, port) {
                    log(&format!("forward 127.0.0.1:{port}: {e}"));
                }
            });
        }
    });
}
