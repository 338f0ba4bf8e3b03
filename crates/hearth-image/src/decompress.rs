//! Layer decompression, chosen by the blob's magic bytes (as containerd does) rather
//! than trusted from the media type: gzip (`flate2`), zstd (`ruzstd`, pure Rust), or
//! a plain tar. Decoder errors surface as `InvalidData`, so a corrupt layer is the
//! image's fault, not ours.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Opens a downloaded layer blob as an uncompressed tar stream, and names its format.
pub fn open_layer(path: &Path) -> io::Result<(Box<dyn Read>, &'static str)> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(path)?);
    let head = file.fill_buf()?;
    if head.starts_with(&GZIP_MAGIC) {
        Ok((Box::new(flate2::read::MultiGzDecoder::new(file)), "gzip"))
    } else if head.starts_with(&ZSTD_MAGIC) {
        Ok((Box::new(ZstdFrames::new(file)?), "zstd"))
    } else {
        Ok((Box::new(file), "tar"))
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

/// A zstd stream of one or more concatenated frames (pzstd and some pushers write several).
struct ZstdFrames<R: BufRead> {
    decoder: Option<StreamingDecoder<R, FrameDecoder>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> io::Result<Self> {
        Ok(ZstdFrames {
            decoder: Some(StreamingDecoder::new(source).map_err(invalid)?),
        })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            match decoder.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    let mut source = self.decoder.take().expect("present").into_inner();
                    if source.fill_buf()?.is_empty() {
                        return Ok(0);
                    }
                    self.decoder = Some(StreamingDecoder::new(source).map_err(invalid)?);
                }
                Ok(n) => return Ok(n),
                Err(e) => return Err(invalid(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(blob: &[u8]) -> (Vec<u8>, &'static str) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(blob).unwrap();
        let (mut r, kind) = open_layer(f.path()).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        (out, kind)
    }

    #[test]
    fn sniffs_gzip_zstd_and_plain_tar() {
        let data = b"hello layer ".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        assert_eq!(roundtrip(&gz.finish().unwrap()), (data.clone(), "gzip"));
        let level = ruzstd::encoding::CompressionLevel::Fastest;
        // Two concatenated frames decode as one stream.
        let mut zst = ruzstd::encoding::compress_to_vec(&data[..5000], level);
        zst.extend(ruzstd::encoding::compress_to_vec(&data[5000..], level));
        assert_eq!(roundtrip(&zst), (data.clone(), "zstd"));
        assert_eq!(roundtrip(&data), (data.clone(), "tar"));
    }

    #[test]
    fn corrupt_zstd_is_invalid_data() {
        let mut zst = ruzstd::encoding::compress_to_vec(
            &b"abc".repeat(9000)[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let n = zst.len();
        zst.truncate(n / 2);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&zst).unwrap();
        let (mut r, _) = open_layer(f.path()).unwrap();
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}
