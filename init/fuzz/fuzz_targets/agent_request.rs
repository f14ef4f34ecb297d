//! What the agent in a sandbox reads from the host: a request payload of any kind. Decoding
//! never panics; whatever decodes re-encodes to exactly the same payload (the encoding is
//! canonical) and decodes again to the same value.
//! Input: byte 0 is the frame kind, the rest is the payload.
#![no_main]

use agent_protocol::frame::{self, HEADER_LEN};
use agent_protocol::message::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else { return };
    let Ok(request) = Request::decode(kind, payload) else { return };
    assert_eq!(request.kind(), kind);
    let _ = request.name();
    let _ = format!("{request:?}");
    let bytes = request.to_frame().expect("a decoded request fits a frame");
    let (again_kind, len) = frame::parse_header(&bytes[..HEADER_LEN]).expect("own header parses");
    assert_eq!(again_kind, kind);
    assert_eq!(len as usize, bytes.len() - HEADER_LEN);
    assert_eq!(&bytes[HEADER_LEN..], payload, "re-encoding changed the payload of {request:?}");
    let again = Request::decode(again_kind, &bytes[HEADER_LEN..]).expect("re-encoded request decodes");
    assert_eq!(again, request);
});
