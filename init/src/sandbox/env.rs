//! The environment every command and session starts with: a fixed base, then the variables the
//! appliance set (sealed tokens, proxy and CA settings), then the request's own. Values are
//! opaque to the agent and never logged.

use super::error::OpError;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::RwLock;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MAX_NAME: usize = 1024;
const MAX_VALUE: usize = 128 * 1024;
/// Bounds the store so that repeated requests cannot grow the agent without limit.
const MAX_VARS: usize = 4096;

#[derive(Default)]
pub struct EnvStore {
    vars: RwLock<BTreeMap<String, String>>,
}

impl EnvStore {
    /// Applies `set` then `unset`, all or nothing.
    pub fn update(&self, set: &[(String, String)], unset: &[String]) -> Result<(), OpError> {
        validate(set)?;
        for name in unset {
            check_name(name)?;
        }
        let mut vars = self.vars.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = vars.clone();
        for (name, value) in set {
            next.insert(name.clone(), value.clone());
        }
        for name in unset {
            next.remove(name);
        }
        if next.len() > MAX_VARS {
            return Err(OpError::bad_request(format!("more than {MAX_VARS} environment variables")));
        }
        *vars = next;
        Ok(())
    }

    /// The full environment for a command: base, stored, then `extra` (later wins).
    pub fn for_command(&self, home: &Path, extra: &[(String, String)]) -> Result<Vec<(String, String)>, OpError> {
        validate(extra)?;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), PATH.into());
        env.insert("HOME".into(), home.to_string_lossy().into_owned());
        env.insert("LANG".into(), "C.UTF-8".into());
        let vars = self.vars.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        env.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(extra.iter().cloned());
        Ok(env.into_iter().collect())
    }
}

pub fn validate(vars: &[(String, String)]) -> Result<(), OpError> {
    for (name, value) in vars {
        check_name(name)?;
        if value.contains('\0') {
            return Err(OpError::bad_request(format!("value of {name} contains a NUL byte")));
        }
        if value.len() > MAX_VALUE {
            return Err(OpError::bad_request(format!("value of {name} is longer than {MAX_VALUE} bytes")));
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), OpError> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('=') || name.contains('\0') {
        // The name is safe to echo; it is the value that may be a token.
        return Err(OpError::bad_request(format!("invalid environment variable name {name:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let store = EnvStore::default();
        store.update(&pairs(&[("A", "stored"), ("B", "stored"), ("PATH", "/opt/bin")]), &[]).unwrap();
        let env = store.for_command(Path::new("/root"), &pairs(&[("B", "request")])).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("stored"));
        assert_eq!(get("B"), Some("request"));
        assert_eq!(get("PATH"), Some("/opt/bin"));
        assert_eq!(get("HOME"), Some("/root"));
    }

    #[test]
    fn unset_removes_and_invalid_updates_change_nothing() {
        let store = EnvStore::default();
        store.update(&pairs(&[("A", "1")]), &[]).unwrap();
        assert!(store.update(&pairs(&[("C", "3"), ("BAD=NAME", "x")]), &[]).is_err());
        assert!(store.update(&pairs(&[("D", "nul\0")]), &[]).is_err());
        let env = store.for_command(Path::new("/"), &[]).unwrap();
        assert!(env.iter().any(|(k, _)| k == "A"));
        assert!(!env.iter().any(|(k, _)| k == "C"));
        store.update(&[], &["A".to_string()]).unwrap();
        let env = store.for_command(Path::new("/"), &[]).unwrap();
        assert!(!env.iter().any(|(k, _)| k == "A"));
    }

    #[test]
    fn errors_name_the_variable_but_never_show_its_value() {
        let err = validate(&pairs(&[("TOKEN", "osb_sealed_secretish\0")])).unwrap_err();
        assert!(err.message.contains("TOKEN"));
        assert!(!err.message.contains("osb_sealed_secretish"));
    }
}
