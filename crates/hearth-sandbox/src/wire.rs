//! The frames the executor and a sandbox's PID 1 exchange over a Unix stream
//! socket (the sandbox's stdin). A frame is a kind byte, a little-endian
//! `u32` payload length, and the payload.
//!
//! Sandbox → executor: [`READY`] once the root is built (or [`FAILED`] with
//! a message, then exit), [`EXITED`] with the action's exit code once it and
//! every process it started are gone, and [`KILLED`] in answer to every
//! [`KILL`]. Executor → sandbox: [`RUN`] with a [`Run`] payload and two
//! descriptors (stdout, stderr) attached to its first byte, and [`KILL`].
//!
//! Written by hand: a dozen lines of framing between two programs of this
//! repository, one of them a static binary that should stay small.

/// The sandbox is ready for an action.
pub const READY: u8 = b'R';
/// Setting up the sandbox failed; the payload says why.
pub const FAILED: u8 = b'F';
/// Run an action ([`Run`]; stdout and stderr attached).
pub const RUN: u8 = b'A';
/// Kill the running action, if any, and everything it started.
pub const KILL: u8 = b'K';
/// The action ended; the payload is its exit code ([`exit_code`]).
pub const EXITED: u8 = b'X';
/// Answers a [`KILL`], after any [`EXITED`] of the action it killed.
pub const KILLED: u8 = b'k';

/// The largest payload either side accepts (a Command's arguments and
/// environment are bounded by the server's metadata limit, 16 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Kind and length.
pub const HEADER: usize = 5;

/// One frame, encoded.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The kind and payload length of a header, refusing an oversized payload.
pub fn header(bytes: [u8; HEADER]) -> Result<(u8, usize), String> {
    let len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(format!(
            "a frame of {len} bytes is over the {MAX_PAYLOAD}-byte limit"
        ));
    }
    Ok((bytes[0], len))
}

/// A whole frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    /// Header and payload: how much of the buffer it took.
    pub len: usize,
}

/// The whole frame `buf` starts with, if it holds one yet.
pub fn split(buf: &[u8]) -> Result<Option<Whole<'_>>, String> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let mut h = [0; HEADER];
    h.copy_from_slice(head);
    let (kind, len) = header(h)?;
    Ok(buf.get(HEADER..HEADER + len).map(|payload| Whole {
        kind,
        payload,
        len: HEADER + len,
    }))
}

/// The payload of an [`EXITED`] frame.
pub fn exit_code(payload: &[u8]) -> Result<i32, String> {
    let bytes: [u8; 4] = payload
        .try_into()
        .map_err(|_| format!("an exit frame of {} bytes, not 4", payload.len()))?;
    Ok(i32::from_le_bytes(bytes))
}

/// One action to run. Paths and strings are bytes, as the kernel takes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    /// The input root on the host: absolute, with no symlinks.
    pub root: Vec<u8>,
    /// The action's `/tmp` on the host: absolute, with no symlinks.
    pub tmp: Vec<u8>,
    /// The working directory, relative to the input root.
    pub cwd: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    /// `NAME=VALUE` pairs.
    pub env: Vec<Vec<u8>>,
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Result<usize, String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or("a run frame ends inside a length")?;
        self.0 = rest;
        Ok(u32::from_le_bytes(*head) as usize)
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let len = self.u32()?;
        if len > self.0.len() {
            return Err(format!(
                "a run frame field of {len} bytes, with {} left",
                self.0.len()
            ));
        }
        let (field, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(field.to_vec())
    }

    fn list(&mut self) -> Result<Vec<Vec<u8>>, String> {
        let n = self.u32()?;
        // Each entry takes at least its 4-byte length.
        if n > self.0.len() / 4 {
            return Err(format!("a run frame list of {n} entries is too long"));
        }
        (0..n).map(|_| self.bytes()).collect()
    }
}

impl Run {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for field in [&self.root, &self.tmp, &self.cwd] {
            put(&mut out, field);
        }
        for list in [&self.argv, &self.env] {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for item in list {
                put(&mut out, item);
            }
        }
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Run, String> {
        let mut r = Reader(payload);
        let run = Run {
            root: r.bytes()?,
            tmp: r.bytes()?,
            cwd: r.bytes()?,
            argv: r.list()?,
            env: r.list()?,
        };
        if !r.0.is_empty() {
            return Err(format!("{} bytes after a run frame", r.0.len()));
        }
        if run.argv.is_empty() {
            return Err("a run frame with no arguments".into());
        }
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_round_trips() {
        let run = Run {
            root: b"/w/a/root".to_vec(),
            tmp: b"/w/a/tmp".to_vec(),
            cwd: b"sub/dir".to_vec(),
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), Vec::new()],
            env: vec![b"PATH=/bin".to_vec()],
        };
        assert_eq!(Run::decode(&run.encode()), Ok(run));
    }

    #[test]
    fn truncated_or_padded_runs_are_refused_without_panicking() {
        let bytes = Run {
            argv: vec![b"true".to_vec()],
            ..Run::default()
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(Run::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(Run::decode(&padded).is_err());
        // A list claiming more entries than the bytes could hold.
        let mut huge = Vec::new();
        for _ in 0..3 {
            put(&mut huge, b"");
        }
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Run::decode(&huge).unwrap_err().contains("too long"));
    }

    #[test]
    fn frames_split_only_when_whole() {
        let f = frame(EXITED, &7i32.to_le_bytes());
        for cut in 0..f.len() {
            assert_eq!(split(&f[..cut]), Ok(None));
        }
        let whole = split(&f).unwrap().unwrap();
        assert_eq!(
            (whole.kind, exit_code(whole.payload), whole.len),
            (EXITED, Ok(7), f.len())
        );
        let mut big = vec![RUN];
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(split(&big).is_err());
    }
}
