//! The signature statement of a disk image: which image (its SHA-256), which manifest, which
//! version, signed by which Ed25519 key. The image build writes it beside the image
//! (`<image>.sig`, one line); an upload sends that line in the [`HEADER`] header, and the
//! appliance installs the image only when the signature verifies with a key it trusts and the
//! uploaded bytes have the stated digest. The cryptography is at either end (ring); this is the
//! format both ends agree on.
//!
//! `oc-image-signature-v1 image-sha256=<64 hex> manifest-sha256=<64 hex> version=<v> key=<64 hex> sig=<128 hex>`
//!
//! The signature covers everything before ` sig=`.

/// The HTTP header an upload carries the statement in.
pub const HEADER: &str = "X-OpenComputer-Signature";
/// What the build names the statement file: the image's path plus this.
pub const FILE_SUFFIX: &str = ".sig";
const MAGIC: &str = "oc-image-signature-v1";
const MAX_VERSION_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// SHA-256 of the raw (uncompressed) disk image, lowercase hex.
    pub image_sha256: String,
    /// SHA-256 of the manifest the build wrote beside the image, lowercase hex.
    pub manifest_sha256: String,
    pub version: String,
    /// The Ed25519 public key that signs, lowercase hex.
    pub key: String,
}

impl Statement {
    /// The bytes the signature covers.
    pub fn signed_text(&self) -> String {
        format!(
            "{MAGIC} image-sha256={} manifest-sha256={} version={} key={}",
            self.image_sha256, self.manifest_sha256, self.version, self.key
        )
    }

    /// The whole line, with the signature (64 bytes).
    pub fn render(&self, signature: &[u8]) -> String {
        format!("{} sig={}", self.signed_text(), hex(signature))
    }

    /// Parses a line made by `render`; returns the statement and the signature bytes.
    pub fn parse(line: &str) -> Result<(Statement, Vec<u8>), String> {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(format!("it does not start with {MAGIC}"));
        }
        let mut field = |name: &str| -> Result<&str, String> {
            words
                .next()
                .and_then(|w| w.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("{name}= is missing or out of order"))
        };
        let image_sha256 = lower_hex(field("image-sha256")?, 32, "image-sha256")?;
        let manifest_sha256 = lower_hex(field("manifest-sha256")?, 32, "manifest-sha256")?;
        let version = field("version")?.to_string();
        if version.is_empty() || version.len() > MAX_VERSION_LEN {
            return Err(format!("version= must be 1 to {MAX_VERSION_LEN} characters"));
        }
        let key = lower_hex(field("key")?, 32, "key")?;
        let signature = unhex(&lower_hex(field("sig")?, 64, "sig")?).ok_or("sig= is not hex")?;
        if words.next().is_some() {
            return Err("it has more after sig=".into());
        }
        Ok((Statement { image_sha256, manifest_sha256, version, key }, signature))
    }
}

/// `text` as lowercase hex of exactly `bytes` bytes.
fn lower_hex(text: &str, bytes: usize, name: &str) -> Result<String, String> {
    if text.len() != bytes * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{name}= must be {} hex digits", bytes * 2));
    }
    Ok(text.to_ascii_lowercase())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Statement {
        Statement {
            image_sha256: "ab".repeat(32),
            manifest_sha256: "cd".repeat(32),
            version: "0.1.0-rebuilt".into(),
            key: "ef".repeat(32),
        }
    }

    #[test]
    fn a_rendered_line_parses_back() {
        let line = sample().render(&[7u8; 64]);
        let (statement, signature) = Statement::parse(&line).expect("parses");
        assert_eq!(statement, sample());
        assert_eq!(signature, vec![7u8; 64]);
        assert!(line.starts_with(&sample().signed_text()));
        // Upper-case hex is accepted and normalised.
        let (upper, _) = Statement::parse(&line.replace("abab", "ABAB")).expect("parses");
        assert_eq!(upper.image_sha256, sample().image_sha256);
    }

    #[test]
    fn malformed_lines_are_refused_naming_the_field() {
        let good = sample().render(&[7u8; 64]);
        let cases = [
            (String::new(), "does not start"),
            (good.replace(MAGIC, "oc-image-signature-v2"), "does not start"),
            (good.replace("image-sha256=", "image-sha="), "image-sha256= is missing"),
            (good.replace(&"ab".repeat(32), "ab"), "image-sha256= must be 64 hex digits"),
            (good.replace("version=0.1.0-rebuilt", "version="), "version= must be"),
            (good.replace(&"ef".repeat(32), &"zz".repeat(32)), "key= must be 64 hex digits"),
            (good.replace(" sig=", " signature="), "sig= is missing"),
            (format!("{good} extra"), "more after sig="),
        ];
        for (line, want) in cases {
            let e = Statement::parse(&line).expect_err(&line);
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
