//! One destination per connection: every name a request (or its TLS ClientHello)
//! gives for where it is going must be the host the proxy checked and dials.
//!
//! A shared front end picks the application by SNI, Host header or absolute-form
//! target; if any of them could name another host, a tunnel opened to an allowed
//! host would carry that host's secrets to whatever the sandbox names instead.

use std::fmt;

use crate::hostmatch::normalize_host;
use crate::http::head::RequestHead;
use crate::http::target::{absolute_form_authority, split_host_port, Authority};

/// A host (and port, when one was given) named by a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub host: String,
    pub port: Option<u16>,
}

impl Named {
    fn matches(&self, dest: &Authority) -> bool {
        self.host == dest.host && self.port.is_none_or(|p| p == dest.port)
    }
}

/// Why a request may not go to the connection's destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The request names another host (answered `421 Misdirected Request`).
    Elsewhere(Named),
    /// A Host header or target that cannot be read as a host (answered `400`).
    Malformed(&'static str),
}

/// Writes `host[:port]`, bracketing IPv6 literals. A host name that carries a sealed
/// token (a token is a valid DNS label) is not written out: messages are logged.
fn write_host_port(f: &mut fmt::Formatter<'_>, host: &str, port: Option<u16>) -> fmt::Result {
    if host.contains(sealed_token::PREFIX) {
        return f.write_str("a host name containing a sealed token");
    }
    if host.contains(':') {
        write!(f, "[{host}]")?;
    } else {
        f.write_str(host)?;
    }
    match port {
        Some(p) => write!(f, ":{p}"),
        None => Ok(()),
    }
}

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_host_port(f, &self.host, self.port)
    }
}

/// Display form of a destination for messages (`host:port`).
pub struct Shown<'a>(pub &'a Authority);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_host_port(f, &self.0.host, Some(self.0.port))
    }
}

/// Checks the Host header(s) and the request target against `dest`. A request
/// without a Host header (HTTP/1.0) is judged by its target alone.
pub fn check_request(head: &RequestHead, dest: &Authority) -> Result<(), Mismatch> {
    let mut hosts = head.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    if let Some(host) = hosts.next() {
        // Two Host headers: each hop may pick a different one (RFC 9112 3.2 says 400).
        if hosts.next().is_some() {
            return Err(Mismatch::Malformed("more than one Host header"));
        }
        let (host, port) =
            split_host_port(&host.value).ok_or(Mismatch::Malformed("the Host header is not a valid host[:port]"))?;
        check_named(Named { host, port }, dest)?;
    }
    let target = head.target.as_slice();
    if target.first() == Some(&b'/') || target == b"*" {
        // origin-form and asterisk-form name no host.
        return Ok(());
    }
    let authority = absolute_form_authority(target)
        .ok_or(Mismatch::Malformed("the request target must be a path (/...) or an absolute URL"))?;
    let (host, port) = split_host_port(authority)
        .ok_or(Mismatch::Malformed("the request target's authority is not a valid host[:port]"))?;
    check_named(Named { host, port }, dest)
}

fn check_named(named: Named, dest: &Authority) -> Result<(), Mismatch> {
    if named.matches(dest) {
        Ok(())
    } else {
        Err(Mismatch::Elsewhere(named))
    }
}

/// Checks a TLS server name (SNI) against `dest`; no SNI is fine (clients omit it
/// for IP addresses). `Err` carries the name as the client sent it, normalised
/// when possible.
pub fn check_sni(sni: Option<&str>, dest: &Authority) -> Result<(), Named> {
    let Some(sni) = sni else {
        return Ok(());
    };
    match normalize_host(sni) {
        Some(host) if host == dest.host => Ok(()),
        Some(host) => Err(Named { host, port: None }),
        // rustls only hands over valid DNS names; this is belt and braces.
        None => Err(Named { host: "an invalid server name".into(), port: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{find_head_end, parse_request_head};

    fn dest() -> Authority {
        Authority { host: "api.test".into(), port: 443 }
    }

    fn check(raw: &str) -> Result<(), Mismatch> {
        let raw = raw.as_bytes();
        let end = find_head_end(raw).unwrap();
        check_request(&parse_request_head(&raw[..end], 100).unwrap(), &dest())
    }

    fn elsewhere(host: &str, port: Option<u16>) -> Result<(), Mismatch> {
        Err(Mismatch::Elsewhere(Named { host: host.into(), port }))
    }

    #[test]
    fn host_header_must_name_the_destination() {
        assert_eq!(check("GET / HTTP/1.1\r\nHost: api.test\r\n\r\n"), Ok(()));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: API.Test.:443\r\n\r\n"), Ok(()));
        assert_eq!(check("GET / HTTP/1.1\r\nhost: evil.test\r\n\r\n"), elsewhere("evil.test", None));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: api.test:8443\r\n\r\n"), elsewhere("api.test", Some(8443)));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: api.test.evil.test\r\n\r\n"), elsewhere("api.test.evil.test", None));
        assert!(matches!(
            check("GET / HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\n\r\n"),
            Err(Mismatch::Malformed(_))
        ));
        assert!(matches!(check("GET / HTTP/1.1\r\nHost:\r\n\r\n"), Err(Mismatch::Malformed(_))));
        assert!(matches!(check("GET / HTTP/1.1\r\nHost: api.test@evil.test\r\n\r\n"), Err(Mismatch::Malformed(_))));
    }

    #[test]
    fn absolute_form_target_must_name_the_destination() {
        assert_eq!(check("GET https://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"), Ok(()));
        assert_eq!(check("GET HTTPS://API.TEST:443?x HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(check("GET https://evil.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"), elsewhere("evil.test", None));
        assert_eq!(check("GET http://evil.test/x HTTP/1.0\r\n\r\n"), elsewhere("evil.test", None));
        assert_eq!(check("GET / HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(check("OPTIONS * HTTP/1.1\r\nHost: api.test\r\n\r\n"), Ok(()));
        assert!(matches!(check("GET evil.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n"), Err(Mismatch::Malformed(_))));
        assert!(matches!(check("GET file:///x HTTP/1.1\r\nHost: api.test\r\n\r\n"), Err(Mismatch::Malformed(_))));
        assert!(matches!(
            check("GET https://api.test@evil.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Err(Mismatch::Malformed(_))
        ));
    }

    #[test]
    fn sni_must_name_the_destination() {
        assert_eq!(check_sni(None, &dest()), Ok(()));
        assert_eq!(check_sni(Some("API.test."), &dest()), Ok(()));
        assert_eq!(check_sni(Some("evil.test"), &dest()), Err(Named { host: "evil.test".into(), port: None }));
    }

    #[test]
    fn messages_never_spell_out_a_token() {
        let named =
            Named { host: format!("{}0123456789abcdef0123456789abcdef.evil.test", sealed_token::PREFIX), port: None };
        assert!(!named.to_string().contains(sealed_token::PREFIX));
        let v6 = Authority { host: "::1".into(), port: 443 };
        assert_eq!(Shown(&v6).to_string(), "[::1]:443");
    }
}
