//! What the appliance reads from a possibly hostile sandbox: a reply payload of any kind.
//! Decoding never panics; whatever decodes re-encodes to exactly the same payload (the encoding
//! is canonical) and decodes again to the same value.
//! Input: byte 0 is the frame kind, the rest is the payload.
#![no_main]

use agent_protocol::frame::{self, HEADER_LEN};
use agent_protocol::message::Reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else { return };
    let Ok(reply) = Reply::decode(kind, payload) else { return };
    assert_eq!(reply.kind(), kind);
    let _ = format!("{reply:?}");
    if let Reply::Error { code, .. } = &reply {
        let _ = code.to_u16();
    }
    let bytes = reply.to_frame().expect("a decoded reply fits a frame");
    let (again_kind, len) = frame::parse_header(&bytes[..HEADER_LEN]).expect("own header parses");
    assert_eq!(again_kind, kind);
    assert_eq!(len as usize, bytes.len() - HEADER_LEN);
    assert_eq!(&bytes[HEADER_LEN..], payload, "re-encoding changed the payload of {reply:?}");
    let again = Reply::decode(again_kind, &bytes[HEADER_LEN..]).expect("re-encoded reply decodes");
    assert_eq!(again, reply);
});
