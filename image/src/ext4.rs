//! ext4 disk images made from a directory with `mkfs.ext4 -d`, reproducibly: a fixed UUID and
//! directory hash seed, and every time stored in the filesystem fixed by its inputs.
//!
//! e2fsprogs 1.47.0 (Debian 12) copies each file's atime, mtime and ctime from the staging
//! tree and stamps the superblock and creation times with the clock, so two builds a second
//! apart differ. The superblock and creation times come from `E2FSPROGS_FAKE_TIME`; afterwards
//! `debugfs` sets every inode's times to its mtime clamped to `newest` (ctime cannot be set on
//! the staging tree at all, the kernel stamps it).

use crate::err;
use crate::error::{Context, Result};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Identity<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    pub hash_seed: &'a str,
}

/// Makes `out` (`size` as mkfs takes it, e.g. `2G` or `400000k`) holding the tree in `staging`,
/// then removes `staging`. `extra` goes to mkfs before the source directory. Every file's times
/// become its mtime, or `newest` (seconds since 1970) when the mtime is later: files the build
/// itself wrote get a fixed date, files that came with an input keep theirs.
pub fn from_dir(staging: &Path, out: &Path, size: &str, id: &Identity, extra: &[&str], newest: i64) -> Result<()> {
    let built = list_tree(staging).and_then(|entries| {
        mkfs(staging, out, size, id, extra, newest)?;
        set_times(out, &entries, newest)
    });
    std::fs::remove_dir_all(staging).ctx(|| format!("remove {}", staging.display()))?;
    built
}

/// The latest mtime of anything in `dir` (itself included).
pub fn newest_mtime(dir: &Path) -> Result<i64> {
    let entries = list_tree(dir)?;
    Ok(entries.iter().map(|e| e.mtime).max().unwrap_or(0))
}

struct Entry {
    /// Path inside the filesystem, starting with `/`.
    path: Vec<u8>,
    mtime: i64,
}

fn list_tree(root: &Path) -> Result<Vec<Entry>> {
    let meta = std::fs::symlink_metadata(root).ctx(|| format!("stat {}", root.display()))?;
    let mut entries = vec![Entry { path: b"/".to_vec(), mtime: meta.mtime() }];
    let mut pending: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let listing = std::fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))?;
        for item in listing {
            let item = item.ctx(|| format!("list {}", dir.display()))?;
            let host_path = item.path();
            let meta = std::fs::symlink_metadata(&host_path).ctx(|| format!("stat {}", host_path.display()))?;
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(item.file_name().as_bytes());
            // debugfs reads one command per line with double-quoted arguments.
            if path.iter().any(|b| matches!(b, b'"' | b'\\' | b'\n' | b'\r')) {
                return Err(err!(
                    "{}: file names with quotes, backslashes or line breaks cannot go into an ext4 image",
                    host_path.display()
                ));
            }
            if meta.is_dir() {
                pending.push((host_path, path.clone()));
            }
            entries.push(Entry { path, mtime: meta.mtime() });
        }
    }
    Ok(entries)
}

fn mkfs(staging: &Path, out: &Path, size: &str, id: &Identity, extra: &[&str], newest: i64) -> Result<()> {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", id.label, "-U", id.uuid])
        .args(extra)
        .args(["-E", &format!("hash_seed={},root_owner=0:0", id.hash_seed)])
        .arg("-d")
        .arg(staging)
        .arg(out)
        .arg(size)
        .env("E2FSPROGS_FAKE_TIME", newest.to_string())
        .env("SOURCE_DATE_EPOCH", newest.to_string())
        // mkfs.ext4 -d announces each file it creates even with -q.
        .stdout(Stdio::null())
        .status()
        .ctx(|| "run mkfs.ext4".into())?;
    if !status.success() {
        return Err(err!("mkfs.ext4 -d for {} failed ({status})", out.display()));
    }
    Ok(())
}

