//! Streaming substitution must equal a naive whole-input reference, whatever the
//! split points. Input: 2 bytes of split seed, then a mini-language where 0xfe,
//! 0xfd and 0xfc insert a known token, an unknown token and the bare prefix.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use proxy::subst::{is_token, Replacements, Substituter, TOKEN_LEN, TOKEN_PREFIX};
use proxy::SecretValue;

const KNOWN: &[u8] = b"osb_sealed_0123456789abcdef0123456789abcdef";
const UNKNOWN: &[u8] = b"osb_sealed_ffffffffffffffffffffffffffffffff";
const VALUE: &[u8] = b"<secret value>";

fn reference(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if i + TOKEN_LEN <= data.len() && is_token(&data[i..i + TOKEN_LEN]) && &data[i..i + TOKEN_LEN] == KNOWN {
            out.extend_from_slice(VALUE);
            i += TOKEN_LEN;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let (seed, rest) = input.split_at(2);
    let mut data = Vec::new();
    for &b in rest {
        match b {
            0xfe => data.extend_from_slice(KNOWN),
            0xfd => data.extend_from_slice(UNKNOWN),
            0xfc => data.extend_from_slice(TOKEN_PREFIX),
            _ => data.push(b),
        }
    }
    let mut repl = Replacements::new();
    repl.insert(KNOWN, Arc::new(SecretValue::new(VALUE.to_vec())));
    let repl = Arc::new(repl);

    let step = usize::from(seed[0]) % 64 + 1;
    let mut s = Substituter::new(repl.clone());
    let mut out = Vec::new();
    let mut pos = 0;
    let mut k = usize::from(seed[1]);
    while pos < data.len() {
        let len = ((k % step) + 1).min(data.len() - pos);
        s.push(&data[pos..pos + len], &mut out);
        pos += len;
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    s.finish(&mut out);
    let expected = reference(&data);
    assert_eq!(out, expected);

    let mut whole = Vec::new();
    repl.replace_all(&data, &mut whole);
    assert_eq!(whole, expected);
});
