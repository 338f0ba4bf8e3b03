//! `hearth-guest`: PID 1 of a Hearth microVM. Boots the root filesystem (see
//! init.rs), then serves the host over the virtio-serial port named
//! `hearth.agent` (see protocol.rs), one request at a time.

mod dockerd;
mod forward;
mod init;
mod pack;
mod sys;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use hearth_guest::protocol::{
    read_frame, write_frame, Request, Response, PORT_NAME, PROTOCOL_VERSION,
};

/// Writes a line to the kernel log (which the host keeps as the console log).
pub fn log(msg: &str) {
    if let Ok(mut k) = OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write per record: /dev/kmsg turns each write into a log line.
        let _ = k.write_all(format!("hearth-guest: {msg}\n").as_bytes());
    }
}

fn find_port() -> Option<String> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        if fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME) {
            return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

fn uptime_millis() -> u64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn handle(req: Request) -> Response {
    let result: Result<Response, String> = match req {
        Request::Ping => Ok(Response::Pong),
        Request::SetClock { unix_nanos } => sys::set_clock(unix_nanos)
            .map(|_| Response::Ok)
            .map_err(|e| e.to_string()),
        Request::Restored { unix_nanos, seed } => sys::reseed(&seed)
            .map_err(|e| format!("reseeding the kernel's random numbers: {e}"))
            .inspect(|_| log("restored: kernel random numbers reseeded from the host"))
            .and_then(|_| sys::set_clock(unix_nanos).map_err(|e| format!("setting the clock: {e}")))
            .map(|_| Response::Ok),
        Request::MountDisk { serial, path } => {
            init::disk_by_serial(&serial, Duration::from_secs(5))
                .and_then(|dev| sys::mount(&dev, &path, "ext4", 0, ""))
                .map(|_| Response::Ok)
                .map_err(|e| e.to_string())
        }
        Request::Unmount { path } => {
            sys::sync();
            let dev = fs::read_to_string("/proc/mounts").ok().and_then(|m| {
                m.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.get(1) == Some(&path.as_str()))
                    .map(|f| f[0].to_string())
            });
            sys::umount(&path)
                .and_then(|_| dev.map_or(Ok(()), |d| sys::flush_block_device(&d)))
                .map(|_| Response::Ok)
                .map_err(|e| e.to_string())
        }
        Request::Exec(e) => {
            if let Some(nanos) = e.clock_unix_nanos {
                if let Err(err) = sys::set_clock(nanos) {
                    log(&format!("setting the clock: {err}"));
                }
            }
            hearth_guest::exec::run(&e).map(Response::Exited)
        }
        Request::PackOutputs {
            root,
            paths,
            stdout,
            stderr,
            serial,
        } => pack::pack(&root, &paths, &stdout, &stderr, &serial)
            .map(|bytes| Response::Packed { bytes }),
        Request::StartDockerd { args, timeout_secs } => {
            dockerd::ensure_running(&args, Duration::from_secs(timeout_secs)).map(|_| Response::Ok)
        }
        Request::Shutdown => sys::power_off(),
    };
    result.unwrap_or_else(|message| Response::Error { message })
}

fn serve(path: &str) -> std::io::Result<()> {
    // Keep the port open for the VM's life: closing it discards unread data.
    let mut port = OpenOptions::new().read(true).write(true).open(path)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Blocks until the host connects.
    write_frame(
        &mut port,
        &Response::Hello {
            version: PROTOCOL_VERSION,
            kernel_release: release.trim().to_string(),
            uptime_millis: uptime_millis(),
        },
    )?;
    loop {
        let req: Request = match read_frame(&mut port) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // No host connected at the moment; wait for one.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e),
        };
        let resp = handle(req);
        write_frame(&mut port, &resp)?;
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("hearth-guest is the init of a Hearth microVM; it must run as PID 1");
        std::process::exit(2);
    }
    // Every spawn starts it too; starting it here reports a failure early.
    if let Err(e) = hearth_guest::reap::start() {
        log(&e.to_string());
    }
    match init::boot() {
        Ok(opts) => {
            for port in opts.forwards {
                forward::spawn(port);
            }
        }
        Err(e) => {
            log(&format!("boot failed: {e}"));
            sys::power_off();
        }
    }
    let Some(port) = find_port() else {
        log("no virtio-serial port named hearth.agent");
        sys::power_off();
    };
    loop {
        if let Err(e) = serve(&port) {
            log(&format!("agent channel: {e}"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
