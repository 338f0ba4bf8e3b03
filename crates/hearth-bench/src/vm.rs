//! MicroVM start figures: from the runner starting (execution_start
//! timestamp) to the command's first instruction (its own clock, which the
//! agent sets from the host's), and the whole Execute round trip. Warm
//! modes leave out the actions that make the VMs they then reuse.

use std::time::Duration;

use anyhow::{Context, Result};
use hearth_proto::reapi::{
    command::EnvironmentVariable, platform::Property, ActionResult, Command, Platform,
};

use crate::{cas, execute_ok, millis_between, percentile, row, upload_action, Channel};

fn prop(name: &str, value: &str) -> Property {
    Property {
        name: name.into(),
        value: value.into(),
    }
}

/// One action printing its start time first (then running `script`, if
/// any): its round trip and runner start → command start.
async fn timed(
    c: &Channel,
    properties: Vec<Property>,
    script: &str,
) -> Result<(Duration, Duration)> {
    let arguments = if script.is_empty() {
        vec!["/bin/date".into(), "+%s%N".into()]
    } else {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("date +%s%N; {script}"),
        ]
    };
    let action = upload_action(
        c,
        &Command {
            arguments,
            environment_variables: vec![EnvironmentVariable {
                name: "RUN".into(),
                value: uuid::Uuid::new_v4().to_string(),
            }],
            platform: Some(Platform { properties }),
            ..Default::default()
        },
    )
    .await?;
    let (took, result) = execute_ok(c, action).await?;
    Ok((took, to_command(c, result).await?))
}

async fn to_command(c: &Channel, result: ActionResult) -> Result<Duration> {
    anyhow::ensure!(result.exit_code == 0, "the action failed: {result:?}");
    let stdout = result.stdout_digest.context("no stdout")?;
    let out = cas(c)
        .batch_read_blobs(hearth_proto::reapi::BatchReadBlobsRequest {
            digests: vec![stdout],
            ..Default::default()
        })
        .await?
        .into_inner();
    let text = String::from_utf8(out.responses[0].data.clone())?;
    let first = text.lines().next().unwrap_or_default();
    let cmd_start: i128 = first.trim().parse().context("date output")?;
    let meta = result.execution_metadata.context("no metadata")?;
    Ok(Duration::from_secs_f64(
        millis_between(&meta.execution_start_timestamp, cmd_start).max(0.0) / 1000.0,
    ))
}

pub async fn vm_actions(c: &Channel, n: usize, mode: &str) -> Result<()> {
    let fc = || prop("workload-isolation-type", "firecracker");
    let label = match mode {
        "cold" => "fresh VM",
        "dockerd" => "fresh VM with init-dockerd=true",
        "recycled" => "recycled (resumed from the pool)",
        "restored" => "restored from a snapshot on disk",
        "burst" => "burst of 3 equal-key actions after one warm-up",
        "docker-run" => "fresh VM with init-dockerd=true running the seed's `docker run`",
        other => {
            anyhow::bail!(
                "--vm-start {other}: expected cold, dockerd, recycled, restored, burst or docker-run"
            )
        }
    };
    let mut to_start = Vec::new();
    let mut totals = Vec::new();
    if mode == "burst" {
        for round in 0..n {
            let key = format!("burst-{}-{round}", uuid::Uuid::new_v4());
            let props = || {
                vec![
                    fc(),
                    prop("recycle-runner", "true"),
                    prop("runner-recycling-key", &key),
                ]
            };
            timed(c, props(), "").await?;
            let (a, b, d) = tokio::join!(
                timed(c, props(), ""),
                timed(c, props(), ""),
                timed(c, props(), "")
            );
            for (took, start) in [a?, b?, d?] {
                totals.push(took);
                to_start.push(start);
            }
        }
    } else {
        // The first actions make what the others start from (a clean
        // snapshot; a pooled VM; for restored, one VM per key): not counted.
        let warmup = if mode == "restored" { 2 } else { 1 };
        for i in 0..n + warmup {
            let mut properties = vec![fc()];
            match mode {
                "dockerd" | "docker-run" => properties.push(prop("init-dockerd", "true")),
                "recycled" => properties.push(prop("recycle-runner", "true")),
                "restored" => {
                    properties.push(prop("recycle-runner", "true"));
                    properties.push(prop("runner-recycling-key", &format!("bench-{}", i % 2)));
                }
                _ => {}
            }
            let script = match mode {
                "dockerd" => "docker info >/dev/null",
                // The seed's test (tests/e2e/docker-workspace/docker_test.sh):
                // the image comes from the registry dockerd mirrors. dockerd
                // 20.10 resolves "docker.io" on every pull (its check for
                // registries allowed non-distributable artifacts); with no
                // Internet here, Go's resolver sometimes gets no answer
                // through slirp and waits 2 x 5 s, in either mode. The hosts
                // line answers it at once, as a working resolver would.
                "docker-run" => {
                    "echo '127.0.0.1 docker.io' >> /etc/hosts; docker run --rm ubuntu:20.04 echo PASS"
                }
                _ => "",
            };
            let (took, start) = timed(c, properties, script).await?;
            if i >= warmup {
                totals.push(took);
                to_start.push(start);
            }
        }
    }
    to_start.sort();
    totals.sort();
    let runs = to_start.len();
    row(
        &format!("MicroVM {label}: runner start → command start ({runs} runs)"),
        format!(
            "p50 {:.0} ms, max {:.0} ms",
            percentile(&to_start, 0.5),
            percentile(&to_start, 1.0)
        ),
    );
    row(
        &format!("MicroVM {label}: Execute round trip"),
        format!(
            "p50 {:.0} ms, max {:.0} ms",
            percentile(&totals, 0.5),
            percentile(&totals, 1.0)
        ),
    );
    Ok(())
}
