//! HTTP/1.x response heads from upstreams: parsing, body framing (RFC 9112 section
//! 6.3) and serialisation. Errors never quote a field value.

use crate::http::head::{
    content_length, has_token, head_lines, list_elements, parse_fields, remove_field, set_field, write_fields,
    HeadError, Header, Version,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub version: Version,
    pub status: u16,
    pub reason: Vec<u8>,
    pub headers: Vec<Header>,
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// Parses a complete response head (ending in CRLF CRLF).
pub fn parse_response_head(raw: &[u8], max_headers: usize) -> Result<ResponseHead, HeadError> {
    let (line, fields) = head_lines(raw)?;
    // status-line = HTTP-version SP 3DIGIT SP [ reason-phrase ]; some servers omit the last SP.
    let version = match line.get(..8) {
        Some(b"HTTP/1.1") => Version::Http11,
        Some(b"HTTP/1.0") => Version::Http10,
        Some(v) if v.starts_with(b"HTTP/") => return Err(HeadError::UnsupportedVersion),
        _ => return Err(HeadError::BadRequestLine),
    };
    let rest = &line[8..];
    let digits = rest.get(1..4).filter(|d| rest[0] == b' ' && d.iter().all(u8::is_ascii_digit));
    let status = digits
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u16>().ok())
        .filter(|s| (100..=999).contains(s))
        .ok_or(HeadError::BadRequestLine)?;
    let reason = match rest.get(4..) {
        None | Some([]) => Vec::new(),
        Some([b' ', reason @ ..]) => reason.to_vec(),
        Some(_) => return Err(HeadError::BadRequestLine),
    };
    if !reason.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
        return Err(HeadError::BadRequestLine);
    }
    let headers = parse_fields(fields, max_headers)?;
    Ok(ResponseHead { version, status, reason, headers })
}

impl ResponseHead {
    pub fn remove_header(&mut self, name: &str) {
        remove_field(&mut self.headers, name);
    }

    pub fn set_header(&mut self, name: &str, value: &[u8]) {
        set_field(&mut self.headers, name, value);
    }

    pub fn has_token(&self, name: &str, token: &str) -> bool {
        has_token(&self.headers, name, token)
    }

    /// The content codings applied to the body, in order, `identity` dropped, lower case.
    pub fn content_codings(&self) -> Vec<Vec<u8>> {
        list_elements(&self.headers, "content-encoding")
            .map(<[u8]>::to_ascii_lowercase)
            .filter(|c| c.as_slice() != b"identity")
            .collect()
    }

    /// Body framing for a response to a request with method `HEAD` or not.
    pub fn body(&self, to_head_request: bool) -> Result<ResponseBody, HeadError> {
        if to_head_request || (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Ok(ResponseBody::None);
        }
        let te: Vec<&[u8]> = list_elements(&self.headers, "transfer-encoding").collect();
        if let Some(last) = te.last() {
            // Chunked must be the final coding; anything else is read until close.
            return Ok(if last.eq_ignore_ascii_case(b"chunked") && self.version == Version::Http11 {
                if te.len() > 1 {
                    return Err(HeadError::UnsupportedTransferEncoding);
                }
                ResponseBody::Chunked
            } else {
                ResponseBody::UntilClose
            });
        }
        Ok(match content_length(&self.headers)? {
            Some(0) => ResponseBody::None,
            Some(n) => ResponseBody::Length(n),
            None => ResponseBody::UntilClose,
        })
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(format!(" {:03} ", self.status).as_bytes());
        out.extend_from_slice(&self.reason);
        out.extend_from_slice(b"\r\n");
        write_fields(&self.headers, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ResponseHead, HeadError> {
        parse_response_head(s.as_bytes(), 16)
    }

    #[test]
    fn parses_status_lines() {
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((h.status, h.reason.as_slice(), h.body(false)), (200, &b"OK"[..], Ok(ResponseBody::Length(5))));
        assert_eq!(h.body(true), Ok(ResponseBody::None));
        assert_eq!(parse("HTTP/1.1 204\r\n\r\n").unwrap().reason, b"");
        assert_eq!(parse("HTTP/1.0 404 Not Found\r\n\r\n").unwrap().body(false), Ok(ResponseBody::UntilClose));
        let chunked = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(chunked.body(false), Ok(ResponseBody::Chunked));
        let gz = parse("HTTP/1.1 200 OK\r\nContent-Encoding: identity, GZIP\r\n\r\n").unwrap();
        assert_eq!(gz.content_codings(), vec![b"gzip".to_vec()]);
        for bad in ["HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.1 20 OK\r\n\r\n", "ICY 200 OK\r\n\r\n"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("HTTP/1.1 200 OK\r\nA: 1\nB: 2\r\n\r\n"), Err(HeadError::BareLineFeed));
    }

    #[test]
    fn round_trips() {
        let raw = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let mut out = Vec::new();
        parse(raw).unwrap().write_to(&mut out);
        assert_eq!(out, raw.as_bytes());
    }
}
