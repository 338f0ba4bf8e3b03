//! The host end of the guest protocol, over QEMU's virtio-serial socket.

use std::time::Duration;

use hearth_guest::protocol::{Request, Response, MAX_FRAME, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::sockdir::SocketDir;
use crate::VmError;

pub struct AgentClient {
    stream: UnixStream,
}

impl AgentClient {
    /// Connects to the agent socket `name` in `dir` and reads the guest's
    /// hello.
    pub async fn connect(
        dir: &SocketDir,
        name: &str,
        boot_timeout: Duration,
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
        let mut client = AgentClient { stream };
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
    /// that booted it) and checks that it answers.
    pub async fn attach(dir: &SocketDir, name: &str, timeout: Duration) -> Result<Self, VmError> {
        let stream = dir
            .connect(name)
            .await
            .map_err(|e| VmError::io(format!("connecting to {}", dir.real(name).display()), e))?;
        let mut client = AgentClient { stream };
        match tokio::time::timeout(timeout, client.call(&Request::Ping)).await {
            Ok(Ok(Response::Pong)) => Ok(client),
            Ok(Ok(other)) => Err(VmError::Agent(format!("expected pong, got {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(VmError::Agent(format!(
                "no answer within {}s after the restore",
                timeout.as_secs()
            ))),
        }
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

    /// Sends one request and reads its response. An `Error` response becomes `Err`.
    pub async fn call(&mut self, req: &Request) -> Result<Response, VmError> {
        self.call_after(&[], req).await
    }

    /// Sends `before` and `req` in one write (the guest answers them in
    /// order), so a short request costs no round trip of its own; then reads
    /// the answers. An `Error` answer to any becomes `Err`.
    pub async fn call_after(
        &mut self,
        before: &[Request],
        req: &Request,
    ) -> Result<Response, VmError> {
        let mut frame = Vec::new();
        for r in before.iter().chain(std::iter::once(req)) {
            hearth_guest::protocol::write_frame(&mut frame, r)
                .map_err(|e| VmError::Agent(e.to_string()))?;
        }
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| VmError::Agent(format!("writing: {e}")))?;
        let mut failed = None;
        for r in before {
            if let Response::Error { message } = self.read().await? {
                failed.get_or_insert(VmError::Agent(format!(
                    "{r:?} failed in the guest: {message}"
                )));
            }
        }
        let answer = self.read().await?;
        if let Some(e) = failed {
            return Err(e);
        }
        match answer {
            Response::Error { message } => Err(VmError::Agent(format!(
                "{req:?} failed in the guest: {message}"
            ))),
            other => Ok(other),
        }
    }
}
