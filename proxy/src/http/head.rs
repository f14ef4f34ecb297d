//! HTTP/1.x request heads: strict parsing, body framing and serialisation.
//!
//! Errors name the rule that was broken, never a header value (values may hold
//! tokens or, after substitution, secrets).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: Vec<u8>,
    pub version: Version,
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    TooLarge,
    TooManyHeaders,
    BareLineFeed,
    BadRequestLine,
    UnsupportedVersion,
    BadHeaderName,
    BadHeaderValue,
    ObsoleteLineFolding,
    ConflictingLength,
    BadContentLength,
    UnsupportedTransferEncoding,
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooLarge => "request head too large",
            Self::TooManyHeaders => "too many header fields",
            Self::BareLineFeed => "line not terminated by CRLF",
            Self::BadRequestLine => "malformed request line",
            Self::UnsupportedVersion => "unsupported HTTP version (only HTTP/1.0 and HTTP/1.1)",
            Self::BadHeaderName => "malformed header field name",
            Self::BadHeaderValue => "invalid character in header field value",
            Self::ObsoleteLineFolding => "obsolete header line folding is not accepted",
            Self::ConflictingLength => {
                "both Content-Length and Transfer-Encoding, or conflicting Content-Length values"
            }
            Self::BadContentLength => "invalid Content-Length",
            Self::UnsupportedTransferEncoding => "unsupported Transfer-Encoding (only chunked)",
        })
    }
}

impl std::error::Error for HeadError {}

/// Finds the end of a head (index just past the empty line), skipping leading
/// empty lines that clients may send between keep-alive requests.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    let start = leading_crlf_len(buf);
    memchr::memmem::find(&buf[start..], b"\r\n\r\n").map(|i| start + i + 4)
}

fn leading_crlf_len(buf: &[u8]) -> usize {
    let mut i = 0;
    while buf[i..].starts_with(b"\r\n") {
        i += 2;
    }
    i
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Parses a complete head (as delimited by [`find_head_end`]).
pub fn parse_request_head(raw: &[u8], max_headers: usize) -> Result<RequestHead, HeadError> {
    let (request_line, fields) = head_lines(raw)?;
    let (method, target, version) = parse_request_line(request_line)?;
    let headers = parse_fields(fields, max_headers)?;
    Ok(RequestHead { method, target, version, headers })
}

/// Splits a complete head (ending in CRLF CRLF, leading empty lines skipped) into its
/// first line (CR removed) and the field lines after it (each still ending in CR).
pub(crate) fn head_lines(raw: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
    let raw = &raw[leading_crlf_len(raw)..];
    if !raw.ends_with(b"\r\n\r\n") {
        return Err(HeadError::BadRequestLine);
    }
    // Keep each line's CR, drop the final LF of the last line and the empty line.
    let body = &raw[..raw.len() - 3];
    let (first, fields) = match memchr::memchr(b'\n', body) {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &body[body.len()..]),
    };
    Ok((first.strip_suffix(b"\r").ok_or(HeadError::BareLineFeed)?, fields))
}

/// Parses the field lines of a head (as split by [`head_lines`]).
pub(crate) fn parse_fields(fields: &[u8], max_headers: usize) -> Result<Vec<Header>, HeadError> {
    let mut headers = Vec::new();
    if fields.is_empty() {
        return Ok(headers);
    }
    for line in fields.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").ok_or(HeadError::BareLineFeed)?;
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(HeadError::ObsoleteLineFolding);
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(HeadError::BadHeaderName)?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::BadHeaderName);
        }
        let value = trim_ows(&line[colon + 1..]);
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Err(HeadError::BadHeaderValue);
        }
        if headers.len() == max_headers {
            return Err(HeadError::TooManyHeaders);
        }
        // tchar bytes are ASCII, so this is valid UTF-8.
        headers.push(Header { name: String::from_utf8_lossy(name).into_owned(), value: value.to_vec() });
    }
    Ok(headers)
}

/// Comma-separated elements of every `name` field, trimmed, empty ones dropped.
pub(crate) fn list_elements<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

pub(crate) fn remove_field(headers: &mut Vec<Header>, name: &str) {
    headers.retain(|h| !h.name.eq_ignore_ascii_case(name));
}

/// Replaces every `name` field by one with `value`.
pub(crate) fn set_field(headers: &mut Vec<Header>, name: &str, value: &[u8]) {
    remove_field(headers, name);
    headers.push(Header { name: name.to_string(), value: value.to_vec() });
}

