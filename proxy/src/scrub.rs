//! Response scrubbing: every occurrence of a sandbox's secret values in what the
//! proxy sends back to it is replaced by the sandbox's own sealed token for that
//! secret, so an upstream that echoes its request cannot hand the value to the
//! sandbox.
//!
//! Besides each raw value, its percent-encoded (both hex cases) and JSON-escaped
//! forms are looked for, the ways servers commonly quote what they received.
//!
//! The stream arrives in arbitrary pieces. Only bytes that could still grow into a
//! value are held back between pieces (a possible start of a value at the end of a
//! piece), so memory is bounded by the longest value and interactive streams are not
//! delayed by more than that; the output equals a scan of the whole stream at once.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use zeroize::Zeroizing;

use crate::secret::SecretValue;

/// The values to look for and the token each is replaced by.
pub struct ScrubSet {
    finder: Option<AhoCorasick>,
    /// Pattern bytes by pattern index (for the held-back tail check), wiped on drop.
    patterns: Vec<Zeroizing<Vec<u8>>>,
    tokens: Vec<Arc<str>>,
    /// Every byte that starts some pattern: most positions are ruled out by one lookup.
    first_bytes: [bool; 256],
    longest: usize,
    /// The (value, token) pairs the set was built from, kept to extend it later.
    sources: Vec<(Arc<SecretValue>, Arc<str>)>,
}

impl std::fmt::Debug for ScrubSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrubSet").field("values", &self.sources.len()).finish_non_exhaustive()
    }
}

