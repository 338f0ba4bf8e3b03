//! Length-prefixed JSON frames over the VM's virtio-serial port named
//! [`PORT_NAME`]: a 4-byte big-endian length, then a JSON document. The guest
//! speaks first with [`Response::Hello`]; after that the host sends one
//! [`Request`] at a time and reads exactly one [`Response`].

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on any incompatible change; the host refuses other versions.
pub const PROTOCOL_VERSION: u32 = 4;
/// The virtio-serial port name the agent listens on.
pub const PORT_NAME: &str = "hearth.agent";
/// Serial numbers of the VM's disks, which the guest finds them by.
pub const ROOT_SERIAL: &str = "hearth-root";
pub const SCRATCH_SERIAL: &str = "hearth-scratch";
pub const WORK_SERIAL: &str = "hearth-work";
/// The raw output disk: no filesystem, the agent writes a tar stream onto it
/// (see [`Request::PackOutputs`]).
pub const OUT_SERIAL: &str = "hearth-out";
/// The tar entry type the agent gives a socket (tar has none; lowercase `s`
/// is unassigned in POSIX, GNU and star), so that the host can name it.
pub const SOCKET_ENTRY_TYPE: u8 = b's';
/// In the output archive: entries `stdout` and `stderr`, then outputs as
/// `root/<path beneath the input root>`.
pub const OUTPUT_ROOT_PREFIX: &str = "root/";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Sets the guest's wall clock (after boot, after a resume).
    SetClock {
        unix_nanos: u64,
    },
    /// The VM was just restored from a snapshot, possibly one of many clones
    /// of it: mixes `seed` (host randomness) into the kernel's entropy pool,
    /// credited, and makes the kernel reseed its CRNG at once, so no two
    /// clones share random state; then sets the clock, which is as old as
    /// the snapshot.
    Restored {
        unix_nanos: u64,
        seed: Vec<u8>,
    },
    /// Mounts the disk with this serial (ext4, read-write) at `path`. (The
    /// workspace disk attached at boot is mounted at /work by init.)
    MountDisk {
        serial: String,
        path: String,
    },
    /// Syncs and unmounts `path`, dropping the device's cached blocks.
    Unmount {
        path: String,
    },
    Exec(ExecRequest),
    /// Writes a tar stream onto the raw disk with serial `serial`: entry
    /// `stdout` (the file `stdout`), entry `stderr`, then for every path in
    /// `paths` (relative to `root`, normalized, `/`-separated; empty: `root`
    /// itself) that exists, `root/<path>` — a regular file, a symlink (never
    /// followed), a directory with everything in it, or, for the host to
    /// report, a FIFO, device or socket. A symlink where a parent of a path
    /// should be is packed as that symlink. Then the device is synced.
    /// Answers `Packed`.
    PackOutputs {
        root: String,
        paths: Vec<String>,
        stdout: String,
        stderr: String,
        serial: String,
    },
    /// Starts dockerd (unless it is already running) and waits until it
    /// answers on /var/run/docker.sock. `Error` if the image has no dockerd.
    StartDockerd {
        args: Vec<String>,
        timeout_secs: u64,
    },
    /// Syncs the filesystems and powers the VM off.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Absolute path inside the guest.
    pub cwd: String,
    /// `uid`, `uid:gid`, `name` or `name:group`; None runs as root.
    pub user: Option<String>,
    /// Files (guest paths) that receive the command's stdout and stderr.
    pub stdout_path: String,
    pub stderr_path: String,
    /// Sets the guest clock first (saves a round trip after boot or resume).
    #[serde(default)]
    pub clock_unix_nanos: Option<u64>,
    /// The agent kills the command's process group after this long and
    /// answers `Exited` with `timed_out`. None: no limit.
    #[serde(default)]
    pub timeout_millis: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        kernel_release: String,
        /// Milliseconds since the guest kernel started.
        uptime_millis: u64,
    },
    Pong,
    Ok,
    Error {
        message: String,
    },
    Exited(ExitStatus),
    /// The outputs are on the output disk: `bytes` of tar stream.
    Packed {
        bytes: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub exit_code: i32,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    pub user_micros: u64,
    pub system_micros: u64,
    pub max_rss_kib: u64,
    /// The command ran past `ExecRequest::timeout_millis` and was killed.
    #[serde(default)]
    pub timed_out: bool,
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let req = Request::Exec(ExecRequest {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b".into())],
            cwd: "/work/root".into(),
            user: Some("1000:1000".into()),
            stdout_path: "/work/stdout".into(),
            stderr_path: "/work/stderr".into(),
            clock_unix_nanos: Some(1),
            timeout_millis: Some(2000),
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Request::Shutdown).unwrap();
        let pack = Request::PackOutputs {
            root: "/work/root".into(),
            paths: vec!["out/a".into(), "".into()],
            stdout: "/work/stdout".into(),
            stderr: "/work/stderr".into(),
            serial: OUT_SERIAL.into(),
        };
        write_frame(&mut buf, &pack).unwrap();
        let restored = Request::Restored {
            unix_nanos: 7,
            seed: vec![1, 2, 255],
        };
        write_frame(&mut buf, &restored).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), req);
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Request::Shutdown);
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), pack);
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), restored);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        let err = read_frame::<Request>(&mut buf.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