fn set_times(image: &Path, entries: &[Entry], newest: i64) -> Result<()> {
    let mut script = Vec::with_capacity(entries.len() * 4 * 48);
    for entry in entries {
        let time = entry.mtime.min(newest);
        for field in ["atime", "mtime", "ctime", "crtime"] {
            script.extend_from_slice(b"sif \"");
            script.extend_from_slice(&entry.path);
            script.extend_from_slice(format!("\" {field} @{time}\n").as_bytes());
        }
    }
    let script_path = image.with_extension("times");
    std::fs::write(&script_path, &script).ctx(|| format!("write {}", script_path.display()))?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", newest.to_string())
        .stdin(Stdio::null())
        .output()
        .ctx(|| "run debugfs".into());
    let _ = std::fs::remove_file(&script_path);
    let output = output?;
    // debugfs exits 0 even when a command fails; its stderr holds the banner and any failure.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failures: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()).collect();
    if !output.status.success() || !failures.is_empty() {
        let shown: Vec<&str> = failures.into_iter().take(5).collect();
        return Err(err!("setting file times in {} failed ({}): {}", image.display(), output.status, shown.join("; ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn installed(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    fn stat(image: &Path, path: &str) -> String {
        let out = Command::new("debugfs").arg("-R").arg(format!("stat {path}")).arg(image).output().expect("debugfs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn makes_a_labelled_image_reproducibly_and_removes_the_staging_tree() {
        if !installed("mkfs.ext4") || !installed("debugfs") {
            eprintln!("e2fsprogs is not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("image-ext4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = Identity {
            label: "oc-test",
            uuid: "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee0ff",
            hash_seed: "0c0ffee0-5a1d-4b0c-8e3a-5eed000000ff",
        };
        let newest: i64 = 1_000_000_000;
        let input_time = newest - 1000;
        let mut images = Vec::new();
        for n in 0..2 {
            if n == 1 {
                // The second tree is written in a later second: other ctimes, atimes and mtimes.
                std::thread::sleep(Duration::from_millis(1100));
            }
            let staging = dir.join(format!("staging{n}"));
            std::fs::create_dir_all(staging.join("sub")).expect("mkdir");
            std::fs::write(staging.join("sub/new file"), b"content").expect("write");
            let old = std::fs::File::create(staging.join("sub/from-input")).expect("create");
            old.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(input_time as u64)).expect("set mtime");
            assert!(newest_mtime(&staging).expect("newest") > newest, "files written now are newer");
            let out = dir.join(format!("out{n}.ext4"));
            from_dir(&staging, &out, "4M", &id, &["-m", "0"], newest).expect("mkfs");
            assert!(!staging.exists(), "the staging tree is removed");
            images.push(std::fs::read(&out).expect("read"));
        }
        // Superblock at 1024: magic 0xEF53 at +56, label at +120.
        assert_eq!(&images[0][1080..1082], &[0x53, 0xEF]);
        assert_eq!(&images[0][1144..1151], b"oc-test");
        assert!(images[0] == images[1], "same inputs give the same image");
        let image = dir.join("out0.ext4");
        let kept = stat(&image, "/sub/from-input");
        let clamped = stat(&image, "\"/sub/new file\"");
        for field in ["atime", "mtime", "ctime", "crtime"] {
            let shows = |stat: &str, time: i64| {
                stat.lines().any(|l| l.trim_start().starts_with(&format!("{field}: {time:#010x}:")))
            };
            assert!(shows(&kept, input_time), "{field} of an input file is its mtime: {kept}");
            assert!(shows(&clamped, newest), "{field} of a new file is `newest`: {clamped}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_debugfs_cannot_quote_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("image-ext4-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("say \"hi\""), b"").expect("write");
        let message = list_tree(&dir).err().expect("refused").to_string();
        assert!(message.contains("say \"hi\"") && message.contains("quotes"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
