//! Request body rewriting: decoded body bytes in, bytes with tokens replaced out.
//! gzip/deflate bodies are decompressed, rewritten and compressed again, all
//! streaming, so memory stays bounded whatever the body size.

use std::io::{self, Write};
use std::sync::Arc;

use flate2::write::{DeflateDecoder, DeflateEncoder, GzEncoder, MultiGzDecoder, ZlibDecoder, ZlibEncoder};
use flate2::Compression;
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

enum Reencoder {
    Gzip(GzEncoder<Vec<u8>>),
    Zlib(ZlibEncoder<Vec<u8>>),
    Raw(DeflateEncoder<Vec<u8>>),
}

impl Reencoder {
    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Self::Gzip(e) => e.get_mut(),
            Self::Zlib(e) => e.get_mut(),
            Self::Raw(e) => e.get_mut(),
        }
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Self::Gzip(e) => e.finish(),
            Self::Zlib(e) => e.finish(),
            Self::Raw(e) => e.finish(),
        }
    }
}

impl Write for Reencoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Gzip(e) => e.write(buf),
            Self::Zlib(e) => e.write(buf),
            Self::Raw(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decompressed bytes -> substitution -> compressor.
struct SubstSink {
    subst: Substituter,
    scratch: Zeroizing<Vec<u8>>,
    encoder: Reencoder,
}

impl Write for SubstSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scratch.clear();
        self.subst.push(buf, &mut self.scratch);
        self.encoder.write_all(&self.scratch)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SubstSink {
    fn finish(mut self) -> io::Result<(Vec<u8>, u64)> {
        self.scratch.clear();
        self.subst.finish(&mut self.scratch);
        self.encoder.write_all(&self.scratch)?;
        let replaced = self.subst.replaced();
        Ok((self.encoder.finish()?, replaced))
    }
}

enum Decoder {
    Gzip(MultiGzDecoder<SubstSink>),
    Zlib(ZlibDecoder<SubstSink>),
    Raw(DeflateDecoder<SubstSink>),
}

impl Decoder {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Self::Gzip(d) => d.write_all(data),
            Self::Zlib(d) => d.write_all(data),
            Self::Raw(d) => d.write_all(data),
        }
    }

    fn sink(&mut self) -> &mut SubstSink {
        match self {
            Self::Gzip(d) => d.get_mut(),
            Self::Zlib(d) => d.get_mut(),
            Self::Raw(d) => d.get_mut(),
        }
    }

    fn finish(self) -> io::Result<SubstSink> {
        match self {
            Self::Gzip(d) => d.finish(),
            Self::Zlib(d) => d.finish(),
            Self::Raw(d) => d.finish(),
        }
    }
}

enum Stage {
    Plain(Substituter),
    /// `deflate` is zlib-wrapped per the RFC, but raw deflate is common: the first
    /// two bytes decide.
    SniffDeflate(Vec<u8>),
    Compressed(Box<Decoder>),
}

/// Rewrites one body; see the module doc.
pub struct BodyRewriter {
    stage: Option<Stage>,
    repl: Arc<Replacements>,
    plain_replaced: u64,
}

fn is_zlib_header(b: &[u8]) -> bool {
    b.len() >= 2 && (b[0] & 0x0f) == 8 && (b[0] >> 4) <= 7 && ((u16::from(b[0]) << 8) | u16::from(b[1])) % 31 == 0
}

fn sink(repl: &Arc<Replacements>, encoder: Reencoder) -> SubstSink {
    SubstSink { subst: Substituter::new(repl.clone()), scratch: Zeroizing::new(Vec::new()), encoder }
}

impl BodyRewriter {
    pub fn new(coding: Coding, repl: Arc<Replacements>) -> Self {
        let fast = Compression::fast();
        let stage = match coding {
            Coding::Identity => Stage::Plain(Substituter::new(repl.clone())),
            Coding::Opaque => Stage::Plain(Substituter::new(Arc::new(Replacements::new()))),
            Coding::Gzip => Stage::Compressed(Box::new(Decoder::Gzip(MultiGzDecoder::new(sink(
                &repl,
                Reencoder::Gzip(GzEncoder::new(Vec::new(), fast)),
            ))))),
            Coding::Deflate => Stage::SniffDeflate(Vec::with_capacity(2)),
        };
        Self { stage: Some(stage), repl, plain_replaced: 0 }
    }

