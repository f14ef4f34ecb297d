//! Host names and allowlist patterns: an exact host or `*.` wildcard, each with an
//! optional port. Without a port a pattern admits the default port of the traffic
//! (443 for TLS tunnels, 80 for plain HTTP). Wildcards that would cover a public
//! suffix (`*.com`, `*.co.uk`, `*.github.io`) are refused: they admit hosts of
//! unrelated owners. The public-suffix list is compiled into the binary (`psl`
//! crate), so the check needs no network.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Lower-cases and strips one trailing dot; rejects anything that is neither a
/// DNS name (letters, digits, `-`, `_`, dots) nor an IP literal.
pub fn normalize_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let valid_label = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.split('.').all(valid_label) {
        Some(host.to_ascii_lowercase())
    } else {
        None
    }
}

/// What kind of traffic a destination carries; it decides the port a pattern
/// without one admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// A CONNECT tunnel (TLS, intercepted): default port 443.
    Tunnel,
    /// An absolute `http://` request: default port 80.
    PlainHttp,
}

impl Traffic {
    pub fn default_port(self) -> u16 {
        match self {
            Self::Tunnel => 443,
            Self::PlainHttp => 80,
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
enum NamePattern {
    /// `*.suffix`: strict subdomains of `suffix`.
    Subdomains(String),
    Exact(String),
}

/// One allowlist entry: `host`, `*.suffix`, either followed by `:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct HostPattern {
    name: NamePattern,
    port: Option<u16>,
}

/// Splits `name[:port]` (IPv6 literals as `[addr]:port` or bare `addr`).
fn split_port(p: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |s: &str| match s.parse::<u16>() {
        Ok(port) if port > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(port)),
        _ => Err(format!("port {s:?} is not a number from 1 to 65535")),
    };
    if let Some(rest) = p.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("unclosed [ in an IPv6 address")?;
        return match after {
            "" => Ok((addr, None)),
            _ => Ok((addr, parse_port(after.strip_prefix(':').ok_or("expected :port after ]")?)?)),
        };
    }
    match p.matches(':').count() {
        0 => Ok((p, None)),
        1 => {
            let (name, port) = p.split_once(':').ok_or("expected host:port")?;
            Ok((name, parse_port(port)?))
        }
        _ if p.parse::<Ipv6Addr>().is_ok() => Ok((p, None)),
        _ => Err("too many ':' (write IPv6 addresses with a port as [addr]:port)".into()),
    }
}

/// True when `name` is itself a public suffix (a TLD, `co.uk`, `github.io`, or a
/// label no list knows, which the list's default rule treats as a TLD).
fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|s| s.as_bytes() == name.as_bytes())
}

impl HostPattern {
    /// Parses one entry; the error names the entry and says what is wrong.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let p = pattern.trim();
        let invalid = |why: &str| format!("invalid host pattern {pattern:?}: {why}");
        let (name, port) = split_port(p).map_err(|e| invalid(&e))?;
        if name == "*" {
            return Err(invalid("`*` would admit every host; list the hosts (or `*.` a domain you trust)"));
        }
        let name = if let Some(suffix) = name.strip_prefix("*.") {
            let suffix = normalize_host(suffix)
                .filter(|s| s.parse::<IpAddr>().is_err())
                .ok_or_else(|| invalid("expected `*.` followed by a domain name"))?;
            if is_public_suffix(&suffix) {
                return Err(invalid(&format!(
                    "{suffix} is a public suffix, so the wildcard would admit hosts of unrelated owners; name a domain under it"
                )));
            }
            NamePattern::Subdomains(suffix)
        } else {
            NamePattern::Exact(
                normalize_host(name)
                    .ok_or_else(|| invalid("expected a host name like api.example.com or an IP address"))?,
            )
        };
        Ok(Self { name, port })
    }

    /// `host` must already be normalised.
    pub fn matches(&self, host: &str, port: u16, traffic: Traffic) -> bool {
        if self.port.unwrap_or(traffic.default_port()) != port {
            return false;
        }
        match &self.name {
            NamePattern::Exact(h) => h == host,
            NamePattern::Subdomains(suffix) => {
                host.strip_suffix(suffix.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            NamePattern::Subdomains(s) => write!(f, "*.{s}")?,
            NamePattern::Exact(s) if s.contains(':') => write!(f, "[{s}]")?,
            NamePattern::Exact(s) => f.write_str(s)?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// A parsed list of patterns.
#[derive(Clone, Debug, Default)]
pub struct HostList(Vec<HostPattern>);

impl HostList {
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        patterns.iter().map(|p| HostPattern::parse(p)).collect::<Result<Vec<_>, _>>().map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn any_matches(&self, host: &str, port: u16, traffic: Traffic) -> bool {
        self.0.iter().any(|p| p.matches(host, port, traffic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLS: Traffic = Traffic::Tunnel;

    #[test]
    fn normalizes_names_and_ips() {
        assert_eq!(normalize_host("API.Example.COM.").as_deref(), Some("api.example.com"));
        assert_eq!(normalize_host("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host("::1").as_deref(), Some("::1"));
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host("a..b"), None);
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn wildcard_matches_strict_subdomains_only() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert!(p.matches("api.example.com", 443, TLS));
        assert!(p.matches("a.b.example.com", 443, TLS));
        assert!(!p.matches("example.com", 443, TLS));
        assert!(!p.matches("badexample.com", 443, TLS));
        assert!(!p.matches("example.com.evil.net", 443, TLS));
        let e = HostPattern::parse("Example.com").unwrap();
        assert!(e.matches("example.com", 443, TLS));
        assert!(!e.matches("api.example.com", 443, TLS));
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("exa mple.com").is_err());
    }

    #[test]
    fn ports_default_to_the_traffic_kind() {
        let p = HostPattern::parse("api.example.com").unwrap();
        assert!(p.matches("api.example.com", 443, Traffic::Tunnel));
        assert!(!p.matches("api.example.com", 80, Traffic::Tunnel));
        assert!(!p.matches("api.example.com", 8443, Traffic::Tunnel));
        assert!(p.matches("api.example.com", 80, Traffic::PlainHttp));
        assert!(!p.matches("api.example.com", 443, Traffic::PlainHttp));
        let db = HostPattern::parse("db.internal.example:5432").unwrap();
        assert!(db.matches("db.internal.example", 5432, TLS));
        assert!(!db.matches("db.internal.example", 443, TLS));
        let v6 = HostPattern::parse("[::1]:8443").unwrap();
        assert!(v6.matches("::1", 8443, TLS));
        assert!(HostPattern::parse("::1").unwrap().matches("::1", 443, TLS));
        assert_eq!(format!("{v6:?} {db:?}"), "[::1]:8443 db.internal.example:5432");
        for bad in ["a.example:0", "a.example:65536", "a.example:+1", "a.example:", "[::1", "[::1]x", "a:b:c"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_over_public_suffixes_are_refused() {
        for bad in ["*", "*.com", "*.co.uk", "*.github.io", "*.s3.amazonaws.com", "*.internal", "*:443", "*.com:8443"] {
            let e = HostPattern::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        for good in ["*.example.com", "*.example.co.uk", "*.me.github.io", "*.corp.internal", "github.io", "com"] {
            assert!(HostPattern::parse(good).is_ok(), "{good}");
        }
    }
}
