//! Sealed tokens: minting `osb_sealed_<32 hex>` per sandbox and secret, and the
//! interface through which their bindings reach the sealing proxy.

use std::fmt;

use zeroize::Zeroizing;

use crate::crypto::{random_bytes, CryptoError};

/// A fresh token from the OS's random number generator.
pub fn mint_token() -> Result<String, CryptoError> {
    let mut bytes = [0u8; sealed_token::RANDOM_BYTES];
    random_bytes(&mut bytes)?;
    Ok(sealed_token::from_random(&bytes))
}

pub fn is_token(s: &str) -> bool {
    sealed_token::is_token(s.as_bytes())
}

/// One token's binding: which secret it stands for, its plaintext (wiped on drop)
/// and the hosts the plaintext may be sent to (empty: none, fail closed).
pub struct SealedBinding {
    pub token: String,
    pub secret_name: String,
    pub value: Zeroizing<Vec<u8>>,
    pub allowed_hosts: Vec<String>,
}

impl fmt::Debug for SealedBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBinding")
            .field("token", &self.token)
            .field("secret_name", &self.secret_name)
            .field("value", &"<redacted>")
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// Everything the proxy needs for one sandbox.
#[derive(Debug)]
pub struct SandboxSeal {
    pub sandbox_id: String,
    pub cid: u32,
    /// Egress allowlist (exact names and `*.` wildcards); empty allows every host.
    pub egress_allowlist: Vec<String>,
    pub bindings: Vec<SealedBinding>,
}

/// Where bindings are published (the proxy's registry in the appliance).
pub trait SealPublisher: Send + Sync {
    fn publish(&self, seal: SandboxSeal) -> Result<(), String>;
    /// Removes every binding of the sandbox; withdrawing an unknown sandbox is not an error.
    fn withdraw(&self, sandbox_id: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape_and_differ() {
        let a = mint_token().expect("mint");
        let b = mint_token().expect("mint");
        assert!(is_token(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_token("osb_sealed_XYZ"));
        assert!(!is_token(&a.to_uppercase()));
    }

    #[test]
    fn debug_output_redacts_the_value() {
        let binding = SealedBinding {
            token: "osb_sealed_00".into(),
            secret_name: "K".into(),
            value: Zeroizing::new(b"plain-value-xyz".to_vec()),
            allowed_hosts: vec![],
        };
        let shown = format!("{binding:?}");
        assert!(!shown.contains("plain-value-xyz"));
        assert!(shown.contains("redacted"));
    }
}
