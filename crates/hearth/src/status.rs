//! `hearth status`: a one-screen summary of a running server.

use anyhow::{Context, Result};
use hearth_proto::worker::{
    worker_service_client::WorkerServiceClient, StatusRequest, StatusResponse,
};

use crate::cli::StatusArgs;

pub async fn run(args: StatusArgs) -> Result<()> {
    let address = args
        .client
        .address(&args.server)
        .map_err(anyhow::Error::msg)?;
    let channel = hearth_executor::client::connect(&address).map_err(anyhow::Error::msg)?;
    let mut client = WorkerServiceClient::new(channel);
    let status = client
        .status(StatusRequest {})
        .await
        .context("asking for status")?
        .into_inner();
    print!("{}", render(&status));
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn render(s: &StatusResponse) -> String {
    let mut out = String::new();
    let limit = if s.cas_limit_bytes > 0 {
        format!(" of {}", human_bytes(s.cas_limit_bytes))
    } else {
        String::new()
    };
    out.push_str(&format!("uptime     {}s\n", s.uptime_seconds));
    out.push_str(&format!(
        "actions    {} queued, {} running, {} completed, {} cache hits\n",
        s.queued_actions, s.running_actions, s.completed_actions, s.cache_hits
    ));
    out.push_str(&format!(
        "cas        {} in {} blobs{limit}\n",
        human_bytes(s.cas_bytes),
        s.cas_blobs
    ));
    out.push_str(&format!("executors  {}\n", s.executors.len()));
    for e in &s.executors {
        let props: Vec<String> = e
            .properties
            .iter()
            .map(|p| format!("{}={}", p.name, p.value))
            .collect();
        let warm = if e.warm_runners > 0 {
            format!("  {} warm", e.warm_runners)
        } else {
            String::new()
        };
        let away = if e.reconnecting {
            "  (session lost; waiting for it to reconnect)"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {:<28} {}/{} busy{warm}  isolation={}  {}  up {}s{away}\n",
            e.executor_id,
            e.running,
            e.capacity,
            e.isolation_types.join(","),
            props.join(" "),
            e.connected_seconds
        ));
        if !e.vm_unavailable.is_empty() {
            out.push_str(&format!(
                "  {:<28} microVMs unavailable: {}\n",
                "", e.vm_unavailable
            ));
        }
    }
    if s.requeued_actions > 0 {
        out.push_str(&format!(
            "retries    {} re-queued after their executor went away\n",
            s.requeued_actions
        ));
    }
    if !s.shared_snapshots.is_empty() {
        out.push_str(&format!(
            "shared     {} warm runner snapshot(s) in the CAS\n",
            s.shared_snapshots.len()
        ));
    }
    if !s.operations.is_empty() {
        out.push_str("in flight  (oldest first)\n");
    }
    for op in &s.operations {
        let place = if op.executor_id.is_empty() {
            op.stage.clone()
        } else {
            format!("{} on {}", op.stage, op.executor_id)
        };
        let action = op
            .action_digest
            .as_ref()
            .map(|d| format!("{}/{}", d.hash.get(..12).unwrap_or(&d.hash), d.size_bytes))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {}  {place}  attempt {}  {}s since queued  action {action}\n",
            op.operation_name, op.attempts, op.queued_seconds
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::worker::ExecutorStatus;

    #[test]
    fn renders_a_readable_summary() {
        let s = StatusResponse {
            executors: vec![ExecutorStatus {
                executor_id: "box-1".into(),
                capacity: 2,
                running: 1,
                isolation_types: vec!["none".into()],
                warm_runners: 2,
                ..Default::default()
            }],
            queued_actions: 3,
            cas_bytes: 1_500_000,
            cas_blobs: 10,
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("3 queued"), "{text}");
        assert!(text.contains("1.5 MB in 10 blobs"), "{text}");
        assert!(
            text.contains("box-1") && text.contains("1/2 busy  2 warm"),
            "{text}"
        );
        assert!(!text.contains("microVMs"), "{text}");
    }

    #[test]
    fn says_why_an_executor_has_no_microvms() {
        let s = StatusResponse {
            executors: vec![ExecutorStatus {
                executor_id: "box-1".into(),
                capacity: 2,
                isolation_types: vec!["none".into()],
                vm_unavailable: "no guest kernel in /k (run scripts/install-vm.sh)".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&s);
        let line = text
            .lines()
            .find(|l| l.contains("microVMs unavailable"))
            .unwrap_or_else(|| panic!("no reason shown: {text}"));
        assert!(
            line.ends_with(
                "microVMs unavailable: no guest kernel in /k (run scripts/install-vm.sh)"
            ),
            "{text}"
        );
    }

    #[test]
    fn shows_attempts_and_executors_away() {
        let s = StatusResponse {
            executors: vec![ExecutorStatus {
                executor_id: "box-1".into(),
                capacity: 1,
                running: 1,
                reconnecting: true,
                ..Default::default()
            }],
            operations: vec![hearth_proto::worker::OperationStatus {
                operation_name: "operations/abc".into(),
                stage: "executing".into(),
                executor_id: "box-1".into(),
                attempts: 2,
                queued_seconds: 7,
                action_digest: Some(hearth_proto::worker::Digest {
                    hash: "0123456789abcdef".into(),
                    size_bytes: 140,
                }),
            }],
            requeued_actions: 1,
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("waiting for it to reconnect"), "{text}");
        assert!(text.contains("retries    1 re-queued"), "{text}");
        assert!(
            text.contains(
                "operations/abc  executing on box-1  attempt 2  7s since queued  action 0123456789ab/140"
            ),
            "{text}"
        );
    }
}
