//! ByteStream resource names:
//! `{instance}/blobs/{hash}/{size}[/…]` for reads and
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/…]` for writes, where the
//! instance name may itself contain slashes.

use hearth_storage::Digest;
use tonic::Status;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    pub digest: Digest,
    /// The upload id for write resources.
    pub upload_id: Option<String>,
}

pub fn parse_read(name: &str) -> Result<BlobResource, Status> {
    parse(name, false)
}

pub fn parse_write(name: &str) -> Result<BlobResource, Status> {
    parse(name, true)
}

fn parse(name: &str, write: bool) -> Result<BlobResource, Status> {
    let bad = |why: &str| {
        let form = if write {
            "{instance}/uploads/{uuid}/blobs/{hash}/{size}"
        } else {
            "{instance}/blobs/{hash}/{size}"
        };
        Status::invalid_argument(format!(
            "malformed resource name {name:?}: {why}; expected {form}"
        ))
    };
    let parts: Vec<&str> = name.split('/').collect();
    if parts.contains(&"compressed-blobs") {
        return Err(Status::unimplemented(format!(
            "resource {name:?}: compressed blobs are not supported (the server advertises no compressors)"
        )));
    }
    let blobs_at = parts
        .iter()
        .position(|p| *p == "blobs")
        .ok_or_else(|| bad("no \"blobs\" segment"))?;
    let (instance_parts, upload_id) = if write {
        if blobs_at < 2 || parts[blobs_at - 2] != "uploads" || parts[blobs_at - 1].is_empty() {
            return Err(bad("no \"uploads/{uuid}\" before \"blobs\""));
        }
        (
            &parts[..blobs_at - 2],
            Some(parts[blobs_at - 1].to_string()),
        )
    } else {
        (&parts[..blobs_at], None)
    };
    let hash = parts.get(blobs_at + 1).ok_or_else(|| bad("no hash"))?;
    let size = parts.get(blobs_at + 2).ok_or_else(|| bad("no size"))?;
    let size: i64 = size.parse().map_err(|_| bad("size is not a number"))?;
    let digest = Digest::parse(hash, size).map_err(|e| bad(&e.to_string()))?;
    Ok(BlobResource {
        instance: instance_parts.join("/"),
        digest,
        upload_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_names_with_and_without_instance() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "");
        let r = parse_read(&format!("my/inst/blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "my/inst");
        assert_eq!(r.digest, Digest::empty());
    }

    #[test]
    fn write_names_need_uploads_segment() {
        let r = parse_write(&format!("inst/uploads/abc-123/blobs/{H}/0/extra/metadata")).unwrap();
        assert_eq!(r.instance, "inst");
        assert_eq!(r.upload_id.as_deref(), Some("abc-123"));
        assert!(parse_write(&format!("inst/blobs/{H}/0")).is_err());
    }

    #[test]
    fn malformed_names_are_invalid_argument() {
        for n in [
            "",
            "blobs",
            "blobs/xyz/1",
            &format!("blobs/{H}"),
            &format!("blobs/{H}/-1"),
            &format!("blobs/{H}/ten"),
        ] {
            let e = parse_read(n).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{n}");
        }
        let e = parse_read(&format!("compressed-blobs/zstd/{H}/0")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }
}