fn percent_encoded(value: &[u8], hex: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

fn json_escaped(value: &[u8], escape_slash: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 8);
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if escape_slash => out.extend_from_slice(b"\\/"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// The forms of one value the scrubber looks for (distinct, non-empty).
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![
        value.to_vec(),
        percent_encoded(value, b"0123456789ABCDEF"),
        percent_encoded(value, b"0123456789abcdef"),
        json_escaped(value, false),
        json_escaped(value, true),
    ];
    forms.retain(|f| !f.is_empty());
    let mut distinct: Vec<Vec<u8>> = Vec::with_capacity(forms.len());
    for f in forms {
        if !distinct.contains(&f) {
            distinct.push(f);
        }
    }
    distinct
}

impl ScrubSet {
    /// An empty set: scrubbing passes everything through.
    pub fn empty() -> Self {
        Self {
            finder: None,
            patterns: Vec::new(),
            tokens: Vec::new(),
            first_bytes: [false; 256],
            longest: 0,
            sources: Vec::new(),
        }
    }

    /// Builds the set for `(value, token)` pairs. A value bound to several tokens is
    /// replaced by the first of them. Fails only if the search automaton cannot be built.
    pub fn build(pairs: Vec<(Arc<SecretValue>, Arc<str>)>) -> Result<Self, String> {
        let mut set = Self::empty();
        for (value, token) in &pairs {
            for form in forms(value.expose()) {
                if set.patterns.iter().any(|p| **p == form) {
                    continue;
                }
                set.first_bytes[usize::from(form[0])] = true;
                set.longest = set.longest.max(form.len());
                set.patterns.push(Zeroizing::new(form));
                set.tokens.push(token.clone());
            }
        }
        if !set.patterns.is_empty() {
            let finder = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(set.patterns.iter().map(|p| p.as_slice()))
                .map_err(|e| format!("cannot build the response scrubber: {e}"))?;
            set.finder = Some(finder);
        }
        set.sources = pairs;
        Ok(set)
    }

    /// This set plus the pairs of `older` whose values it lacks (a changed or deleted
    /// secret's old value stays scrubbed for the sandbox's lifetime: it may have been
    /// sent upstream already).
    pub fn extended_with(pairs: Vec<(Arc<SecretValue>, Arc<str>)>, older: &ScrubSet) -> Result<Self, String> {
        let mut pairs = pairs;
        for (value, token) in &older.sources {
            if !pairs.iter().any(|(v, _)| v.expose() == value.expose()) {
                pairs.push((value.clone(), token.clone()));
            }
        }
        Self::build(pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// Number of secret values in the set.
    pub fn values(&self) -> usize {
        self.sources.len()
    }

    /// Scrubs one complete piece of data (a header value, a message).
    pub fn scrub_all(&self, data: &[u8], out: &mut Vec<u8>) -> u64 {
        let (_, n) = self.scan(data, out, true);
        n
    }

    /// Convenience for text: the scrubbed string (lossless for UTF-8 input).
    pub fn scrub_text(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_string();
        }
        let mut out = Vec::with_capacity(text.len());
        self.scrub_all(text.as_bytes(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The earliest position at or after `from` where the rest of `data` is a proper
    /// prefix of some pattern (could still become a match), or `data.len()`.
    fn earliest_partial(&self, data: &[u8], from: usize) -> usize {
        let start = from.max(data.len().saturating_sub(self.longest.saturating_sub(1)));
        (start..data.len())
            .find(|&p| {
                self.first_bytes[usize::from(data[p])] && {
                    let tail = &data[p..];
                    self.patterns.iter().any(|pat| pat.len() > tail.len() && pat.starts_with(tail))
                }
            })
            .unwrap_or(data.len())
    }

    /// Appends `data` to `out` with every match replaced. Unless `last`, bytes that
    /// could still become a match are not emitted: the returned index is where that
    /// held-back tail starts.
    fn scan(&self, data: &[u8], out: &mut Vec<u8>, last: bool) -> (usize, u64) {
        let Some(finder) = &self.finder else {
            out.extend_from_slice(data);
            return (data.len(), 0);
        };
        let mut emitted = 0;
        let mut replaced = 0;
        let mut partial = if last { data.len() } else { self.earliest_partial(data, 0) };
        for m in finder.find_iter(data) {
            // A match at or after a possible longer (or earlier-starting) match that
            // the next piece would decide waits for that piece.
            if m.start() >= partial {
                break;
            }
            out.extend_from_slice(&data[emitted..m.start()]);
            out.extend_from_slice(self.tokens[m.pattern().as_usize()].as_bytes());
            emitted = m.end();
            replaced += 1;
            if !last {
                partial = self.earliest_partial(data, emitted);
            }
        }
        let keep_from = partial.max(emitted);
        out.extend_from_slice(&data[emitted..keep_from]);
        (keep_from, replaced)
    }
}

/// Streaming scrubber over one byte stream; see the module doc.
pub struct Scrubber {
    set: Arc<ScrubSet>,
    carry: Zeroizing<Vec<u8>>,
    work: Zeroizing<Vec<u8>>,
    replaced: u64,
}

impl Scrubber {
    pub fn new(set: Arc<ScrubSet>) -> Self {
        Self { set, carry: Zeroizing::new(Vec::new()), work: Zeroizing::new(Vec::new()), replaced: 0 }
    }

    pub fn is_active(&self) -> bool {
        !self.set.is_empty()
    }

    /// Scrubs the next piece; output (possibly less than the input, the rest held
    /// back) is appended to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.carry.is_empty() {
            let (kept, n) = self.set.scan(data, out, false);
            self.replaced += n;
            self.carry.extend_from_slice(&data[kept..]);
            return;
        }
        self.work.clear();
        self.work.extend_from_slice(&self.carry);
        self.work.extend_from_slice(data);
        self.carry.clear();
        let (kept, n) = self.set.scan(&self.work, out, false);
        self.replaced += n;
        self.carry.extend_from_slice(&self.work[kept..]);
    }

    /// Ends the stream: the held-back tail is emitted (scrubbed).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let carry = std::mem::take(&mut *self.carry);
        let (_, n) = self.set.scan(&carry, out, true);
        self.replaced += n;
        drop(Zeroizing::new(carry));
    }

    /// Bytes held back so far (bounded by the longest pattern).
    pub fn held_back(&self) -> usize {
        self.carry.len()
    }

    pub fn replaced(&self) -> u64 {
        self.replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "osb_sealed_11111111111111111111111111111111";
    const T2: &str = "osb_sealed_22222222222222222222222222222222";

    fn set(pairs: &[(&str, &str)]) -> Arc<ScrubSet> {
        let pairs = pairs
            .iter()
            .map(|(v, t)| (Arc::new(SecretValue::new(v.as_bytes().to_vec())), Arc::<str>::from(*t)))
            .collect();
        Arc::new(ScrubSet::build(pairs).unwrap())
    }

    fn whole(s: &ScrubSet, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.scrub_all(data, &mut out);
        out
    }

    fn streamed(s: &Arc<ScrubSet>, pieces: &[&[u8]]) -> Vec<u8> {
        let mut sc = Scrubber::new(s.clone());
        let mut out = Vec::new();
        for p in pieces {
            sc.push(p, &mut out);
            assert!(sc.held_back() < s.longest.max(1));
        }
        sc.finish(&mut out);
        out
    }

    #[test]
    fn raw_percent_and_json_forms_become_the_token() {
        let s = set(&[("sk-ant/abc+\"q\"", T1)]);
        let input = br#"raw sk-ant/abc+"q" url sk-ant%2Fabc%2B%22q%22 low sk-ant%2fabc%2b%22q%22 json "sk-ant/abc+\"q\"" slash sk-ant\/abc+\"q\""#;
        let out = String::from_utf8(whole(&s, input)).unwrap();
        assert_eq!(out, format!("raw {T1} url {T1} low {T1} json \"{T1}\" slash {T1}"));
    }

    #[test]
    fn split_at_every_offset_equals_whole() {
        let s = set(&[("SECRET-ONE", T1), ("SECRET-ONE-LONGER", T2), ("two", T2)]);
        let input = b"xxSECRET-ONSECRET-ONE-LONGER SECRET-ONE tw two SECRET-ONE-LONG SECRET-".to_vec();
        let expected = whole(&s, &input);
        assert!(!String::from_utf8_lossy(&expected).contains("SECRET-ONE"));
        for k in 0..=input.len() {
            for j in k..=input.len() {
                assert_eq!(streamed(&s, &[&input[..k], &input[k..j], &input[j..]]), expected, "split {k} {j}");
            }
        }
        let singles: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(streamed(&s, &singles), expected);
    }

    #[test]
    fn only_possible_starts_are_held_back() {
        let s = set(&[("abcdef", T1)]);
        let mut sc = Scrubber::new(s.clone());
        let mut out = Vec::new();
        sc.push(b"hello world", &mut out);
        assert_eq!(out, b"hello world", "nothing that could start a value is delayed");
        out.clear();
        sc.push(b" xyzabc", &mut out);
        assert_eq!(out, b" xyz");
        out.clear();
        sc.push(b"def!", &mut out);
        assert_eq!(out, format!("{T1}!").as_bytes());
        assert_eq!(sc.replaced(), 1);
    }

    #[test]
    fn extended_sets_keep_old_values() {
        let old = set(&[("old-value-1", T1)]);
        let pairs = vec![(Arc::new(SecretValue::new(b"new-value-2".to_vec())), Arc::<str>::from(T1))];
        let both = ScrubSet::extended_with(pairs, &old).unwrap();
        assert_eq!(both.values(), 2);
        assert_eq!(whole(&both, b"old-value-1 new-value-2"), format!("{T1} {T1}").as_bytes());
    }

    #[test]
    fn empty_set_passes_through() {
        let s = Arc::new(ScrubSet::empty());
        assert_eq!(streamed(&s, &[b"abc", b"def"]), b"abcdef");
        assert_eq!(s.scrub_text("x"), "x");
    }
}
