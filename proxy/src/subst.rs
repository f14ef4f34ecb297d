//! Streaming replacement of sealed tokens by secret values.
//!
//! A token is `osb_sealed_` followed by 32 lowercase hex digits. The engine sees a
//! byte stream in arbitrary pieces, so a token may be split across pieces: at most
//! `TOKEN_LEN - 1` bytes are held back between pieces, which bounds its memory.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use memchr::memmem;
use zeroize::Zeroizing;

use crate::secret::SecretValue;

pub use sealed_token::is_token;
pub use sealed_token::LEN as TOKEN_LEN;
use sealed_token::{is_hex_digit as is_token_hex, HEX_LEN as TOKEN_HEX_LEN};

/// Fixed start of every sealed token.
pub const TOKEN_PREFIX: &[u8] = sealed_token::PREFIX.as_bytes();

fn prefix_finder() -> &'static memmem::Finder<'static> {
    static FINDER: OnceLock<memmem::Finder<'static>> = OnceLock::new();
    FINDER.get_or_init(|| memmem::Finder::new(TOKEN_PREFIX))
}

/// The tokens that may be replaced in one request: only the calling sandbox's
/// tokens whose secret may reach the request's destination.
#[derive(Default)]
pub struct Replacements {
    by_hex: HashMap<[u8; TOKEN_HEX_LEN], Arc<SecretValue>>,
}

impl Replacements {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token (must satisfy [`is_token`]; others are ignored and reported false).
    pub fn insert(&mut self, token: &[u8], value: Arc<SecretValue>) -> bool {
        if !is_token(token) {
            return false;
        }
        let mut key = [0u8; TOKEN_HEX_LEN];
        key.copy_from_slice(&token[TOKEN_PREFIX.len()..]);
        self.by_hex.insert(key, value);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.by_hex.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_hex.len()
    }

    fn lookup(&self, hex: &[u8]) -> Option<&SecretValue> {
        let key: &[u8; TOKEN_HEX_LEN] = hex.try_into().ok()?;
        self.by_hex.get(key).map(std::convert::AsRef::as_ref)
    }

    /// Replaces every token in a complete, bounded piece of data (a header value, a
    /// request target). Returns the number of replacements.
    pub fn replace_all(&self, data: &[u8], out: &mut Vec<u8>) -> u64 {
        if self.is_empty() {
            out.extend_from_slice(data);
            return 0;
        }
        let (_, n) = scan(self, data, out, true);
        n
    }
}

impl std::fmt::Debug for Replacements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacements").field("tokens", &self.by_hex.len()).finish()
    }
}

/// Scans `data`, appending it to `out` with known tokens replaced. Unless `last`,
/// a possibly incomplete token at the end is not emitted: the returned index is where
/// the held-back tail starts (`data.len()` when nothing is held back).
fn scan(repl: &Replacements, data: &[u8], out: &mut Vec<u8>, last: bool) -> (usize, u64) {
    let finder = prefix_finder();
    let mut emitted = 0;
    let mut from = 0;
    let mut replaced = 0;
    while let Some(i) = finder.find(&data[from..]) {
        let start = from + i;
        let hex_start = start + TOKEN_PREFIX.len();
        let end = start + TOKEN_LEN;
        let available = &data[hex_start..end.min(data.len())];
        // The prefix cannot overlap itself, so the next candidate starts after it.
        from = hex_start;
        if !available.iter().all(|b| is_token_hex(*b)) {
            continue;
        }
        if end > data.len() {
            if last {
                break;
            }
            out.extend_from_slice(&data[emitted..start]);
            return (start, replaced);
        }
        if let Some(secret) = repl.lookup(available) {
            out.extend_from_slice(&data[emitted..start]);
            out.extend_from_slice(secret.expose());
            emitted = end;
            from = end;
            replaced += 1;
        }
    }
    if last {
        out.extend_from_slice(&data[emitted..]);
        return (data.len(), replaced);
    }
    // Hold back a tail that could be the beginning of the prefix.
    let tail_from = emitted.max(data.len().saturating_sub(TOKEN_PREFIX.len() - 1));
    let hold = (tail_from..data.len()).find(|&s| TOKEN_PREFIX.starts_with(&data[s..])).unwrap_or(data.len());
    out.extend_from_slice(&data[emitted..hold]);
    (hold, replaced)
}

/// Streaming substitution over one body. Memory: the held-back tail (< `TOKEN_LEN`)
/// plus a scratch copy of one input piece when a tail is pending.
pub struct Substituter {
    repl: Arc<Replacements>,
    carry: Zeroizing<Vec<u8>>,
    joint: Zeroizing<Vec<u8>>,
    replaced: u64,
}

