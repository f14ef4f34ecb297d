//! `sha256:<hex>` digests, as descriptors and content-addressed names give them.

use std::fmt;

use ring::digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digest {
    /// 64 lowercase hex digits (so it is also safe to use as a file name).
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex digits>`; other algorithms are refused.
    pub(crate) fn parse(text: &str) -> Result<Digest, String> {
        let Some(hex) = text.strip_prefix("sha256:") else {
            return Err(format!("digest {text:?} is not sha256 (the only algorithm supported)"));
        };
        Digest::from_hex(hex).ok_or_else(|| format!("digest {text:?} is not 64 lowercase hex digits"))
    }

    pub(crate) fn from_hex(hex: &str) -> Option<Digest> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| Digest { hex: hex.to_string() })
    }

    /// Where an OCI image layout keeps the blob.
    pub(crate) fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.hex)
    }

    pub(crate) fn matches(&self, computed: &digest::Digest) -> bool {
        let hex: String = computed.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        hex == self.hex
    }

    pub(crate) fn matches_bytes(&self, data: &[u8]) -> bool {
        self.matches(&digest::digest(&digest::SHA256, data))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_digests_parse() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d = Digest::parse(&format!("sha256:{hex}")).expect("valid");
        assert!(d.matches_bytes(b""));
        assert!(!d.matches_bytes(b"x"));
        assert_eq!(d.blob_path(), format!("blobs/sha256/{hex}"));
        assert!(Digest::parse(&format!("sha512:{hex}")).is_err());
        assert!(Digest::parse(&format!("sha256:{}", hex.to_uppercase())).is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse(&format!("sha256:{hex}0")).is_err());
    }
}
