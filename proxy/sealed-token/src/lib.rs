//! The sealed-token format, the one thing the appliance (which mints tokens) and the sealing
//! proxy (which finds and replaces them) must agree on byte for byte.
//!
//! A token is `osb_sealed_` followed by 32 lowercase hex digits: 16 random bytes chosen by the
//! minting side. Randomness is the caller's job, so this crate stays free of dependencies.

/// Fixed start of every sealed token.
pub const PREFIX: &str = "osb_sealed_";
/// Random bytes behind one token.
pub const RANDOM_BYTES: usize = 16;
/// Number of lowercase hex digits after the prefix.
pub const HEX_LEN: usize = RANDOM_BYTES * 2;
/// Total length of a sealed token in bytes.
pub const LEN: usize = PREFIX.len() + HEX_LEN;

/// True for the digits a token's hex part may hold (`0-9`, `a-f`).
pub fn is_hex_digit(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// True if `s` is exactly one well-formed sealed token.
pub fn is_token(s: &[u8]) -> bool {
    s.len() == LEN && s.starts_with(PREFIX.as_bytes()) && s[PREFIX.len()..].iter().all(|b| is_hex_digit(*b))
}

/// The token for these random bytes.
pub fn from_random(bytes: &[u8; RANDOM_BYTES]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut token = String::with_capacity(LEN);
    token.push_str(PREFIX);
    for b in bytes {
        token.push(char::from(DIGITS[usize::from(b >> 4)]));
        token.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_recognised() {
        let token = from_random(&[0xab; RANDOM_BYTES]);
        assert_eq!(token, format!("osb_sealed_{}", "ab".repeat(16)));
        assert!(is_token(token.as_bytes()));
        assert_eq!(token.len(), LEN);
    }

    #[test]
    fn near_misses_are_not_tokens() {
        let good = from_random(&[0x01; RANDOM_BYTES]);
        assert!(!is_token(good.to_uppercase().as_bytes()));
        assert!(!is_token(&good.as_bytes()[..LEN - 1]));
        assert!(!is_token(format!("{good}0").as_bytes()));
        assert!(!is_token(b"osb_sealed_XYZ"));
        assert!(!is_token(good.replace("osb", "osc").as_bytes()));
    }
}