impl Substituter {
    pub fn new(repl: Arc<Replacements>) -> Self {
        Self {
            repl,
            carry: Zeroizing::new(Vec::with_capacity(TOKEN_LEN)),
            joint: Zeroizing::new(Vec::new()),
            replaced: 0,
        }
    }

    /// Feeds the next piece of the stream; output is appended to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.repl.is_empty() {
            out.extend_from_slice(input);
            return;
        }
        if self.carry.is_empty() {
            let (hold, n) = scan(&self.repl, input, out, false);
            self.replaced += n;
            self.carry.extend_from_slice(&input[hold..]);
        } else {
            self.joint.clear();
            self.joint.extend_from_slice(&self.carry);
            self.joint.extend_from_slice(input);
            self.carry.clear();
            let (hold, n) = scan(&self.repl, &self.joint, out, false);
            self.replaced += n;
            self.carry.extend_from_slice(&self.joint[hold..]);
        }
    }

    /// Ends the stream: emits whatever was held back.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.carry.is_empty() {
            let carry = std::mem::take(&mut *self.carry);
            let (_, n) = scan(&self.repl, &carry, out, true);
            self.replaced += n;
            drop(Zeroizing::new(carry));
        }
    }

    /// Number of tokens replaced so far.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(n: u8) -> Vec<u8> {
        let mut t = TOKEN_PREFIX.to_vec();
        t.extend(std::iter::repeat_n(b"0123456789abcdef"[usize::from(n % 16)], TOKEN_HEX_LEN));
        t
    }

    fn repl() -> Arc<Replacements> {
        let mut r = Replacements::new();
        assert!(r.insert(&token(1), Arc::new(SecretValue::new(b"SECRET-ONE".to_vec()))));
        assert!(r.insert(&token(2), Arc::new(SecretValue::new(b"two".to_vec()))));
        Arc::new(r)
    }

    /// Straightforward reference: whole input at once, byte by byte.
    fn reference(r: &Replacements, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            if i + TOKEN_LEN <= data.len() && is_token(&data[i..i + TOKEN_LEN]) {
                if let Some(v) = r.lookup(&data[i + TOKEN_PREFIX.len()..i + TOKEN_LEN]) {
                    out.extend_from_slice(v.expose());
                    i += TOKEN_LEN;
                    continue;
                }
            }
            out.push(data[i]);
            i += 1;
        }
        out
    }

    fn streamed(r: &Arc<Replacements>, pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = Substituter::new(r.clone());
        let mut out = Vec::new();
        for p in pieces {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn replaces_known_tokens_and_keeps_unknown_ones() {
        let r = repl();
        let mut input = b"a ".to_vec();
        input.extend(token(1));
        input.extend(b" b ");
        input.extend(token(3));
        input.extend(b" ");
        input.extend(token(2));
        let out = streamed(&r, &[&input]);
        let mut expected = b"a SECRET-ONE b ".to_vec();
        expected.extend(token(3));
        expected.extend(b" two");
        assert_eq!(out, expected);
    }

    #[test]
    fn token_split_at_every_offset_and_byte_by_byte() {
        let r = repl();
        let mut input = b"xxosb_sealed_osb_sealed_".to_vec();
        input.extend(token(1));
        input.extend(token(2));
        input.extend(b"osb_seal");
        let expected = reference(&r, &input);
        assert!(expected.windows(10).any(|w| w == b"SECRET-ONE"));
        for k in 0..=input.len() {
            assert_eq!(streamed(&r, &[&input[..k], &input[k..]]), expected, "split at {k}");
        }
        let singles: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(streamed(&r, &singles), expected);
    }

    #[test]
    fn matches_reference_on_pseudo_random_streams() {
        let r = repl();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet: [&[u8]; 6] = [b"o", b"osb_", b"sealed_", b"a1", b"zz", b"osb_sealed_"];
        for _ in 0..300 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                match next() % 8 {
                    0 => input.extend(token(1)),
                    1 => input.extend(token(2)),
                    2 => input.extend(token(5)),
                    n => input.extend(alphabet[(n as usize) % alphabet.len()]),
                }
            }
            let mut pieces = Vec::new();
            let mut rest: &[u8] = &input;
            while !rest.is_empty() {
                let k = (next() as usize % 50).min(rest.len());
                pieces.push(&rest[..k]);
                rest = &rest[k..];
            }
            assert_eq!(streamed(&r, &pieces), reference(&r, &input));
        }
    }

    #[test]
    fn uppercase_hex_is_not_a_token() {
        let r = repl();
        let mut t = token(10);
        t.make_ascii_uppercase();
        assert!(!is_token(&t));
        assert_eq!(streamed(&r, &[&t]), t);
    }

    #[test]
    fn empty_replacements_pass_through() {
        let r = Arc::new(Replacements::new());
        let input = token(1);
        assert_eq!(streamed(&r, &[&input[..5], &input[5..]]), input);
    }
}
