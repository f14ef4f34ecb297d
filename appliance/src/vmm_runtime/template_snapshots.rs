//! Template snapshots: each template is booted once, to a ready agent (the appliance CA trusted,
//! the egress proxy set), with the default machine (`SHAPE`), and checkpointed; a create of that
//! template and machine then resumes the snapshot on a reflink clone of its disk instead of
//! booting a kernel (`VmmRuntime::boot`). Kept on the data disk under `template-snapshots/` as
//! checkpoints named `<template>-<key>`, the key a hash of everything the snapshot depends on (the
//! VMM binary, the guest kernel, the sandbox initramfs with its init and agent, the template's
//! content id, the machine), so a new VMM, kernel, init or template never resumes an old
//! snapshot: it is removed and taken again.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use orion::hazardous::hash::blake2::blake2b::Blake2b;

use super::checkpoint_files::CheckpointFiles;

/// The machine template snapshots are taken with: the API's default (1 vCPU, 512 MiB). Creates
/// of other sizes boot (a resumed guest has the memory and vCPUs it was snapshotted with).
pub const SHAPE: (u32, u32) = (1, 512);

pub struct TemplateSnapshots {
    pub files: CheckpointFiles,
    /// Template name -> the id (`<template>-<key>`) of its usable snapshot.
    ready: Mutex<HashMap<String, String>>,
}

impl TemplateSnapshots {
    pub fn open(root: PathBuf) -> Result<TemplateSnapshots, String> {
        Ok(TemplateSnapshots { files: CheckpointFiles::open(root)?, ready: Mutex::new(HashMap::new()) })
    }

    /// The usable snapshot of `template` for a machine of `vcpus` and `memory_mb`, if there is one.
    pub fn lookup(&self, template: &str, vcpus: u32, memory_mb: u32) -> Option<(String, PathBuf)> {
        if (vcpus, memory_mb) != SHAPE {
            return None;
        }
        let id = self.ready.lock().ok()?.get(template).cloned()?;
        self.files.path(&id).ok().map(|dir| (id, dir))
    }

    /// Marks snapshot `id` of `template` usable.
    pub fn set_ready(&self, template: &str, id: &str) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.insert(template.to_string(), id.to_string());
        }
    }

    pub fn ready_count(&self) -> u64 {
        self.ready.lock().map_or(0, |r| r.len() as u64)
    }

    /// A snapshot that failed to resume is not offered again (creates boot).
    pub fn withdraw(&self, template: &str) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.remove(template);
        }
    }

    /// Removes the snapshots of `template` other than `keep` (taken with another VMM, kernel,
    /// initramfs or template content); returns how many.
    pub fn remove_stale(&self, template: &str, keep: &str) -> usize {
        let stale: Vec<String> =
            self.files.ids().into_iter().filter(|id| is_snapshot_of(id, template) && id != keep).collect();
        for id in &stale {
            if let Err(e) = self.files.remove(id) {
                println!("appliance: {e}");
            }
        }
        stale.len()
    }
}

/// Whether snapshot `id` is one of `template`'s (`<template>-<32 hex digits>`): a prefix alone
/// would take template `py`'s for `py-2`'s.
fn is_snapshot_of(id: &str, template: &str) -> bool {
    id.strip_prefix(template)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|key| key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The id of `template`'s snapshot for this VMM, kernel, initramfs and template content:
/// `<template>-<key>`.
pub fn snapshot_id(
    template: &str,
    template_id: &str,
    vmm_bin: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<String, String> {
    let mut hash = Blake2b::new(16).map_err(|e| format!("blake2b: {e:?}"))?;
    let mut update = |bytes: &[u8]| hash.update(bytes).map_err(|e| format!("blake2b: {e:?}"));
    update(format!("template {template} {template_id}\nshape {SHAPE:?}\n").as_bytes())?;
    for path in [vmm_bin, kernel, initrd] {
        let mut file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            update(&buf[..n])?;
        }
    }
    let digest = hash.finalize().map_err(|e| format!("blake2b: {e:?}"))?;
    Ok(format!("{template}-{}", crate::crypto::hex(digest.as_ref())))
}

/// The content id an imported template was written with (`<name>.id` beside its disk).
pub fn template_content_id(disk: &Path) -> Result<String, String> {
    let id_file = disk.with_extension("id");
    fs::read_to_string(&id_file)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", id_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_the_vmm_the_kernel_the_initrd_and_the_template_and_only_the_default_shape_resumes() {
        let dir = std::env::temp_dir().join(format!("appliance-template-snapshots-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let (vmm, kernel, initrd) = (dir.join("vmm"), dir.join("kernel"), dir.join("initrd"));
        fs::write(&vmm, b"vmm v1").expect("vmm");
        fs::write(&kernel, b"kernel v1").expect("kernel");
        fs::write(&initrd, b"initrd v1").expect("initrd");
        let first = snapshot_id("base", "id-1", &vmm, &kernel, &initrd).expect("id");
        assert!(first.starts_with("base-") && first.len() == "base-".len() + 32, "{first}");
        assert_eq!(snapshot_id("base", "id-1", &vmm, &kernel, &initrd).expect("id"), first, "stable");
        assert_ne!(snapshot_id("base", "id-2", &vmm, &kernel, &initrd).expect("id"), first, "template content");
        fs::write(&vmm, b"vmm v2").expect("vmm");
        let second = snapshot_id("base", "id-1", &vmm, &kernel, &initrd).expect("id");
        assert_ne!(second, first, "VMM binary");
        fs::write(&kernel, b"kernel v2").expect("kernel");
        let third = snapshot_id("base", "id-1", &vmm, &kernel, &initrd).expect("id");
        assert_ne!(third, second, "kernel");
        // The initramfs holds the init and agent the snapshot's guest runs.
        fs::write(&initrd, b"initrd v2").expect("initrd");
        assert_ne!(snapshot_id("base", "id-1", &vmm, &kernel, &initrd).expect("id"), third, "initrd");
        assert!(snapshot_id("base", "id-1", &vmm, &kernel, &dir.join("missing")).is_err(), "no initrd, no key");

        let snapshots = TemplateSnapshots::open(dir.join("snapshots")).expect("open");
        for id in [&first, &second] {
            fs::create_dir_all(dir.join("snapshots").join(id)).expect("mkdir");
            fs::write(dir.join("snapshots").join(id).join("disk"), b"d").expect("disk");
        }
        assert!(snapshots.lookup("base", 1, 512).is_none(), "nothing is ready until marked");
        snapshots.set_ready("base", &second);
        assert_eq!(snapshots.lookup("base", 1, 512).map(|(id, _)| id), Some(second.clone()));
        assert!(snapshots.lookup("base", 2, 512).is_none() && snapshots.lookup("base", 1, 1024).is_none());
        fs::create_dir_all(dir.join("snapshots").join("base-2-0123456789abcdef0123456789abcdef")).expect("mkdir");
        fs::write(dir.join("snapshots").join("base-2-0123456789abcdef0123456789abcdef").join("disk"), b"d")
            .expect("disk");
        assert_eq!(snapshots.remove_stale("base", &second), 1, "template base-2's snapshot is not base's");
        assert_eq!(snapshots.remove_stale("base-2", ""), 1);
        assert_eq!(snapshots.files.ids(), vec![second.clone()]);
        snapshots.withdraw("base");
        assert!(snapshots.lookup("base", 1, 512).is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}
