//! The response scrubber and the response-head parser on arbitrary input. The first
//! bytes choose up to three secret values (short ones, so they occur); the rest is a
//! response stream cut into pieces at fuzzer-chosen places. Streaming output must
//! equal scrubbing the whole stream at once (the unit tests check that output against
//! expected texts) and hold back less than the longest form of a value.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use proxy::http::response::parse_response_head;
use proxy::scrub::{ScrubSet, Scrubber};
use proxy::SecretValue;

const TOKENS: [&str; 3] = [
    "osb_sealed_00000000000000000000000000000001",
    "osb_sealed_00000000000000000000000000000002",
    "osb_sealed_00000000000000000000000000000003",
];

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = parse_response_head(data, 64) {
        let _ = head.body(false);
        let mut again = Vec::new();
        head.write_to(&mut again);
        assert_eq!(parse_response_head(&again, 64).expect("serialised head must parse"), head);
    }

    let Some((&spec, rest)) = data.split_first() else { return };
    let count = usize::from(spec % 3) + 1;
    let mut rest = rest;
    let mut values = Vec::new();
    for _ in 0..count {
        let Some((&len, tail)) = rest.split_first() else { return };
        let len = usize::from(len % 6) + 1;
        if tail.len() < len {
            return;
        }
        values.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    let Some((&cut_seed, stream)) = rest.split_first() else { return };
    let pairs = values
        .iter()
        .zip(TOKENS)
        .map(|(v, t)| (Arc::new(SecretValue::new(v.clone())), Arc::<str>::from(t)))
        .collect();
    let set = Arc::new(ScrubSet::build(pairs).expect("small sets always build"));

    let mut whole = Vec::new();
    set.scrub_all(stream, &mut whole);

    let mut scrubber = Scrubber::new(set.clone());
    let mut streamed = Vec::new();
    let step = usize::from(cut_seed % 17) + 1;
    let longest = values.iter().map(|v| v.len() * 6 + 2).max().unwrap_or(0);
    for piece in stream.chunks(step) {
        scrubber.push(piece, &mut streamed);
        assert!(scrubber.held_back() < longest.max(1));
    }
    scrubber.finish(&mut streamed);
    assert_eq!(streamed, whole);

});
