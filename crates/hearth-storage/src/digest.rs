use std::fmt;

use hearth_proto::reapi;
use sha2::{Digest as _, Sha256};

use crate::{StoreError, StoreResult};

/// A validated SHA-256 content digest: 32 raw hash bytes and a size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; 32],
    size: u64,
}

impl Digest {
    pub fn new(hash: [u8; 32], size: u64) -> Self {
        Digest { hash, size }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        let mut h = DigestHasher::default();
        h.update(data);
        h.finish()
    }

    /// The digest of the empty blob, which every store holds implicitly.
    pub fn empty() -> Self {
        Digest::of(&[])
    }

    /// Parses a lowercase hex hash and a size.
    pub fn parse(hash: &str, size: i64) -> StoreResult<Self> {
        if hash.len() != 64
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(StoreError::InvalidDigest(format!(
                "hash {hash:?} is not 64 lowercase hex characters (SHA-256)"
            )));
        }
        if size < 0 {
            return Err(StoreError::InvalidDigest(format!(
                "size {size} of {hash} is negative"
            )));
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(hash, &mut raw)
            .map_err(|e| StoreError::InvalidDigest(format!("hash {hash:?}: {e}")))?;
        Ok(Digest {
            hash: raw,
            size: size as u64,
        })
    }

    pub fn from_proto(d: &reapi::Digest) -> StoreResult<Self> {
        Digest::parse(&d.hash, d.size_bytes)
    }

    /// Like [`Digest::from_proto`] for an optional field: absent is an error naming `what`.
    pub fn from_field(d: Option<&reapi::Digest>, what: &str) -> StoreResult<Self> {
        match d {
            Some(d) => Digest::from_proto(d),
            None => Err(StoreError::InvalidDigest(format!("{what} is missing"))),
        }
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Digest::empty()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Incremental SHA-256 that also counts bytes.
#[derive(Default, Clone)]
pub struct DigestHasher {
    sha: Sha256,
    size: u64,
}

impl DigestHasher {
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
    }

    pub fn finish(self) -> Digest {
        Digest {
            hash: self.sha.finalize().into(),
            size: self.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_is_the_well_known_one() {
        assert_eq!(
            Digest::empty().hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_rejects_bad_hashes_and_sizes() {
        assert!(Digest::parse("abc", 1).is_err());
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert!(Digest::parse(upper, 0).is_err());
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(Digest::parse(good, -1).is_err());
        assert_eq!(Digest::parse(good, 0).unwrap(), Digest::empty());
    }

    #[test]
    fn proto_round_trip() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_proto(&d.to_proto()).unwrap(), d);
        assert_eq!(d.size(), 5);
    }
}
