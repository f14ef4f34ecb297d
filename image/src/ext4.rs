//! ext4 disk images made from a directory with `mkfs.ext4 -d`, reproducibly: a fixed UUID and
//! directory hash seed, and file times from SOURCE_DATE_EPOCH.

use crate::err;
use crate::error::{Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

pub struct Identity<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    pub hash_seed: &'a str,
}

/// Makes `out` (`size` as mkfs takes it, e.g. `2G` or `400000k`) holding the tree in `staging`,
/// then removes `staging`. `extra` goes to mkfs before the source directory.
pub fn from_dir(staging: &Path, out: &Path, size: &str, id: &Identity, extra: &[&str]) -> Result<()> {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", id.label, "-U", id.uuid])
        .args(extra)
        .args(["-E", &format!("hash_seed={},root_owner=0:0", id.hash_seed)])
        .arg("-d")
        .arg(staging)
        .arg(out)
        .arg(size)
        .env("SOURCE_DATE_EPOCH", "0")
        // mkfs.ext4 -d announces each file it creates even with -q.
        .stdout(Stdio::null())
        .status()
        .ctx(|| "run mkfs.ext4".into())?;
    std::fs::remove_dir_all(staging).ctx(|| format!("remove {}", staging.display()))?;
    if !status.success() {
        return Err(err!("mkfs.ext4 -d for {} failed ({status})", out.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_labelled_image_reproducibly_and_removes_the_staging_tree() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("mkfs.ext4 is not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("image-ext4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = Identity { label: "oc-test", uuid: "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee0ff", hash_seed: "0c0ffee0-5a1d-4b0c-8e3a-5eed000000ff" };
        let mut images = Vec::new();
        for n in 0..2 {
            let staging = dir.join(format!("staging{n}"));
            std::fs::create_dir_all(staging.join("sub")).expect("mkdir");
            std::fs::write(staging.join("sub/file"), b"content").expect("write");
            let out = dir.join(format!("out{n}.ext4"));
            from_dir(&staging, &out, "4M", &id, &["-m", "0"]).expect("mkfs");
            assert!(!staging.exists(), "the staging tree is removed");
            images.push(std::fs::read(&out).expect("read"));
        }
        // Superblock at 1024: magic 0xEF53 at +56, label at +120.
        assert_eq!(&images[0][1080..1082], &[0x53, 0xEF]);
        assert_eq!(&images[0][1144..1151], b"oc-test");
        assert!(images[0] == images[1], "same inputs give the same image");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