/// True if some comma-separated element of a `name` field equals `token` (case-insensitive).
pub(crate) fn has_token(headers: &[Header], name: &str, token: &str) -> bool {
    list_elements(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The Content-Length fields' value: all must agree.
pub(crate) fn content_length(headers: &[Header]) -> Result<Option<u64>, HeadError> {
    let mut length: Option<u64> = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")) {
        for part in h.value.split(|&b| b == b',') {
            let part = trim_ows(part);
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::BadContentLength);
            }
            let n = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(HeadError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::ConflictingLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

pub(crate) fn write_fields(headers: &[Header], out: &mut Vec<u8>) {
    for h in headers {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn parse_request_line(line: &[u8]) -> Result<(String, Vec<u8>, Version), HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadRequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::BadRequestLine);
    }
    if target.is_empty() || !target.iter().all(|&b| (b'!'..=b'~').contains(&b) || b >= 0x80) {
        return Err(HeadError::BadRequestLine);
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        v if v.starts_with(b"HTTP/") => return Err(HeadError::UnsupportedVersion),
        _ => return Err(HeadError::BadRequestLine),
    };
    Ok((String::from_utf8_lossy(method).into_owned(), target.to_vec(), version))
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

/// How a request body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_slice())
    }

    pub fn remove_header(&mut self, name: &str) {
        remove_field(&mut self.headers, name);
    }

    pub fn set_header(&mut self, name: &str, value: &[u8]) {
        set_field(&mut self.headers, name, value);
    }

    /// True if some comma-separated element of a header equals `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        has_token(&self.headers, name, token)
    }

    /// Body framing per RFC 9112 section 6, refusing the ambiguous cases that enable
    /// request smuggling.
    pub fn framing(&self) -> Result<BodyFraming, HeadError> {
        let te: Vec<&[u8]> = list_elements(&self.headers, "transfer-encoding").collect();
        let length = content_length(&self.headers)?;
        if !te.is_empty() {
            if length.is_some() {
                return Err(HeadError::ConflictingLength);
            }
            if te.len() == 1 && te[0].eq_ignore_ascii_case(b"chunked") && self.version == Version::Http11 {
                return Ok(BodyFraming::Chunked);
            }
            return Err(HeadError::UnsupportedTransferEncoding);
        }
        Ok(match length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        })
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.push(b' ');
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        write_fields(&self.headers, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RequestHead, HeadError> {
        let raw = s.as_bytes();
        let end = find_head_end(raw).ok_or(HeadError::BadRequestLine)?;
        parse_request_head(&raw[..end], 100)
    }

    #[test]
    fn parses_and_round_trips() {
        let h =
            parse("\r\nPOST /v1/x?a=b HTTP/1.1\r\nHost: api.test\r\nX-Empty:\r\nContent-Length:  5 \r\n\r\n").unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, b"/v1/x?a=b");
        assert_eq!(h.header("content-length"), Some(&b"5"[..]));
        assert_eq!(h.header("x-empty"), Some(&b""[..]));
        assert_eq!(h.framing(), Ok(BodyFraming::Length(5)));
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(parse(std::str::from_utf8(&out).unwrap()).unwrap(), h);
    }

    #[test]
    fn rejects_malformed_heads() {
        assert_eq!(parse("GET / HTTP/1.1\nHost: a\r\n\r\n"), Err(HeadError::BareLineFeed));
        assert_eq!(parse("GET  / HTTP/1.1\r\n\r\n"), Err(HeadError::BadRequestLine));
        assert_eq!(parse("GET / HTTP/2.0\r\n\r\n"), Err(HeadError::UnsupportedVersion));
        assert_eq!(parse("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Err(HeadError::BadHeaderName));
        assert_eq!(parse("GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"), Err(HeadError::ObsoleteLineFolding));
        assert_eq!(parse("GET / HTTP/1.1\r\nA: b\0\r\n\r\n"), Err(HeadError::BadHeaderValue));
        assert_eq!(parse("GET / HTTP/1.1\r\nNoColon\r\n\r\n"), Err(HeadError::BadHeaderName));
    }

    #[test]
    fn framing_refuses_smuggling_shapes() {
        let f = |s: &str| parse(s).unwrap().framing();
        assert_eq!(f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Ok(BodyFraming::Chunked));
        assert_eq!(f("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"), Ok(BodyFraming::Length(3)));
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::ConflictingLength)
        );
        assert_eq!(f("POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n"), Err(HeadError::ConflictingLength));
        assert_eq!(f("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Err(HeadError::BadContentLength));
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Err(HeadError::BadContentLength)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::UnsupportedTransferEncoding)
        );
        assert_eq!(f("GET / HTTP/1.1\r\n\r\n"), Ok(BodyFraming::None));
    }
}
