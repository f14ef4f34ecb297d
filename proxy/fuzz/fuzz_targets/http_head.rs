//! The request-head parser and the chunked decoder on arbitrary bytes: no panic,
//! a parsed head re-serialises to something that parses the same, and chunked
//! decoding gives the same result fed at once or byte by byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::http::chunked::ChunkedDecoder;
use proxy::http::head::{find_head_end, parse_request_head};
use proxy::http::target::{parse_absolute_http, parse_authority};

fuzz_target!(|data: &[u8]| {
    if let Some(end) = find_head_end(data) {
        if let Ok(head) = parse_request_head(&data[..end], 64) {
            let _ = head.framing();
            let _ = parse_authority(&head.target, None);
            let _ = parse_absolute_http(&head.target);
            let mut again = Vec::new();
            head.write_to(&mut again);
            let reparsed = parse_request_head(&again, 64).expect("serialised head must parse");
            assert_eq!(reparsed, head);
        }
    }

    let mut whole = ChunkedDecoder::new(1024);
    let mut out_whole = Vec::new();
    let r_whole = whole.decode(data, &mut out_whole);
    let mut bytewise = ChunkedDecoder::new(1024);
    let mut out_bytes = Vec::new();
    let mut consumed = 0;
    let mut failed = false;
    for b in data {
        if bytewise.is_done() {
            break;
        }
        match bytewise.decode(std::slice::from_ref(b), &mut out_bytes) {
            Ok(n) => consumed += n,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match r_whole {
        Ok(n) => {
            assert!(!failed);
            assert_eq!(n, consumed);
            assert_eq!(out_whole, out_bytes);
            assert_eq!(whole.is_done(), bytewise.is_done());
        }
        Err(_) => assert!(failed),
    }
});
