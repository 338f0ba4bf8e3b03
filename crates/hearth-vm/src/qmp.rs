//! A minimal QMP client: greeting, capabilities negotiation, commands.
//! Hand-written (a JSON line per message over a Unix socket) because Hearth
//! needs only a handful of commands and this keeps build times down. Every
//! exchange is bounded: a wedged QEMU fails it with [`VmError::Timeout`].

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::deadline::bounded;
use crate::sockdir::SocketDir;
use crate::VmError;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// The bound of each exchange.
    limit: Duration,
}

impl Qmp {
    /// Connects to the QMP socket `name` in `dir`; the greeting and the
    /// capabilities negotiation, and later each command, must each finish
    /// within `limit`.
    pub async fn connect(dir: &SocketDir, name: &str, limit: Duration) -> Result<Self, VmError> {
        let greeted = async {
            let stream = dir.connect(name).await.map_err(|e| {
                VmError::io(
                    format!("connecting to QMP at {}", dir.real(name).display()),
                    e,
                )
            })?;
            let (r, w) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(r),
                writer: w,
                limit,
            };
            qmp.next_message().await?;
            Ok(qmp)
        };
        let mut qmp = bounded(|| "QEMU did not greet on QMP".into(), limit, greeted).await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn next_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| VmError::io("reading QMP", e))?;
        if n == 0 {
            return Err(VmError::Agent("QMP connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmError::Agent(format!("bad QMP message: {e}")))
    }

    /// Runs a command and returns its `return` value (events are skipped).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let limit = self.limit;
        bounded(
            || format!("QEMU did not answer QMP {command}"),
            limit,
            self.exchange(command, arguments),
        )
        .await
    }

    async fn exchange(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| VmError::io("writing QMP", e))?;
        loop {
            let v = self.next_message().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmError::Agent(format!("QMP {command}: {e}")));
            }
        }
    }
}
