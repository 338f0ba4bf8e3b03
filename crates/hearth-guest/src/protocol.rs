//! Length-prefixed JSON frames over the VM's virtio-serial port named
//! [`PORT_NAME`]: a 4-byte big-endian length, then a JSON document. The guest
//! speaks first with [`Response::Hello`]; after that the host sends one
//! [`Request`] at a time and reads exactly one [`Response`].

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on any incompatible change; the host refuses other versions.
pub const PROTOCOL_VERSION: u32 = 2;
/// The virtio-serial port name the agent listens on.
pub const PORT_NAME: &str = "hearth.agent";
/// Serial numbers of the VM's disks, which the guest finds them by.
pub const ROOT_SERIAL: &str = "hearth-root";
pub const SCRATCH_SERIAL: &str = "hearth-scratch";
pub const WORK_SERIAL: &str = "hearth-work";
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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub exit_code: i32,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    pub user_micros: u64,
    pub system_micros: u64,
    pub max_rss_kib: u64,
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
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Request::Shutdown).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), req);
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Request::Shutdown);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        let err = read_frame::<Request>(&mut buf.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
