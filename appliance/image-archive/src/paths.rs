//! Archive paths checked and turned into relative paths of plain components, and symlink
//! targets checked, all lexically (nothing here looks at the filesystem).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The longest name of one path component on Linux filesystems (NAME_MAX).
const NAME_MAX: usize = 255;
/// The longest symlink target Linux stores (PATH_MAX less its NUL).
const TARGET_MAX: usize = 4095;

/// `raw` as a relative path of plain components (empty for the root itself, e.g. `./`), at most
/// `max_len` bytes long; or why it is refused. Empty and `.` components are dropped; a leading
/// `/` is refused, not stripped.
pub(crate) fn relative(raw: &[u8], max_len: usize) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("the path is empty".to_string());
    }
    if raw.contains(&0) {
        return Err("the path contains a NUL byte".to_string());
    }
    if raw[0] == b'/' {
        return Err("the path is absolute (archive paths are relative to the root)".to_string());
    }
    let mut rel = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("the path has a \"..\" component".to_string()),
            _ if part.len() > NAME_MAX => return Err(format!("a path component is longer than {NAME_MAX} bytes")),
            _ => rel.push(OsStr::from_bytes(part)),
        }
    }
    if rel.as_os_str().len() > max_len {
        return Err(format!("the path is longer than {max_len} bytes"));
    }
    Ok(rel)
}

/// Checks the target of a symlink at `link`: an absolute target is kept (inside the sandbox it
/// resolves against the sandbox's root); a relative one must stay within the root when resolved
/// lexically from the link's directory.
pub(crate) fn check_symlink_target(link: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("the symlink has an empty target".to_string());
    }
    if target.contains(&0) {
        return Err("the symlink target contains a NUL byte".to_string());
    }
    if target.len() > TARGET_MAX {
        return Err(format!("the symlink target is longer than {TARGET_MAX} bytes"));
    }
    if target[0] == b'/' {
        return Ok(());
    }
    // How many directories below the root the link's directory is.
    let mut depth = link.components().count().saturating_sub(1);
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if depth == 0 => {
                return Err(format!("the symlink target {:?} climbs above the root", String::from_utf8_lossy(target)))
            }
            b".." => depth -= 1,
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_keep_plain_components_only() {
        assert_eq!(relative(b"./usr//bin/./ls", 4000), Ok(PathBuf::from("usr/bin/ls")));
        assert_eq!(relative(b"etc/", 4000), Ok(PathBuf::from("etc")));
        assert_eq!(relative(b"./", 4000), Ok(PathBuf::new()));
        assert_eq!(relative(b".", 4000), Ok(PathBuf::new()));
    }

    #[test]
    fn hostile_paths_are_refused() {
        for (raw, why) in [
            (&b""[..], "empty"),
            (b"/etc/passwd", "absolute"),
            (b"a/../../etc", "\"..\""),
            (b"..", "\"..\""),
            (b"a\0b", "NUL"),
        ] {
            let err = relative(raw, 4000).expect_err("refused");
            assert!(err.contains(why), "{raw:?}: {err}");
        }
        let long = vec![b'x'; 256];
        assert!(relative(&long, 4000).expect_err("long").contains("longer than 255"));
        assert!(relative(b"aaaa/bbbb", 8).expect_err("long").contains("longer than 8"));
    }

    #[test]
    fn relative_symlink_targets_must_stay_below_the_root() {
        let link = Path::new("a/b");
        assert!(check_symlink_target(link, b"../c").is_ok());
        assert!(check_symlink_target(link, b"/etc/passwd").is_ok(), "absolute targets resolve in the sandbox");
        assert!(check_symlink_target(link, b"../../etc").is_err());
        assert!(check_symlink_target(link, b"../../../etc").is_err());
        assert!(check_symlink_target(link, b"x/../../../etc").is_err());
        assert!(check_symlink_target(link, b"./x/../..").is_ok());
        assert!(check_symlink_target(Path::new("top"), b"..").is_err());
        assert!(check_symlink_target(Path::new("top"), b"").is_err());
    }
}
