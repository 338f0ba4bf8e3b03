//! Running a command for the host: to completion or to its timeout, with
//! its exit status and resource usage from the reaper (see reap.rs).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::{ExecRequest, ExitStatus};
use crate::reap;

/// Where the workspace disk is mounted.
const WORKSPACE: &str = "/work";

/// `chown -R` without following symlinks.
fn chown_tree(path: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Runs a command to completion.
pub fn run(req: &ExecRequest) -> Result<ExitStatus, String> {
    let program = req.args.first().ok_or("no arguments")?;
    let deadline = req
        .timeout_millis
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let stdout =
        File::create(&req.stdout_path).map_err(|e| format!("creating {}: {e}", req.stdout_path))?;
    let stderr =
        File::create(&req.stderr_path).map_err(|e| format!("creating {}: {e}", req.stderr_path))?;
    let program = if program.contains('/') && !program.starts_with('/') {
        format!("{}/{program}", req.cwd)
    } else {
        program.clone()
    };
    let mut cmd = Command::new(&program);
    cmd.args(&req.args[1..])
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if let Some(spec) = &req.user {
        let (uid, gid) = crate::user::resolve(spec)?;
        // The workspace must be the user's to write outputs into.
        if req.cwd.starts_with(WORKSPACE) {
            chown_tree(std::path::Path::new(WORKSPACE), uid, gid)
                .map_err(|e| format!("giving {WORKSPACE} to {spec}: {e}"))?;
        }
        // std drops supplementary groups when a root parent changes uid.
        cmd.uid(uid).gid(gid);
    }
    let child = match reap::spawn(&mut cmd) {
        Ok(child) => child,
        Err(e) => {
            let msg = format!("hearth-guest: cannot run {program:?} in {}: {e}\n", req.cwd);
            let _ = std::fs::write(&req.stderr_path, msg);
            return Ok(ExitStatus {
                exit_code: 127,
                ..Default::default()
            });
        }
    };
    let Some(deadline) = deadline else {
        return Ok(child.wait());
    };
    if let Some(status) = child.wait_until(deadline) {
        return Ok(status);
    }
    // The command and whatever it started that kept its process group.
    child.kill(true);
    Ok(ExitStatus {
        timed_out: true,
        ..child.wait()
    })
}
