//! Jobs and executors for the unit tests.

use hearth_storage::Digest;

use crate::{ExecutorInfo, Job, Platform};

/// A shareable job whose action digest is that of `tag`.
pub(crate) fn job(tag: &str, platform: Platform) -> Job {
    Job {
        tenant: String::new(),
        instance_name: String::new(),
        action_digest: Digest::of(tag.as_bytes()),
        action: vec![],
        command: vec![],
        platform,
        do_not_cache: false,
        shareable: true,
        pins: None,
    }
}

/// An executor of host actions in the default pool.
pub(crate) fn info(id: &str, capacity: u32) -> ExecutorInfo {
    ExecutorInfo {
        id: id.into(),
        description: String::new(),
        properties: Default::default(),
        isolation_types: vec!["none".into()],
        capacity,
        vm_unavailable: String::new(),
    }
}
