//! A secret's plaintext as the proxy holds it: wiped on drop, never printed. The
//! registry keeps it per sealed token; substitution writes it into requests.

use std::fmt;

use zeroize::Zeroizing;

/// A secret's plaintext. Wiped on drop; never printed (`Debug` is redacted).
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Takes ownership of the bytes, so no unwiped copy is left behind by this call.
    pub fn new(value: Vec<u8>) -> Self {
        Self(Zeroizing::new(value))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for SecretValue {
    fn from(s: String) -> Self {
        Self::new(s.into_bytes())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}
