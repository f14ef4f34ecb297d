//! What the proxy knows about each sandbox: its egress allowlist and its sealed
//! tokens with their secret values. Filled and kept current by the appliance.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::hostmatch::{HostList, Traffic};
use crate::scrub::ScrubSet;
use crate::secret::SecretValue;
use crate::subst::{is_token, Replacements};

/// A sandbox's identity: the vsock CID the VMM assigned (never anything it sent).
pub type SandboxId = u32;

/// One sealed token's binding.
#[derive(Debug)]
pub struct SealedSecret {
    pub value: SecretValue,
    /// Host patterns (exact or `*.suffix`, optionally `:port`) this secret may be sent
    /// to. Empty means no host: the token is never replaced (fail closed).
    pub allowed_hosts: Vec<String>,
}

/// Everything registered for one sandbox.
#[derive(Debug, Default)]
pub struct SandboxBindings {
    /// Exact names and `*.` wildcards, optionally with `:port`; empty allows every
    /// host (documented API), on the default ports.
    pub egress_allowlist: Vec<String>,
    /// Sealed token (`osb_sealed_<32 lowercase hex>`) -> secret binding.
    pub tokens: Vec<(String, SealedSecret)>,
}

#[derive(Debug)]
pub enum RegistryError {
    InvalidToken {
        index: usize,
    },
    /// A value with CR, LF or NUL would break or add header lines where it is put.
    HeaderBreakingValue {
        index: usize,
    },
    InvalidHostPattern(String),
    Scrubber(String),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The token itself is not echoed: it is harmless alone, but keep errors terse.
            Self::InvalidToken { index } => {
                write!(f, "token #{index} is not of the form osb_sealed_<32 lowercase hex>")
            }
            Self::HeaderBreakingValue { index } => write!(
                f,
                "the secret of token #{index} contains CR, LF or NUL, which would break the HTTP headers it is sent in; set it again"
            ),
            Self::InvalidHostPattern(msg) | Self::Scrubber(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for RegistryError {}

struct TokenBinding {
    token: Arc<str>,
    value: Arc<SecretValue>,
    hosts: HostList,
}

/// A registered sandbox's policy, as one immutable snapshot.
pub struct SandboxPolicy {
    egress: HostList,
    tokens: Vec<TokenBinding>,
    scrub: Arc<ScrubSet>,
}

impl SandboxPolicy {
    /// `host` must be normalised (see [`crate::hostmatch::normalize_host`]). An
    /// empty allowlist admits every host, on the traffic's default port only.
    pub fn allows(&self, host: &str, port: u16, traffic: Traffic) -> bool {
        if self.egress.is_empty() {
            return port == traffic.default_port();
        }
        self.egress.any_matches(host, port, traffic)
    }

    /// The tokens of this sandbox whose secret may reach `host:port` in a TLS tunnel
    /// (the only traffic tokens are replaced in).
    pub fn replacements_for(&self, host: &str, port: u16) -> Replacements {
        let mut repl = Replacements::new();
        for b in self.tokens.iter().filter(|b| b.hosts.any_matches(host, port, Traffic::Tunnel)) {
            repl.insert(b.token.as_bytes(), b.value.clone());
        }
        repl
    }

    /// Every secret value this sandbox has held a token for since it was registered,
    /// with its token: what responses to it are scrubbed of.
    pub fn scrub_set(&self) -> &Arc<ScrubSet> {
        &self.scrub
    }
}

impl fmt::Debug for SandboxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxPolicy")
            .field("egress", &self.egress)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// Sandbox id -> policy. Cheap to share (`Arc<SealRegistry>`); readers take a
/// snapshot per request, so updates apply to the next request.
#[derive(Default)]
pub struct SealRegistry {
    sandboxes: RwLock<HashMap<SandboxId, Arc<SandboxPolicy>>>,
}

impl SealRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers or replaces a sandbox's bindings. Nothing changes on error.
    pub fn register(&self, sandbox: SandboxId, bindings: SandboxBindings) -> Result<(), RegistryError> {
        let egress = HostList::parse(&bindings.egress_allowlist).map_err(RegistryError::InvalidHostPattern)?;
        let mut tokens = Vec::with_capacity(bindings.tokens.len());
        for (index, (token, secret)) in bindings.tokens.into_iter().enumerate() {
            if !is_token(token.as_bytes()) {
                return Err(RegistryError::InvalidToken { index });
            }
            // Also refused when stored (the API checks new values); older stores may hold one.
            if secret.value.expose().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(RegistryError::HeaderBreakingValue { index });
            }
            let hosts = HostList::parse(&secret.allowed_hosts).map_err(RegistryError::InvalidHostPattern)?;
            tokens.push(TokenBinding { token: Arc::from(token), value: Arc::new(secret.value), hosts });
        }
        let pairs = tokens.iter().map(|t| (t.value.clone(), t.token.clone())).collect();
        // Values of an earlier registration stay scrubbed (see ScrubSet::extended_with).
        let scrub = match self.policy(sandbox) {
            Some(old) => ScrubSet::extended_with(pairs, &old.scrub),
            None => ScrubSet::build(pairs),
        }
        .map_err(RegistryError::Scrubber)?;
        let policy = Arc::new(SandboxPolicy { egress, tokens, scrub: Arc::new(scrub) });
        self.sandboxes.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(sandbox, policy);
        Ok(())
    }

