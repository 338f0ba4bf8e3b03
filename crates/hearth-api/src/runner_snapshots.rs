//! The scheduler's index of runner snapshots shared through the CAS, kept
//! in the action cache too, so that a restarted server still hands them
//! out: one entry per affinity key, under a key derived from it in a
//! partition no API key can name, whose result lists the manifest as its
//! one output file (named by the runner key). An entry whose manifest the
//! CAS evicted is not used.

use hearth_proto::reapi::{ActionResult, OutputFile};
use hearth_proto::worker::{Digest as WireDigest, SharedSnapshot};
use hearth_storage::{action_key, Digest};

use crate::context::Context;

/// Tenant names come from the keys file and cannot hold a NUL.
const PARTITION: &str = "\0hearth/runner-snapshots";

fn entry_key(affinity_key: &str) -> Digest {
    let name = Digest::of(format!("hearth.runner-snapshot/1\0{affinity_key}").as_bytes());
    action_key(PARTITION, "", &name)
}

/// Records reported snapshots in the action cache (failures are logged:
/// the in-memory index still has them).
pub(crate) async fn remember(ctx: &Context, snapshots: &[SharedSnapshot]) {
    for s in snapshots {
        let key = entry_key(&s.affinity_key);
        let Some(d) = &s.manifest else {
            if let Err(e) = ctx.ac.remove(&key).await {
                tracing::warn!(error = %e, "could not forget a withdrawn shared snapshot");
            }
            continue;
        };
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: s.runner_key.clone(),
                digest: Some(hearth_proto::reapi::Digest {
                    hash: d.hash.clone(),
                    size_bytes: d.size_bytes,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Err(e) = ctx.ac.put(&key, &result).await {
            tracing::warn!(error = %e, "could not record a shared snapshot in the action cache");
        }
    }
}

/// Looks `affinity_key` up in the action cache when the scheduler has no
/// shared snapshot for it (after a restart), and tells the scheduler.
pub(crate) async fn recall(ctx: &Context, affinity_key: &str) {
    if ctx.scheduler.has_shared_snapshot(affinity_key) {
        return;
    }
    let Ok(Some(result)) = ctx.ac.get(&entry_key(affinity_key)).await else {
        return;
    };
    let Some(file) = result.output_files.first() else {
        return;
    };
    let Some(manifest) = file
        .digest
        .as_ref()
        .and_then(|d| Digest::from_proto(d).ok())
    else {
        return;
    };
    if !ctx
        .cas
        .find_missing(&[manifest])
        .await
        .is_ok_and(|m| m.is_empty())
    {
        return;
    }
    ctx.scheduler.note_shared_snapshots(
        "the action cache",
        vec![SharedSnapshot {
            affinity_key: affinity_key.to_string(),
            runner_key: file.path.clone(),
            manifest: Some(WireDigest {
                hash: manifest.hash_hex(),
                size_bytes: manifest.size() as i64,
            }),
        }],
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use hearth_scheduler::{Scheduler, SchedulerConfig};
    use hearth_storage::{BlobStore, MemoryActionCache, MemoryStore};

    use super::*;

    fn shared(manifest: Option<Digest>) -> SharedSnapshot {
        SharedSnapshot {
            affinity_key: "aff".into(),
            runner_key: "aff.conf".into(),
            manifest: manifest.map(|m| WireDigest {
                hash: m.hash_hex(),
                size_bytes: m.size() as i64,
            }),
        }
    }

    #[tokio::test]
    async fn a_restarted_server_recalls_what_was_shared_unless_withdrawn_or_evicted() {
        let cas = Arc::new(MemoryStore::new());
        let ac = Arc::new(MemoryActionCache::new(1 << 20));
        let server = || {
            Context::new(
                cas.clone(),
                ac.clone(),
                Scheduler::new(SchedulerConfig::default()),
            )
        };
        let body = Bytes::from_static(b"{\"manifest\": 1}");
        let manifest = Digest::of(&body);
        cas.put(&manifest, body).await.unwrap();

        let first = server();
        let kept = first
            .scheduler
            .note_shared_snapshots("e1", vec![shared(Some(manifest))]);
        remember(&first, &kept).await;

        let restarted = server();
        assert!(!restarted.scheduler.has_shared_snapshot("aff"));
        recall(&restarted, "aff").await;
        assert!(restarted.scheduler.has_shared_snapshot("aff"), "recalled");
        recall(&restarted, "other").await;
        assert!(!restarted.scheduler.has_shared_snapshot("other"));

        // Withdrawn: forgotten for good.
        remember(&first, &[shared(None)]).await;
        let again = server();
        recall(&again, "aff").await;
        assert!(!again.scheduler.has_shared_snapshot("aff"));

        // Its manifest evicted from the CAS: not handed out.
        let gone = Digest::of(b"never stored");
        remember(&first, &[shared(Some(gone))]).await;
        let later = server();
        recall(&later, "aff").await;
        assert!(!later.scheduler.has_shared_snapshot("aff"));
    }
}
