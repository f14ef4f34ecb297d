//! One layer's bytes as a tar stream: decompressed (gzip or zstd, by magic bytes), counted for
//! progress, hashed as stored and/or as a tar stream, with the bytes the tar reader may take
//! for headers between two entries bounded.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Take};

use flate2::bufread::MultiGzDecoder;
use ring::digest;

use crate::Refusal;

const INPUT_BUFFER: usize = 256 << 10;
/// zstd's window (decoder memory) is capped at 2^27 = 128 MiB, the most `zstd --long` uses.
const WINDOW_LOG_MAX: u32 = 27;
/// The most that may follow a tar stream's end-of-archive marker (padding to a record; GNU tar
/// pads to 10 KiB).
const TAIL_MAX: u64 = 1 << 20;
/// The most the tar reader may read between two entries: the rest of a block, PAX records, GNU
/// long names and the header. The tar crate holds PAX records and long names in memory, so
/// this is what bounds that memory.
pub(crate) const HEADER_ALLOWANCE: u64 = 4 << 20;

#[derive(Clone, Copy)]
pub(crate) enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression the first bytes of a stream show.
    pub(crate) fn detect(magic: &[u8]) -> Result<Compression, Refusal> {
        let refused = |name: &str| {
            Err(Refusal::Invalid(format!(
                "the data is {name}-compressed; only uncompressed, gzip and zstd tar streams are supported"
            )))
        };
        if magic.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            refused("xz")
        } else if magic.starts_with(b"BZh") {
            refused("bzip2")
        } else {
            Ok(Compression::Plain)
        }
    }
}

/// Shared between the stream and the code driving the tar reader over it.
#[derive(Default)]
pub(crate) struct Meters {
    /// Bytes of the layer as stored read so far.
    pub raw_bytes: Cell<u64>,
    /// While Some, how many more bytes the tar reader may read (see `HEADER_ALLOWANCE`).
    pub header_allowance: Cell<Option<u64>>,
}

/// The layer as stored, counted and hashed.
struct Raw<'m> {
    inner: Take<File>,
    meters: &'m Meters,
    hash: Option<digest::Context>,
}

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.meters.raw_bytes.set(self.meters.raw_bytes.get() + n as u64);
        if let Some(hash) = &mut self.hash {
            hash.update(&buf[..n]);
        }
        Ok(n)
    }
}

enum Decoder<'m> {
    Plain(BufReader<Raw<'m>>),
    Gzip(MultiGzDecoder<BufReader<Raw<'m>>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<Raw<'m>>>),
}

impl Read for Decoder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

impl<'m> Decoder<'m> {
    /// The stored-bytes reader underneath (what its buffer held has been counted and hashed).
    fn into_raw(self) -> Raw<'m> {
        match self {
            Decoder::Plain(r) => r.into_inner(),
            Decoder::Gzip(r) => r.into_inner().into_inner(),
            Decoder::Zstd(r) => r.into_inner().into_inner(),
        }
    }
}

pub(crate) struct Digests {
    /// Of the layer as stored.
    pub raw: Option<digest::Digest>,
    /// Of its uncompressed tar stream.
    pub tar: Option<digest::Digest>,
}

pub(crate) struct LayerStream<'m> {
    decoder: Decoder<'m>,
    meters: &'m Meters,
    tar_hash: Option<digest::Context>,
    ended: bool,
}

impl<'m> LayerStream<'m> {
    pub(crate) fn open(
        input: Take<File>,
        meters: &'m Meters,
        hash_raw: bool,
        hash_tar: bool,
    ) -> Result<LayerStream<'m>, Refusal> {
        let hash = hash_raw.then(|| digest::Context::new(&digest::SHA256));
        let mut buffered = BufReader::with_capacity(INPUT_BUFFER, Raw { inner: input, meters, hash });
        let magic = buffered.fill_buf().map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?;
        let decoder = match Compression::detect(magic)? {
            Compression::Plain => Decoder::Plain(buffered),
            Compression::Gzip => Decoder::Gzip(MultiGzDecoder::new(buffered)),
            Compression::Zstd => {
                let bad = |e: io::Error| Refusal::Invalid(format!("the zstd stream cannot be decoded: {e}"));
                let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered).map_err(bad)?;
                decoder.window_log_max(WINDOW_LOG_MAX).map_err(bad)?;
                Decoder::Zstd(decoder)
            }
        };
        let tar_hash = hash_tar.then(|| digest::Context::new(&digest::SHA256));
        Ok(LayerStream { decoder, meters, tar_hash, ended: false })
    }

    /// Whether the stream ran out while the tar reader still read from it, i.e. the tar ended
    /// without its end-of-archive marker.
    pub(crate) fn ended_early(&self) -> bool {
        self.ended
    }

    /// Reads what follows the tar stream's end (so the compression's own checks and the digests
    /// cover every byte) and returns the digests asked for.
    pub(crate) fn finish(mut self) -> Result<Digests, Refusal> {
        let mut buf = vec![0u8; 64 << 10];
        let mut tail = 0u64;
        loop {
            let n = match self.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Refusal::Invalid(format!("the data after the tar stream is corrupt: {e}"))),
            };
            tail += n as u64;
            if tail > TAIL_MAX {
                return Err(Refusal::Invalid(format!("more than {TAIL_MAX} bytes follow the end of the tar stream")));
            }
        }
        let tar = self.tar_hash.take().map(digest::Context::finish);
        let mut raw = self.decoder.into_raw();
        io::copy(&mut raw, &mut io::sink()).map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?;
        Ok(Digests { raw: raw.hash.map(digest::Context::finish), tar })
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.decoder.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended = true;
        }
        if let Some(left) = self.meters.header_allowance.get() {
            let Some(left) = left.checked_sub(n as u64) else {
                return Err(io::Error::other(format!(
                    "an entry's headers and extended records take more than {HEADER_ALLOWANCE} bytes"
                )));
            };
            self.meters.header_allowance.set(Some(left));
        }
        if let Some(hash) = &mut self.tar_hash {
            hash.update(&buf[..n]);
        }
        Ok(n)
    }
}
