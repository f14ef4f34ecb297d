//! Request body rewriting: decoded body bytes in, bytes with tokens replaced out.
//!
//! Uncompressed bodies stream through a [`Substituter`] (see `forward.rs`).
//! gzip/deflate bodies are handled whole by [`rewrite_compressed`]: the caller
//! reads the compressed body (bounded), then runs this on a blocking thread. It
//! inflates in fixed-size pieces and stops as soon as the output passes a cap
//! ([`InflateCaps`]), so a decompression bomb costs at most the caps, never
//! memory or CPU proportional to what it would expand to. Inflated bytes are not
//! kept: they go through the substituter into a re-compressor, so memory is the
//! compressed input plus the compressed output.

use std::io::{self, Write};
use std::sync::Arc;

use flate2::bufread::MultiGzDecoder;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::{Compression, Decompress, FlushDecompress, Status};
use zeroize::Zeroizing;

use crate::http::head::RequestHead;
use crate::subst::{Replacements, Substituter};

/// A request body's content coding, as far as the proxy can rewrite it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    /// Anything else (br, zstd, stacked codings): forwarded untouched.
    Opaque,
}

impl Coding {
    /// gzip or deflate: the codings [`rewrite_compressed`] understands.
    pub fn is_compressed(self) -> bool {
        matches!(self, Self::Gzip | Self::Deflate)
    }
}

pub fn request_coding(head: &RequestHead) -> Coding {
    let values: Vec<Vec<u8>> = head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-encoding"))
        .flat_map(|h| h.value.split(|&b| b == b',').map(|t| t.trim_ascii().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty() && t.as_slice() != b"identity")
        .collect();
    match values.as_slice() {
        [] => Coding::Identity,
        [one] if one == b"gzip" || one == b"x-gzip" => Coding::Gzip,
        [one] if one == b"deflate" => Coding::Deflate,
        _ => Coding::Opaque,
    }
}

/// Bounds on inflating one compressed request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflateCaps {
    /// Most decompressed bytes accepted.
    pub max_inflated: u64,
    /// Most decompressed bytes per compressed byte.
    pub max_ratio: u64,
}

/// Bodies that inflate to no more than this are exempt from the ratio cap: a
/// small, very repetitive JSON document legitimately compresses beyond 200:1,
/// and at this size inflating costs nothing worth capping.
pub const RATIO_EXEMPT_BYTES: u64 = 1024 * 1024;

/// Output piece size: the caps are checked after every piece, so a cap is
/// overshot by less than this.
const PIECE: usize = 64 * 1024;

/// Why a compressed body cannot be forwarded.
#[derive(Debug, PartialEq, Eq)]
pub enum CompressedError {
    /// It inflates past a cap; the message names the cap. Answer 413.
    Limit(String),
    /// It does not decode, and the part that does holds a token that would go out
    /// unreplaced. The message says where decoding failed (never body content).
    Corrupt(String),
}

/// The result of [`rewrite_compressed`].
pub enum Rewritten {
    /// Nothing to replace (or a body that does not decode, with no token in the
    /// part that does): forward the body exactly as received.
    Unchanged,
    /// Re-compressed body with the same coding, and how many tokens it had.
    Body { body: Zeroizing<Vec<u8>>, replaced: u64 },
}

