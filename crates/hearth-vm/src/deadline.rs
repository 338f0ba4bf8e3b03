//! Host-side deadlines on every wait for a VM: each guest-agent call and
//! each QMP exchange is bounded, so a wedged guest agent or a wedged QEMU
//! cannot hold an executor slot forever. Whoever meets an expired deadline
//! kills the VM (it is never pooled, saved or snapshotted); see
//! docs/design.md, "Deadlines", for what the action gets.

use std::future::Future;
use std::time::Duration;

use crate::VmError;

/// A control call: an agent request other than the command, dockerd and
/// packing (`Ping`, `MountDisk`, `Unmount`, `SetClock`) or one QMP command
/// (`stop`, `cont`, `migrate`, `query-*`). Measured under emulation: an agent
/// round trip ~38 ms, QMP `stop`/`cont` ~1 ms; `MountDisk` waits up to 5 s
/// in the guest for its disk to appear and `Unmount` syncs what the action
/// wrote. 30 s leaves room for a host loaded by parallel builds, and gives a
/// wedged VM's slot back within half a minute. `--vm-control-timeout-secs`.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the agent may take to start dockerd (`StartDockerd` carries it;
/// the agent kills dockerd and answers with its log after that, and the host
/// waits this plus [`CONTROL_TIMEOUT`] for that answer). dockerd is ready in
/// ~8–13 s under emulation (FACTS.md), far more on a busy host with a cold
/// page cache. `--vm-dockerd-timeout-secs`.
pub const DOCKERD_TIMEOUT: Duration = Duration::from_secs(120);

/// Saving a pooled VM: QMP `stop`, capabilities, `migrate`, polling
/// `query-migrate` until it completes. With the RAM in a shared file only
/// device state is written (~23 ms measured); a copied RAM takes 0.4–0.6 s
/// for 512 MiB. Each QMP command is also bounded by the control timeout.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `fut`, or fails with [`VmError::Timeout`] saying "`what()` within
/// `limit`" if it has not finished by then. `what` names who did not do
/// what, e.g. "the guest agent did not answer StartDockerd"; it is only
/// called on expiry.
pub async fn bounded<T>(
    what: impl FnOnce() -> String,
    limit: Duration,
    fut: impl Future<Output = Result<T, VmError>>,
) -> Result<T, VmError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(VmError::Timeout {
            what: what(),
            limit,
        }),
    }
}

#[cfg(test)]
#[path = "deadline_tests.rs"]
mod tests;
