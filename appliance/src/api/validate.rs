//! Input rules shared by handlers: ids, names, host patterns, file paths.

use crate::error::AppError;

/// Ids are UUIDs; anything else is a 400 (not a 404) so typos are obvious.
pub fn uuid(kind: &str, raw: &str) -> Result<String, AppError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| AppError::bad_request(format!("invalid {kind} id {raw:?}: expected a UUID")))
}

/// Project names: 1-64 characters of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn project_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(format!(
            "invalid project name {name:?}: use 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Secret and env names are shell variable names.
pub fn env_name(kind: &str, name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(format!(
            "invalid {kind} name {name:?}: use letters, digits and '_', not starting with a digit"
        )))
    }
}

/// Template names are the names of template directories in the image.
pub fn template(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(format!("invalid template {name:?}")))
    }
}

/// Most entries a host list (`egressAllowlist`, `allowedHosts`) may have.
pub const MAX_HOST_PATTERNS: usize = 256;

/// One host list entry, checked by the proxy's own parser so the API accepts exactly what
/// the proxy enforces: `host`, `*.domain` or either with `:port`; wildcards over a public
/// suffix are refused. Returned trimmed and lower-cased, as stored.
pub fn host_pattern(field: &str, pattern: &str) -> Result<String, AppError> {
    proxy::hostmatch::HostPattern::parse(pattern).map_err(|e| AppError::bad_request(format!("{field}: {e}")))?;
    Ok(pattern.trim().to_ascii_lowercase())
}

/// A whole host list: at most `MAX_HOST_PATTERNS` valid entries, duplicates dropped.
pub fn host_list(field: &str, raw: &[String]) -> Result<Vec<String>, AppError> {
    if raw.len() > MAX_HOST_PATTERNS {
        return Err(AppError::bad_request(format!("{field} has more than {MAX_HOST_PATTERNS} entries")));
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for entry in raw {
        let pattern = host_pattern(field, entry)?;
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    Ok(out)
}

/// A path inside the sandbox: absolute or relative to the agent's working directory,
/// but never escaping upwards (`..`), and free of NUL bytes.
pub fn sandbox_path(raw: Option<String>) -> Result<String, AppError> {
    let path = raw.ok_or_else(|| AppError::bad_request("missing ?path= query parameter"))?;
    if path.is_empty() {
        return Err(AppError::bad_request("path must not be empty"));
    }
    if path.len() > 4096 {
        return Err(AppError::bad_request("path is longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(AppError::bad_request("path must not contain NUL bytes"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(AppError::new(403, format!("path {path:?} is refused: '..' components are not allowed")));
    }
    Ok(path)
}

/// Resource bounds accepted by the API.
pub const MAX_CPU_COUNT: u32 = 64;
pub const MIN_MEMORY_MB: u32 = 64;
pub const MAX_MEMORY_MB: u32 = 256 * 1024;
/// Thirty days.
pub const MAX_TIMEOUT_SEC: u64 = 30 * 24 * 3600;

pub fn cpu_count(v: u32) -> Result<u32, AppError> {
    if (1..=MAX_CPU_COUNT).contains(&v) {
        Ok(v)
    } else {
        Err(AppError::bad_request(format!("cpuCount must be between 1 and {MAX_CPU_COUNT}, got {v}")))
    }
}

pub fn memory_mb(v: u32) -> Result<u32, AppError> {
    if (MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&v) {
        Ok(v)
    } else {
        Err(AppError::bad_request(format!("memoryMB must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}, got {v}")))
    }
}

/// The largest root disk a create may ask for (the limit today's OpenComputer API has).
pub const MAX_DISK_MB: u32 = 256 * 1024;

pub fn disk_mb(v: u32) -> Result<u32, AppError> {
    if v <= MAX_DISK_MB {
        Ok(v)
    } else {
        Err(AppError::bad_request(format!("diskMB must be at most {MAX_DISK_MB}, got {v}")))
    }
}

pub fn timeout_sec(field: &str, v: u64) -> Result<u64, AppError> {
    if (1..=MAX_TIMEOUT_SEC).contains(&v) {
        Ok(v)
    } else {
        Err(AppError::bad_request(format!("{field} must be between 1 and {MAX_TIMEOUT_SEC} seconds, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_patterns() {
        assert!(uuid("project", "not-a-uuid").is_err());
        assert_eq!(
            uuid("project", "6F9619FF-8B86-D011-B42D-00C04FC964FF").expect("uuid"),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        assert!(project_name("my-agent_1.0").is_ok());
        assert!(project_name("-x").is_err());
        assert!(project_name("a b").is_err());
        assert!(env_name("secret", "API_KEY").is_ok());
        assert!(env_name("secret", "1KEY").is_err());
        assert!(env_name("secret", "KEY-X").is_err());
        assert_eq!(host_pattern("egressAllowlist", " *.Example.com").expect("ok"), "*.example.com");
        let err = host_pattern("egressAllowlist", "exa mple.com").unwrap_err();
        assert_eq!(err.status, 400);
        assert!(
            err.message.starts_with("egressAllowlist: ") && err.message.contains("exa mple.com"),
            "{}",
            err.message
        );
        assert!(host_pattern("allowedHosts", "*.").is_err());
        assert_eq!(
            host_list("allowedHosts", &["a.example".into(), "A.example".into(), "b.example".into()]).expect("ok"),
            vec!["a.example", "b.example"]
        );
        let too_many: Vec<String> = (0..=MAX_HOST_PATTERNS).map(|i| format!("h{i}.example")).collect();
        assert!(host_list("allowedHosts", &too_many).unwrap_err().message.contains("more than 256"));
        assert!(template("../etc").is_err());
        for name in ["base", "default", "python", "node"] {
            assert!(template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn traversal_is_refused() {
        assert!(sandbox_path(Some("/home/user/a.txt".into())).is_ok());
        assert_eq!(sandbox_path(Some("/home/../etc/passwd".into())).unwrap_err().status, 403);
        assert_eq!(sandbox_path(Some("..".into())).unwrap_err().status, 403);
        assert!(sandbox_path(Some("a\0b".into())).is_err());
        assert!(sandbox_path(None).is_err());
    }
}
