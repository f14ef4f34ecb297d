//! The system disk: a read-only ext4 filesystem labelled `oc-system` that carries what is too
//! big for the initramfs (sandbox templates). The appliance mounts it read-only and imports
//! each template once onto the XFS data disk, where sandboxes get reflink clones of it.

use crate::cache::{self, Entry};
use crate::err;
use crate::error::{Context, Result};
use crate::ext4;
use crate::progress::{fmt_size, Outcome, Step};
use crate::template::Template;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The filesystem label init looks for.
pub const LABEL: &str = boot_disk::ext4::SYSTEM_LABEL;
/// Fixed filesystem identity, so the same inputs give the same disk.
const FS_UUID: &str = "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee001";
const HASH_SEED: &str = "0c0ffee0-5a1d-4b0c-8e3a-5eed00000001";
/// Room for ext4's own metadata beyond the files' allocated blocks.
const SLACK_BYTES: u64 = 64 << 20;

/// Builds (or takes from the cache) the system disk holding `templates`. Each template lands at
/// `templates/<name>.ext4` with `templates/<name>.id` naming its content (the cache key), which
/// the appliance uses to notice a changed template after an upgrade.
pub fn build(templates: &[Template]) -> Result<PathBuf> {
    let step = Step::start("system disk");
    let mut inputs: Vec<(String, Vec<u8>)> = vec![("recipe".into(), b"system ext4 v2".to_vec())];
    for t in templates {
        inputs.push((format!("template {}", t.name), t.id.as_bytes().to_vec()));
    }
    let refs: Vec<(&str, &[u8])> = inputs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let entry = Entry::new("system-disk", &cache::key(&refs));
    let outcome = if entry.is_complete() {
        Outcome::Cached
    } else {
        entry.fill(|dir| pack(templates, &dir.join("system.ext4")))?;
        Outcome::Built
    };
    let disk = entry.path("system.ext4");
    let size = std::fs::metadata(&disk).ctx(|| format!("stat {}", disk.display()))?;
    step.finish(outcome, &format!("{} ({} allocated)", fmt_size(size.len()), fmt_size(size.blocks() * 512)));
    Ok(disk)
}

fn pack(templates: &[Template], out: &Path) -> Result<()> {
    let staging = out.with_extension("staging");
    let dir = staging.join("templates");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let mut allocated = 0;
    for t in templates {
        let target = dir.join(format!("{}.ext4", t.name));
        // Sparse copy: the template is mostly holes and mkfs.ext4 -d keeps them.
        let status =
            Command::new("cp").arg("--sparse=always").arg(&t.disk).arg(&target).status().ctx(|| "run cp".into())?;
        if !status.success() {
            return Err(err!("copying template {} failed ({status})", t.name));
        }
        allocated += std::fs::metadata(&target).ctx(|| format!("stat {}", target.display()))?.blocks() * 512;
        std::fs::write(dir.join(format!("{}.id", t.name)), format!("{}\n", t.id)).ctx(|| "write template id".into())?;
    }
    let size_kib = (allocated + allocated / 8 + SLACK_BYTES) / 1024;
    let identity = ext4::Identity { label: LABEL, uuid: FS_UUID, hash_seed: HASH_SEED };
    ext4::from_dir(&staging, out, &format!("{size_kib}k"), &identity, &["-m", "0"], crate::SOURCE_DATE_EPOCH)?;
    Ok(())
}
