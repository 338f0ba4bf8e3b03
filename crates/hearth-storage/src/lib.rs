//! Storage for Hearth: a content-addressable store (CAS) behind the small
//! [`BlobStore`] trait, with a disk implementation (atomic writes, digest
//! verification, LRU eviction that respects pins) and an in-memory one for
//! tests, plus the action cache.

mod ac;
mod digest;
mod disk;
mod error;
mod existence;
mod fast_slow;
mod index;
mod memory;
mod metered;
mod object;
mod owners;
mod redis_ac;
mod redis_owners;
mod staged;
mod store;

pub use ac::{action_key, ActionCache, DiskActionCache, MemoryActionCache};
pub use digest::{Digest, DigestHasher};
pub use disk::{BlobSink, DiskStore};
pub use error::{StoreError, StoreResult};
pub use existence::ExistenceCache;
pub use fast_slow::{copy_into_disk, FastSlow};
pub use memory::MemoryStore;
pub use metered::Metered;
pub use object::ObjectBlobStore;
pub use owners::{Owners, Ownership};
pub use redis_ac::{connect_redis, RedisActionCache};
pub use redis_owners::RedisOwners;
pub use staged::StagedFile;
pub use store::{
    BlobSource, BlobStore, BlobStream, Occupancy, PinGuard, Pins, StoreStats, READ_CHUNK,
};
