//! Reading what a request carries: headers, bounded bodies, JSON, query parameters.

use std::io::Read;

use serde::de::DeserializeOwned;
use tiny_http::Request;
use zeroize::Zeroizing;

use crate::error::AppError;

/// JSON bodies are small; anything bigger is refused before it is read.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Upper bound for a file upload through `PUT .../files`.
pub const MAX_FILE_BODY: usize = 64 << 20;

pub fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers().iter().find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
}

/// Reads the whole body, refusing more than `limit` bytes with 413. The buffer is
/// wiped on drop because bodies may carry secret values.
pub fn read_body(request: &mut Request, limit: usize) -> Result<Zeroizing<Vec<u8>>, AppError> {
    let too_large = || AppError::too_large(format!("request body exceeds the limit of {limit} bytes"));
    if request.body_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Zeroizing::new(Vec::with_capacity(request.body_length().unwrap_or(0)));
    let limit_plus_one = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    request
        .as_reader()
        .take(limit_plus_one)
        .read_to_end(&mut body)
        .map_err(|e| AppError::bad_request(format!("cannot read request body: {e}")))?;
    if body.len() > limit {
        return Err(too_large());
    }
    Ok(body)
}

/// Parses a JSON body into `T`: malformed JSON and wrong types both give 400 naming the problem.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AppError::bad_request("request body is empty; expected a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

fn json_error(e: &serde_json::Error) -> AppError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => AppError::bad_request(format!("malformed JSON: {e}")),
        Category::Data => AppError::bad_request(format!("invalid request body: {e}")),
    }
}

/// Like `parse_json`, but the error never quotes the input (for bodies carrying secrets).
pub fn parse_json_redacted<T: DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(AppError::bad_request(format!("request body is empty; expected {expected}")));
    }
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => "invalid request body",
            _ => "malformed JSON",
        };
        AppError::bad_request(format!("{kind} at line {} column {}; expected {expected}", e.line(), e.column()))
    })
}

/// Splits `/a/b?x=1` into the path and the raw query.
pub fn split_url(url: &str) -> (&str, &str) {
    match url.split_once('?') {
        Some((path, query)) => (path, query),
        None => (url, ""),
    }
}

/// The decoded value of query parameter `name`, if present.
pub fn query_param(query: &str, name: &str) -> Result<Option<String>, AppError> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key, true)? == name {
            return percent_decode(value, true).map(Some);
        }
    }
    Ok(None)
}

/// The decoded values of every occurrence of query parameter `name`, in order.
pub fn query_values(query: &str, name: &str) -> Result<Vec<String>, AppError> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key, true)? == name {
            out.push(percent_decode(value, true)?);
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes (and `+` as space in query strings); the result must be UTF-8.
pub fn percent_decode(raw: &str, plus_is_space: bool) -> Result<String, AppError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16));
                let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(AppError::bad_request("malformed percent-escape in URL")),
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| AppError::bad_request("URL is not valid UTF-8 after decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_parameters() {
        assert_eq!(query_param("a=1&path=%2Fhome%2Fa+b.txt", "path").expect("ok"), Some("/home/a b.txt".into()));
        assert_eq!(query_param("a=1", "path").expect("ok"), None);
        assert!(query_param("path=%zz", "path").is_err());
        assert!(percent_decode("%ff", false).is_err());
    }

    #[test]
    fn json_errors_are_400_and_redacted_variant_hides_input() {
        #[derive(serde::Deserialize, Debug)]
        struct V {
            #[allow(dead_code)]
            value: String,
        }
        assert_eq!(parse_json::<V>(b"{").unwrap_err().status, 400);
        assert!(parse_json::<V>(b"").unwrap_err().message.contains("empty"));
        let err = parse_json::<V>(br#"{"value": 5}"#).unwrap_err();
        assert!(err.message.starts_with("invalid request body"), "{}", err.message);
        let err = parse_json_redacted::<V>(br#"{"value": 1234567, "x"#, "{\"value\": string}").unwrap_err();
        assert!(!err.message.contains("1234567"), "{}", err.message);
    }
}
