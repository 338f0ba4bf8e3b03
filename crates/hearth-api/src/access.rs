//! What a caller may see: the principal the auth layer found, and the
//! blobs its tenant may read (see `hearth_storage::Owners`).

use std::sync::Arc;

use bytes::Bytes;
use hearth_storage::{
    BlobSource, BlobStore, BlobStream, Digest, Ownership, StoreError, StoreResult,
};
use tonic::{Request, Status};

use crate::auth::Principal;
use crate::Context;

impl Context {
    /// The caller of `req`. Fails closed: with keys configured, a request
    /// that did not pass the auth layer has no principal and is refused.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, Status> {
        match req.extensions().get::<Arc<Principal>>() {
            Some(p) => Ok(p.clone()),
            None if !self.auth.enabled() => Ok(Arc::new(Principal::anonymous())),
            None => Err(Status::unauthenticated(
                "no API key was checked for this call",
            )),
        }
    }

    /// Lets `tenant` read `digests` (it uploaded them, or its execution
    /// produced them).
    pub(crate) async fn grant(&self, tenant: &str, digests: &[Digest]) -> StoreResult<()> {
        match &self.owners {
            Some(owners) if !tenant.is_empty() => owners.grant(tenant, digests).await,
            _ => Ok(()),
        }
    }

    /// The caller's tenant as a filter on operations and counts; None for
    /// callers that see every tenant's.
    pub(crate) fn tenant_filter(who: &Principal) -> Option<&str> {
        (!who.sees_all_tenants()).then_some(who.tenant.as_str())
    }
}

/// The store as one tenant sees it: blobs it may not read are missing
/// (`find_missing` lists them, `read` is NOT_FOUND), and whatever it writes
/// (the store checks the bytes against the digest first) becomes its to
/// read. A decorator, so every service and the validation before Execute
/// get the same rule by taking the store from [`Context::store_for`].
struct TenantView {
    inner: Arc<dyn BlobStore>,
    owners: Arc<dyn Ownership>,
    tenant: String,
}

#[async_trait::async_trait]
impl BlobStore for TenantView {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        // Only the caller's own digests need the store's answer; the rest
        // are missing to it whatever the store holds.
        let (owned, hidden) = self.owners.partition(&self.tenant, digests).await?;
        let mut missing = if owned.is_empty() {
            Vec::new()
        } else {
            self.inner.find_missing(&owned).await?
        };
        missing.extend(hidden);
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        if !self.owners.owns(&self.tenant, digest).await? {
            return Err(StoreError::NotFound(*digest));
        }
        self.inner.read(digest, offset, limit).await
    }

    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        if !self.owners.owns(&self.tenant, digest).await? {
            return Err(StoreError::NotFound(*digest));
        }
        self.inner.read_stream(digest, offset, limit).await
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        self.inner.write(digest, source).await?;
        self.owners.grant(&self.tenant, &[*digest]).await
    }
}

impl Context {
    /// The store as the caller may use it.
    pub fn store_for(&self, who: &Principal) -> Arc<dyn BlobStore> {
        match &self.owners {
            Some(owners) if !who.sees_all_blobs() => Arc::new(TenantView {
                inner: self.cas.clone(),
                owners: owners.clone(),
                tenant: who.tenant.clone(),
            }),
            _ => self.cas.clone(),
        }
    }
}
