//! The host end of the guest protocol, over QEMU's virtio-serial socket.

use std::time::Duration;

use hearth_guest::protocol::{Request, Response, MAX_FRAME, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::deadline::bounded;
use crate::sockdir::SocketDir;
use crate::VmError;

pub struct AgentClient {
    stream: UnixStream,
    /// The bound of a control call (see [`crate::deadline::CONTROL_TIMEOUT`]).
    control: Duration,
}

/// A request's kind, for messages: `StartDockerd`, `Exec`, ...
fn kind(req: &Request) -> String {
    let text = format!("{req:?}");
    let end = text
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(text.len());
    text[..end].to_string()
}

impl AgentClient {
    /// Connects to the agent socket `name` in `dir` and reads the guest's
    /// hello. Later control calls are bounded by `control`.
    pub async fn connect(
        dir: &SocketDir,
        name: &str,
        boot_timeout: Duration,
        control: Duration,
    ) -> Result<(Self, Response), VmError> {
        let deadline = tokio::time::Instant::now() + boot_timeout;
        let stream = loop {
            match dir.connect(name).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(VmError::io(
                        format!("connecting to {}", dir.real(name).display()),
                        e,
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let mut client = AgentClient { stream, control };
        let hello = tokio::time::timeout_at(deadline, client.read())
            .await
            .map_err(|_| {
                VmError::Agent(format!("no hello within {}s", boot_timeout.as_secs()))
            })??;
        match &hello {
            Response::Hello { version, .. } if *version == PROTOCOL_VERSION => Ok((client, hello)),
            Response::Hello { version, .. } => Err(VmError::Version(*version, PROTOCOL_VERSION)),
            other => Err(VmError::Agent(format!("expected hello, got {other:?}"))),
        }
    }

    /// Connects to the agent of a restored VM (its hello went to the host
    /// that booted it) and checks that it answers within `timeout`.
    pub async fn attach(
        dir: &SocketDir,
        name: &str,
        timeout: Duration,
        control: Duration,
    ) -> Result<Self, VmError> {
        let stream = dir
            .connect(name)
            .await
            .map_err(|e| VmError::io(format!("connecting to {}", dir.real(name).display()), e))?;
        let mut client = AgentClient::new(stream, control);
        match client.call_within(&Request::Ping, timeout).await {
            Ok(Response::Pong) => Ok(client),
            Ok(other) => Err(VmError::Agent(format!("expected pong, got {other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// A client on a connected stream whose hello, if any, has been read.
    pub(crate) fn new(stream: UnixStream, control: Duration) -> Self {
        AgentClient { stream, control }
    }

    /// The bound of a control call.
    pub fn control(&self) -> Duration {
        self.control
    }

    async fn read(&mut self) -> Result<Response, VmError> {
        let len = self
            .stream
            .read_u32()
            .await
            .map_err(|e| VmError::Agent(format!("reading: {e}")))? as usize;
        if len > MAX_FRAME {
            return Err(VmError::Agent(format!("frame of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| VmError::Agent(format!("reading: {e}")))?;
        serde_json::from_slice(&body).map_err(|e| VmError::Agent(format!("bad frame: {e}")))
    }

    /// A control call: sends one request and reads its response within the
    /// control bound. An `Error` response becomes `Err`.
    pub async fn call(&mut self, req: &Request) -> Result<Response, VmError> {
        self.call_within(req, self.control).await
    }

    /// Like [`call`](Self::call), the response bounded by `limit` instead.
    pub async fn call_within(
        &mut self,
        req: &Request,
        limit: Duration,
    ) -> Result<Response, VmError> {
        self.send(&[req]).await?;
        self.answer(req, limit).await
    }

    /// Sends requests in one write (the guest answers them in order, so a
    /// short request sent with the next costs no round trip of its own);
    /// read each answer with [`answer`](Self::answer). Bounded by the
    /// control bound (a guest that reads nothing fills the port's buffer).
    pub async fn send(&mut self, reqs: &[&Request]) -> Result<(), VmError> {
        let mut frame = Vec::new();
        for r in reqs {
            hearth_guest::protocol::write_frame(&mut frame, r)
                .map_err(|e| VmError::Agent(e.to_string()))?;
        }
        let write = async {
            self.stream
                .write_all(&frame)
                .await
                .map_err(|e| VmError::Agent(format!("writing: {e}")))
        };
        bounded(
            || {
                let what = reqs.first().map_or_else(String::new, |r| kind(r));
                format!("the guest agent did not take {what}")
            },
            self.control,
            write,
        )
        .await
    }

    /// Reads the answer to `req`, sent earlier, within `limit`. An `Error`
    /// answer becomes `Err`.
    pub async fn answer(&mut self, req: &Request, limit: Duration) -> Result<Response, VmError> {
        let answer = bounded(
            || format!("the guest agent did not answer {}", kind(req)),
            limit,
            self.read(),
        )
        .await?;
        match answer {
            Response::Error { message } => Err(VmError::Agent(format!(
                "{req:?} failed in the guest: {message}"
            ))),
            other => Ok(other),
        }
    }
}
