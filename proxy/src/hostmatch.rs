//! Host names: normalisation and allowlist patterns (exact names and `*.` wildcards).

use std::fmt;
use std::net::IpAddr;

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

/// One allowlist entry: `*` (any host), `*.suffix` (strict subdomains) or an exact host.
#[derive(Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Subdomains(String),
    Exact(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let p = pattern.trim();
        if p == "*" {
            return Ok(Self::Any);
        }
        if let Some(suffix) = p.strip_prefix("*.") {
            return normalize_host(suffix)
                .filter(|s| s.parse::<IpAddr>().is_err())
                .map(Self::Subdomains)
                .ok_or_else(|| format!("invalid host pattern {pattern:?}"));
        }
        normalize_host(p).map(Self::Exact).ok_or_else(|| format!("invalid host pattern {pattern:?}"))
    }

    /// `host` must already be normalised.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(h) => h == host,
            Self::Subdomains(suffix) => {
                host.strip_suffix(suffix.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => write!(f, "*"),
            Self::Subdomains(s) => write!(f, "*.{s}"),
            Self::Exact(s) => write!(f, "{s}"),
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

    pub fn any_matches(&self, host: &str) -> bool {
        self.0.iter().any(|p| p.matches(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(p.matches("api.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert!(!p.matches("example.com.evil.net"));
        let e = HostPattern::parse("Example.com").unwrap();
        assert!(e.matches("example.com"));
        assert!(!e.matches("api.example.com"));
        assert!(HostPattern::parse("*").unwrap().matches("anything.net"));
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("exa mple.com").is_err());
    }
}