    /// Forgets a sandbox; its open connections stop at their next request.
    pub fn unregister(&self, sandbox: SandboxId) -> bool {
        self.sandboxes.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&sandbox).is_some()
    }

    pub fn policy(&self, sandbox: SandboxId) -> Option<Arc<SandboxPolicy>> {
        self.sandboxes.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&sandbox).cloned()
    }

    pub fn len(&self) -> usize {
        self.sandboxes.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "osb_sealed_0123456789abcdef0123456789abcdef";

    fn secret(v: &str, hosts: &[&str]) -> SealedSecret {
        SealedSecret {
            value: SecretValue::from(v.to_string()),
            allowed_hosts: hosts.iter().map(std::string::ToString::to_string).collect(),
        }
    }

    #[test]
    fn register_filters_tokens_by_host_and_unregister_removes() {
        let reg = SealRegistry::new();
        let bindings = SandboxBindings {
            egress_allowlist: vec!["api.example.com".into(), "*.internal.test".into()],
            tokens: vec![(T1.into(), secret("v", &["api.example.com"]))],
        };
        reg.register(7, bindings).unwrap();
        let p = reg.policy(7).unwrap();
        assert!(p.allows("api.example.com", 443, Traffic::Tunnel));
        assert!(p.allows("x.internal.test", 443, Traffic::Tunnel));
        assert!(!p.allows("evil.net", 443, Traffic::Tunnel));
        assert!(!p.allows("api.example.com", 8443, Traffic::Tunnel));
        assert_eq!(p.replacements_for("api.example.com", 443).len(), 1);
        assert!(p.replacements_for("api.example.com", 8443).is_empty());
        assert!(p.replacements_for("x.internal.test", 443).is_empty());
        assert!(reg.unregister(7));
        assert!(reg.policy(7).is_none());
        assert!(!reg.unregister(7));
    }

    #[test]
    fn rejects_malformed_tokens_and_patterns_without_echoing_values() {
        let reg = SealRegistry::new();
        let bad = SandboxBindings {
            egress_allowlist: vec![],
            tokens: vec![("osb_sealed_XYZ".into(), secret("hunter2", &["api.example.com"]))],
        };
        let err = reg.register(1, bad).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let crlf =
            SandboxBindings { egress_allowlist: vec![], tokens: vec![(T1.into(), secret("a\r\nX-Evil: 1", &[]))] };
        let err = reg.register(1, crlf).unwrap_err();
        assert!(err.to_string().contains("CR, LF or NUL") && !err.to_string().contains("X-Evil"), "{err}");
        let bad_host = SandboxBindings { egress_allowlist: vec!["bad host".into()], tokens: vec![] };
        assert!(reg.register(1, bad_host).is_err());
        assert!(reg.is_empty());
    }

    #[test]
    fn empty_egress_allows_all_but_empty_secret_hosts_allow_none() {
        let reg = SealRegistry::new();
        reg.register(2, SandboxBindings { egress_allowlist: vec![], tokens: vec![(T1.into(), secret("v", &[]))] })
            .unwrap();
        let p = reg.policy(2).unwrap();
        assert!(p.allows("anything.example", 443, Traffic::Tunnel));
        assert!(p.allows("anything.example", 80, Traffic::PlainHttp));
        assert!(!p.allows("anything.example", 22, Traffic::Tunnel));
        assert!(p.replacements_for("anything.example", 443).is_empty());
        assert_eq!(format!("{:?}", SecretValue::from("hunter2".to_string())), "SecretValue(<redacted>)");
    }
}
