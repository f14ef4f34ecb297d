//! Request targets the proxy accepts: CONNECT authorities and absolute `http://` URLs.

use crate::hostmatch::normalize_host;

/// A destination host (normalised) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: u16,
}

/// Parses `host:port` or `[v6]:port`; `default_port` applies when no port is given.
pub fn parse_authority(s: &[u8], default_port: Option<u16>) -> Option<Authority> {
    let (host, port) = split_host_port(s)?;
    Some(Authority { host, port: port.or(default_port)? })
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port` (a Host header, a URI's
/// authority) into the normalised host and the port if one is given. User info
/// (`user@host`) is refused: it only serves to confuse which host is meant.
pub fn split_host_port(s: &[u8]) -> Option<(String, Option<u16>)> {
    let s = std::str::from_utf8(s).ok()?;
    if s.contains('@') {
        return None;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)
        }
        Some(_) => return None,
        None => None,
    };
    Some((normalize_host(host)?, port))
}

/// The authority of an absolute-form target (`scheme://authority/...`, any scheme),
/// `None` when the target is not absolute-form. The authority may be empty.
pub fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let sep = memchr::memmem::find(target, b"://")?;
    let scheme = &target[..sep];
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let rest = &target[sep + 3..];
    let end = rest.iter().position(|&b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Splits `http://authority/path?query` into the authority and the origin-form target.
pub fn parse_absolute_http(target: &[u8]) -> Option<(Authority, Vec<u8>)> {
    let prefix = b"http://";
    if target.len() < prefix.len() || !target[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &target[prefix.len()..];
    let split = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let authority = parse_authority(&rest[..split], Some(80))?;
    let mut path = rest[split..].to_vec();
    if path.first() != Some(&b'/') {
        path.insert(0, b'/');
    }
    Some((authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authorities() {
        assert_eq!(parse_authority(b"API.test:8443", None), Some(Authority { host: "api.test".into(), port: 8443 }));
        assert_eq!(parse_authority(b"[::1]:443", None), Some(Authority { host: "::1".into(), port: 443 }));
        assert_eq!(parse_authority(b"api.test", Some(443)).map(|a| a.port), Some(443));
        assert_eq!(parse_authority(b"api.test", None), None);
        assert_eq!(parse_authority(b"api.test:0", None), None);
        assert_eq!(parse_authority(b"api.test:99999", None), None);
        assert_eq!(parse_authority(b"user@api.test:443", None), None);
        assert_eq!(parse_authority(b"[::1:443", None), None);
    }

    #[test]
    fn splits_host_and_optional_port() {
        assert_eq!(split_host_port(b"API.Test."), Some(("api.test".into(), None)));
        assert_eq!(split_host_port(b"api.test:443"), Some(("api.test".into(), Some(443))));
        assert_eq!(split_host_port(b"[::1]"), Some(("::1".into(), None)));
        assert_eq!(split_host_port(b"api.test:"), None);
        assert_eq!(split_host_port(b""), None);
        assert_eq!(split_host_port(b"api.test@evil.test"), None);
    }

    #[test]
    fn finds_the_authority_of_absolute_form_targets() {
        assert_eq!(absolute_form_authority(b"https://evil.test:8443/x?y"), Some(&b"evil.test:8443"[..]));
        assert_eq!(absolute_form_authority(b"HTTP://evil.test?x"), Some(&b"evil.test"[..]));
        assert_eq!(absolute_form_authority(b"ws+x://h#f"), Some(&b"h"[..]));
        assert_eq!(absolute_form_authority(b"file:///etc"), Some(&b""[..]));
        assert_eq!(absolute_form_authority(b"/path?u=http://evil.test"), None);
        assert_eq!(absolute_form_authority(b"*"), None);
    }

    #[test]
    fn parses_absolute_http_urls() {
        let (a, p) = parse_absolute_http(b"http://Example.com:8080/a?b=c").unwrap();
        assert_eq!((a.host.as_str(), a.port, p.as_slice()), ("example.com", 8080, &b"/a?b=c"[..]));
        let (a, p) = parse_absolute_http(b"http://example.com?x").unwrap();
        assert_eq!((a.port, p.as_slice()), (80, &b"/?x"[..]));
        assert!(parse_absolute_http(b"https://example.com/").is_none());
        assert!(parse_absolute_http(b"/relative").is_none());
    }
}
