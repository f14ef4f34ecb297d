//! Turning a client-supplied path into an absolute, normalised one. Inside a sandbox the client
//! may touch any file (it is root there), so this is about predictable meaning, not confinement:
//! relative paths are taken from the home directory and `.`/`..` are resolved lexically.

use super::error::OpError;
use std::path::{Component, Path, PathBuf};

/// Longest path accepted (the kernel's PATH_MAX).
const MAX_PATH: usize = 4096;

pub fn resolve(path: &str, home: &Path) -> Result<PathBuf, OpError> {
    if path.is_empty() {
        return Err(OpError::bad_request("empty path"));
    }
    if path.len() > MAX_PATH {
        return Err(OpError::bad_request(format!("path longer than {MAX_PATH} bytes")));
    }
    if path.contains('\0') {
        return Err(OpError::bad_request("path contains a NUL byte"));
    }
    let joined = if path.starts_with('/') { PathBuf::from(path) } else { home.join(path) };
    let mut out = PathBuf::from("/");
    for component in joined.components() {
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            // `/..` is `/`, as in the kernel.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
        }
    }
    Ok(out)
}

/// A path as text for replies (paths built by `resolve` from UTF-8 stay UTF-8).
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str) -> Result<PathBuf, OpError> {
        resolve(path, Path::new("/root"))
    }

    #[test]
    fn absolute_paths_are_normalised() {
        assert_eq!(r("/etc/hosts").unwrap(), PathBuf::from("/etc/hosts"));
        assert_eq!(r("/etc//./ssl/../hosts/").unwrap(), PathBuf::from("/etc/hosts"));
        assert_eq!(r("/../../etc").unwrap(), PathBuf::from("/etc"));
        assert_eq!(r("/").unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn relative_paths_start_at_home() {
        assert_eq!(r("work/a.txt").unwrap(), PathBuf::from("/root/work/a.txt"));
        assert_eq!(r("./a").unwrap(), PathBuf::from("/root/a"));
        assert_eq!(r("../../../../etc/passwd").unwrap(), PathBuf::from("/etc/passwd"));
        assert_eq!(r(".").unwrap(), PathBuf::from("/root"));
    }

    #[test]
    fn empty_nul_and_overlong_paths_are_refused() {
        assert!(r("").is_err());
        assert!(r("/tmp/a\0b").is_err());
        assert!(r(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }
}
