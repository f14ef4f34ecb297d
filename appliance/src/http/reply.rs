//! A handler's answer before it is written to the connection.

use serde::Serialize;
use tiny_http::{Header, Request, Response};

use crate::error::AppError;

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

impl Reply {
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status, body, content_type: "application/json" },
            Err(e) => Reply::error(&AppError::internal(format!("cannot encode response: {e}"))),
        }
    }

    pub fn no_content() -> Reply {
        Reply { status: 204, body: Vec::new(), content_type: "application/json" }
    }

    pub fn bytes(body: Vec<u8>) -> Reply {
        Reply { status: 200, body, content_type: "application/octet-stream" }
    }

    pub fn text(status: u16, body: String, content_type: &'static str) -> Reply {
        Reply { status, body: body.into_bytes(), content_type }
    }

    pub fn error(err: &AppError) -> Reply {
        let body = serde_json::json!({ "error": err.message });
        Reply { status: err.status, body: body.to_string().into_bytes(), content_type: "application/json" }
    }

    pub fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        // The whole body is in memory, so always send Content-Length instead of chunking.
        let mut response =
            Response::from_data(self.body).with_status_code(self.status).with_chunked_threshold(usize::MAX);
        if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], self.content_type.as_bytes()) {
            response.add_header(h);
        }
        response
    }
}

/// How the answer of a handler that may stream went out.
pub enum Answered {
    /// Not yet: the caller sends this reply (the work ended early, or failed before any output).
    Reply(Reply, Box<Request>),
    /// Streamed, head first: the status sent (200), the status of a failure that cut the body
    /// short after the head was out, or 0 if the client left.
    Streamed(u16),
}

impl From<AppError> for Reply {
    fn from(err: AppError) -> Reply {
        Reply::error(&err)
    }
}