    /// Feeds decoded-framing body bytes; rewritten output is appended to `out`
    /// (possibly nothing yet, while a compressor buffers).
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut input = input;
        if let Some(Stage::SniffDeflate(head)) = &mut self.stage {
            let take = (2 - head.len()).min(input.len());
            head.extend_from_slice(&input[..take]);
            input = &input[take..];
            if head.len() < 2 {
                return Ok(());
            }
            let head = std::mem::take(head);
            let fast = Compression::fast();
            let decoder = if is_zlib_header(&head) {
                Decoder::Zlib(ZlibDecoder::new(sink(&self.repl, Reencoder::Zlib(ZlibEncoder::new(Vec::new(), fast)))))
            } else {
                Decoder::Raw(DeflateDecoder::new(sink(
                    &self.repl,
                    Reencoder::Raw(DeflateEncoder::new(Vec::new(), fast)),
                )))
            };
            let mut decoder = Box::new(decoder);
            decoder.write_all(&head)?;
            self.stage = Some(Stage::Compressed(decoder));
        }
        match &mut self.stage {
            Some(Stage::Plain(s)) => s.push(input, out),
            Some(Stage::Compressed(d)) => {
                d.write_all(input)?;
                out.append(d.sink().encoder.output());
            }
            Some(Stage::SniffDeflate(_)) | None => {}
        }
        Ok(())
    }

    /// Ends the body; returns how many tokens were replaced in it.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<u64> {
        match self.stage.take() {
            Some(Stage::Plain(mut s)) => {
                s.finish(out);
                self.plain_replaced = s.replaced();
                Ok(self.plain_replaced)
            }
            Some(Stage::Compressed(d)) => {
                let (tail, replaced) = d.finish()?.finish()?;
                out.extend_from_slice(&tail);
                Ok(replaced)
            }
            Some(Stage::SniffDeflate(head)) if head.is_empty() => Ok(0),
            Some(Stage::SniffDeflate(_)) => Err(io::Error::new(io::ErrorKind::InvalidData, "truncated deflate body")),
            None => Ok(self.plain_replaced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretValue;
    use std::io::Read;

    const TOKEN: &str = "osb_sealed_00112233445566778899aabbccddeeff";

    fn repl() -> Arc<Replacements> {
        let mut r = Replacements::new();
        r.insert(TOKEN.as_bytes(), Arc::new(SecretValue::new(b"the-secret".to_vec())));
        Arc::new(r)
    }

    fn run(coding: Coding, body: &[u8], piece: usize) -> (Vec<u8>, u64) {
        let mut w = BodyRewriter::new(coding, repl());
        let mut out = Vec::new();
        for p in body.chunks(piece) {
            w.push(p, &mut out).unwrap();
        }
        let n = w.finish(&mut out).unwrap();
        (out, n)
    }

    fn plain_body() -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..2000 {
            b.extend(format!("{{\"n\":{i},\"key\":\"{TOKEN}\"}}\n").as_bytes());
        }
        b
    }

    #[test]
    fn gzip_body_is_rewritten_and_still_gzip() {
        let body = plain_body();
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&body).unwrap();
        let gz = enc.finish().unwrap();
        let (out, n) = run(Coding::Gzip, &gz, 777);
        assert_eq!(n, 2000);
        let mut decoded = String::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_string(&mut decoded).unwrap();
        assert_eq!(decoded, String::from_utf8(body).unwrap().replace(TOKEN, "the-secret"));
    }

    #[test]
    fn zlib_and_raw_deflate_are_both_recognised() {
        let body = plain_body();
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&body).unwrap();
        let (out, n) = run(Coding::Deflate, &z.finish().unwrap(), 1);
        assert_eq!(n, 2000);
        let mut s = String::new();
        flate2::read::ZlibDecoder::new(&out[..]).read_to_string(&mut s).unwrap();
        assert!(s.contains("the-secret") && !s.contains(TOKEN));

        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&body).unwrap();
        let (out, n) = run(Coding::Deflate, &raw.finish().unwrap(), 4096);
        assert_eq!(n, 2000);
        let mut s = String::new();
        flate2::read::DeflateDecoder::new(&out[..]).read_to_string(&mut s).unwrap();
        assert!(s.contains("the-secret") && !s.contains(TOKEN));
    }

    #[test]
    fn opaque_and_corrupt_bodies() {
        let body = plain_body();
        let (out, n) = run(Coding::Opaque, &body, 100);
        assert_eq!((out, n), (body.clone(), 0));
        let mut w = BodyRewriter::new(Coding::Gzip, repl());
        let mut out = Vec::new();
        let corrupt =
            w.push(b"not gzip at all, definitely not", &mut out).and_then(|()| w.finish(&mut out).map(|_| ()));
        assert!(corrupt.is_err());
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