/// Shows a size as the operator configured it ("64 MiB"), or in bytes.
pub fn show_size(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// True if `b` starts with a zlib header (RFC 1950): `deflate` bodies come zlib-wrapped
/// per the RFC or raw in practice, and these two bytes tell them apart.
pub(crate) fn is_zlib_header(b: &[u8]) -> bool {
    b.len() >= 2 && (b[0] & 0x0f) == 8 && (b[0] >> 4) <= 7 && ((u16::from(b[0]) << 8) | u16::from(b[1])) % 31 == 0
}

/// Pull-style decompressor over a body held in memory.
enum Inflater<'a> {
    /// Multi-member gzip; flate2 checks each member's CRC and length.
    Gzip(MultiGzDecoder<&'a [u8]>),
    /// zlib-wrapped or raw deflate, driven by hand so that a truncated stream is an
    /// error rather than a silent end of body.
    Deflate { state: Decompress, input: &'a [u8], ended: bool },
}

impl<'a> Inflater<'a> {
    fn new(coding: Coding, body: &'a [u8]) -> Option<Self> {
        match coding {
            Coding::Gzip => Some(Self::Gzip(MultiGzDecoder::new(body))),
            // `deflate` is zlib-wrapped per the RFC, but raw deflate is common: the
            // first two bytes decide.
            Coding::Deflate => {
                Some(Self::Deflate { state: Decompress::new(is_zlib_header(body)), input: body, ended: false })
            }
            Coding::Identity | Coding::Opaque => None,
        }
    }

    /// Fills part of `out`; `Ok(0)` only at the proper end of the stream.
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Gzip(d) => io::Read::read(d, out),
            Self::Deflate { state, input, ended } => loop {
                if *ended {
                    return Ok(0);
                }
                let (in_before, out_before) = (state.total_in(), state.total_out());
                let status = state
                    .decompress(input, out, FlushDecompress::None)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // Both deltas are bounded by the slice lengths passed in.
                let used = usize::try_from(state.total_in() - in_before).unwrap_or(usize::MAX).min(input.len());
                let produced = usize::try_from(state.total_out() - out_before).unwrap_or(usize::MAX).min(out.len());
                *input = &input[used..];
                if status == Status::StreamEnd {
                    *ended = true;
                    if !input.is_empty() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "data after the end of the stream"));
                    }
                }
                if produced > 0 || *ended {
                    return Ok(produced);
                }
                if used == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated deflate stream"));
                }
            },
        }
    }
}

enum Stop {
    Limit(String),
    Decode(io::Error),
}

/// Inflates `body`, handing each piece to `each`, and stops with `Stop::Limit`
/// as soon as the output passes a cap.
fn inflate_each(
    coding: Coding,
    body: &[u8],
    caps: InflateCaps,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<(), Stop> {
    let Some(mut inflater) = Inflater::new(coding, body) else {
        return Err(Stop::Decode(io::Error::new(io::ErrorKind::InvalidInput, "not a compressed coding")));
    };
    let by_ratio = caps.max_ratio.saturating_mul(body.len() as u64).max(RATIO_EXEMPT_BYTES);
    let mut piece = Zeroizing::new(vec![0u8; PIECE]);
    let mut total: u64 = 0;
    loop {
        let n = inflater.read(&mut piece).map_err(Stop::Decode)?;
        if n == 0 {
            return Ok(());
        }
        total += n as u64;
        if total > caps.max_inflated {
            return Err(Stop::Limit(format!(
                "compressed request body inflates past the {} cap on its decompressed size",
                show_size(caps.max_inflated)
            )));
        }
        if total > by_ratio {
            return Err(Stop::Limit(format!(
                "compressed request body expands more than {}:1 (cap on the decompression ratio)",
                caps.max_ratio
            )));
        }
        each(&piece[..n]).map_err(Stop::Decode)?;
    }
}

enum Reencoder<'a> {
    Gzip(GzEncoder<&'a mut Vec<u8>>),
    Zlib(ZlibEncoder<&'a mut Vec<u8>>),
    Raw(DeflateEncoder<&'a mut Vec<u8>>),
}

impl<'a> Reencoder<'a> {
    /// Same coding (and deflate wrapping) as the body received.
    fn like(coding: Coding, body: &[u8], out: &'a mut Vec<u8>) -> Self {
        let fast = Compression::fast();
        match coding {
            Coding::Deflate if is_zlib_header(body) => Self::Zlib(ZlibEncoder::new(out, fast)),
            Coding::Deflate => Self::Raw(DeflateEncoder::new(out, fast)),
            _ => Self::Gzip(GzEncoder::new(out, fast)),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Self::Gzip(e) => e.write_all(data),
            Self::Zlib(e) => e.write_all(data),
            Self::Raw(e) => e.write_all(data),
        }
    }

    fn finish(self) -> io::Result<()> {
        match self {
            Self::Gzip(e) => e.finish().map(drop),
            Self::Zlib(e) => e.finish().map(drop),
            Self::Raw(e) => e.finish().map(drop),
        }
    }
}

/// Replaces tokens inside a whole gzip/deflate body (blocking, CPU-bound: run it
/// off the async threads). Two passes: the first only inflates and counts tokens,
/// enforcing the caps, so the common body without tokens costs no compression
/// and a bomb is refused before any output is built; the second (only with
/// tokens) inflates again through the substituter into a re-compressor.
pub fn rewrite_compressed(
    coding: Coding,
    body: &[u8],
    repl: &Arc<Replacements>,
    caps: InflateCaps,
) -> Result<Rewritten, CompressedError> {
    if body.is_empty() || !coding.is_compressed() || repl.is_empty() {
        return Ok(Rewritten::Unchanged);
    }
    // Holds secret values between the substituter and the compressor.
    let mut scratch = Zeroizing::new(Vec::with_capacity(PIECE + 1024));
    let mut subst = Substituter::new(repl.clone());
    let scanned = inflate_each(coding, body, caps, |piece| {
        scratch.clear();
        subst.push(piece, &mut scratch);
        Ok(())
    });
    scratch.clear();
    subst.finish(&mut scratch);
    scratch.clear();
    match scanned {
        Err(Stop::Limit(why)) => return Err(CompressedError::Limit(why)),
        Err(Stop::Decode(e)) if subst.replaced() > 0 => {
            return Err(CompressedError::Corrupt(format!(
                "{} (a sealed token before that point cannot be replaced)",
                decode_error_text(&e)
            )));
        }
        // Sent as received: the upstream gets the same undecodable body it would
        // have got without the proxy, and no token in it could be replaced.
        Err(Stop::Decode(_)) => return Ok(Rewritten::Unchanged),
        Ok(()) if subst.replaced() == 0 => return Ok(Rewritten::Unchanged),
        Ok(()) => {}
    }

    // Output is usually about the input's size; a secret longer than its token
    // makes it grow a little.
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + body.len() / 8 + 1024));
    let mut encoder = Reencoder::like(coding, body, &mut out);
    let mut subst = Substituter::new(repl.clone());
    // Same input and caps as the first pass, so this cannot fail; map it anyway.
    inflate_each(coding, body, caps, |piece| {
        scratch.clear();
        subst.push(piece, &mut scratch);
        encoder.write_all(&scratch)
    })
    .map_err(|e| match e {
        Stop::Limit(why) => CompressedError::Limit(why),
        Stop::Decode(e) => CompressedError::Corrupt(decode_error_text(&e)),
    })?;
    scratch.clear();
    subst.finish(&mut scratch);
    let replaced = subst.replaced();
    encoder
        .write_all(&scratch)
        .and_then(|()| encoder.finish())
        .map_err(|e| CompressedError::Corrupt(decode_error_text(&e)))?;
    Ok(Rewritten::Body { body: out, replaced })
}

/// Error text from flate2 names the failure (bad header, corrupt stream, CRC),
/// never data.
fn decode_error_text(e: &io::Error) -> String {
    format!("body does not decode: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretValue;
    use std::io::Read;

    const TOKEN: &str = "osb_sealed_00112233445566778899aabbccddeeff";
    const CAPS: InflateCaps = InflateCaps { max_inflated: 64 << 20, max_ratio: 200 };

    fn repl() -> Arc<Replacements> {
        let mut r = Replacements::new();
        r.insert(TOKEN.as_bytes(), Arc::new(SecretValue::new(b"the-secret".to_vec())));
        Arc::new(r)
    }

    fn plain_body() -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..2000 {
            b.extend(format!("{{\"n\":{i},\"key\":\"{TOKEN}\"}}\n").as_bytes());
        }
        b
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn rewritten(r: Result<Rewritten, CompressedError>) -> (Vec<u8>, u64) {
        match r {
            Ok(Rewritten::Body { body, replaced }) => (body.to_vec(), replaced),
            Ok(Rewritten::Unchanged) => panic!("expected a rewritten body, got Unchanged"),
            Err(e) => panic!("expected a rewritten body, got {e:?}"),
        }
    }

    fn expected(body: &[u8]) -> String {
        String::from_utf8(body.to_vec()).unwrap().replace(TOKEN, "the-secret")
    }

    #[test]
    fn gzip_body_is_rewritten_and_still_gzip() {
        let body = plain_body();
        let (out, n) = rewritten(rewrite_compressed(Coding::Gzip, &gzip(&body), &repl(), CAPS));
        assert_eq!(n, 2000);
        let mut decoded = String::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, expected(&body));
        // Two gzip members are one body.
        let two = [gzip(&body[..1000]), gzip(&body[1000..])].concat();
        let (out, n) = rewritten(rewrite_compressed(Coding::Gzip, &two, &repl(), CAPS));
        assert_eq!(n, 2000);
        let mut decoded = String::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, expected(&body));
    }

    #[test]
    fn zlib_and_raw_deflate_are_both_recognised() {
        let body = plain_body();
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&body).unwrap();
        let (out, n) = rewritten(rewrite_compressed(Coding::Deflate, &z.finish().unwrap(), &repl(), CAPS));
        assert_eq!(n, 2000);
        let mut s = String::new();
        flate2::read::ZlibDecoder::new(&out[..]).read_to_string(&mut s).unwrap();
        assert_eq!(s, expected(&body));

        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&body).unwrap();
        let (out, n) = rewritten(rewrite_compressed(Coding::Deflate, &raw.finish().unwrap(), &repl(), CAPS));
        assert_eq!(n, 2000);
        let mut s = String::new();
        flate2::read::DeflateDecoder::new(&out[..]).read_to_string(&mut s).unwrap();
        assert_eq!(s, expected(&body));
    }

    #[test]
    fn bodies_without_tokens_are_unchanged() {
        let gz = gzip(b"no token in here");
        assert!(matches!(rewrite_compressed(Coding::Gzip, &gz, &repl(), CAPS), Ok(Rewritten::Unchanged)));
        let body = plain_body();
        assert!(matches!(rewrite_compressed(Coding::Opaque, &body, &repl(), CAPS), Ok(Rewritten::Unchanged)));
        assert!(matches!(rewrite_compressed(Coding::Gzip, b"", &repl(), CAPS), Ok(Rewritten::Unchanged)));
        let none = Arc::new(Replacements::new());
        assert!(matches!(rewrite_compressed(Coding::Gzip, &gzip(&body), &none, CAPS), Ok(Rewritten::Unchanged)));
    }

    #[test]
    fn corrupt_bodies() {
        // Not gzip at all, no token decodable: sent as received.
        let r = rewrite_compressed(Coding::Gzip, b"not gzip at all, definitely not", &repl(), CAPS);
        assert!(matches!(r, Ok(Rewritten::Unchanged)));
        let r = rewrite_compressed(Coding::Deflate, &[0xff; 64], &repl(), CAPS);
        assert!(matches!(r, Ok(Rewritten::Unchanged)));
        // A token decodes before the damage (truncation, bad CRC, trailing junk): refused.
        let body = plain_body();
        let gz = gzip(&body);
        let truncated = &gz[..gz.len() - 6];
        assert!(matches!(rewrite_compressed(Coding::Gzip, truncated, &repl(), CAPS), Err(CompressedError::Corrupt(_))));
        let mut bad_crc = gz.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 1;
        assert!(matches!(rewrite_compressed(Coding::Gzip, &bad_crc, &repl(), CAPS), Err(CompressedError::Corrupt(_))));
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&body).unwrap();
        let raw = raw.finish().unwrap();
        let r = rewrite_compressed(Coding::Deflate, &raw[..raw.len() / 2], &repl(), CAPS);
        assert!(matches!(r, Err(CompressedError::Corrupt(_))), "truncated raw deflate is not a clean end");
        let junk = [raw.clone(), b"junk".to_vec()].concat();
        assert!(matches!(rewrite_compressed(Coding::Deflate, &junk, &repl(), CAPS), Err(CompressedError::Corrupt(_))));
        // Error text names no content.
        if let Err(CompressedError::Corrupt(why)) = rewrite_compressed(Coding::Gzip, truncated, &repl(), CAPS) {
            assert!(!why.contains(TOKEN) && !why.contains("the-secret"), "{why}");
        }
    }

    #[test]
    fn ratio_cap_stops_a_small_repetitive_body() {
        // 8 MiB of zeros and a token compress to a few KiB: far past 200:1.
        let mut body = vec![0u8; 8 << 20];
        body[..TOKEN.len()].copy_from_slice(TOKEN.as_bytes());
        let gz = gzip(&body);
        assert!(gz.len() < 64 * 1024);
        match rewrite_compressed(Coding::Gzip, &gz, &repl(), CAPS) {
            Err(CompressedError::Limit(why)) => assert!(why.contains("200:1"), "{why}"),
            _ => panic!("ratio cap not applied"),
        }
        // The same body is fine with a looser ratio.
        let loose = InflateCaps { max_ratio: 100_000, ..CAPS };
        let (_, n) = rewritten(rewrite_compressed(Coding::Gzip, &gz, &repl(), loose));
        assert_eq!(n, 1);
        // Small bodies are exempt whatever their ratio.
        let mut small = vec![b' '; 512 * 1024];
        small[..TOKEN.len()].copy_from_slice(TOKEN.as_bytes());
        let (_, n) = rewritten(rewrite_compressed(Coding::Gzip, &gzip(&small), &repl(), CAPS));
        assert_eq!(n, 1);
    }

    #[test]
    fn size_cap_applies_as_output_grows() {
        let body = plain_body();
        let tight = InflateCaps { max_inflated: 4096, max_ratio: 1000 };
        match rewrite_compressed(Coding::Gzip, &gzip(&body), &repl(), tight) {
            Err(CompressedError::Limit(why)) => assert!(why.contains("4 KiB"), "{why}"),
            _ => panic!("size cap not applied"),
        }
        // Without a token the cap still applies: the body would be sent whole otherwise.
        match rewrite_compressed(Coding::Gzip, &gzip(&vec![b'x'; 8192]), &repl(), tight) {
            Err(CompressedError::Limit(_)) => {}
            _ => panic!("size cap not applied to a body without tokens"),
        }
    }

    #[test]
    fn sizes_are_shown_as_configured() {
        assert_eq!(show_size(64 << 20), "64 MiB");
        assert_eq!(show_size(4096), "4 KiB");
        assert_eq!(show_size(1000), "1000 bytes");
    }

    #[test]
    fn coding_detection() {
        let h = |v: &str| {
            crate::http::head::parse_request_head(format!("POST / HTTP/1.1\r\n{v}\r\n\r\n").as_bytes(), 10).unwrap()
        };
        assert_eq!(request_coding(&h("X: y")), Coding::Identity);
        assert_eq!(request_coding(&h("Content-Encoding: GZIP")), Coding::Gzip);
        assert_eq!(request_coding(&h("Content-Encoding: deflate")), Coding::Deflate);
        assert_eq!(request_coding(&h("Content-Encoding: br")), Coding::Opaque);
        assert_eq!(request_coding(&h("Content-Encoding: gzip, br")), Coding::Opaque);
    }
}
