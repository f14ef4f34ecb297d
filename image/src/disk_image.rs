//! The bootable disk image: a GPT disk with an EFI system partition holding systemd-boot (at the
//! removable-media path, so no NVRAM boot entry is needed), the unified kernel image as the boot
//! entry of slot A (`EFI/Linux/`, init/boot-disk/src/entry.rs) and the documented operator
//! configuration file; system partition A carrying the `oc-system` ext4 with the templates, and
//! an empty system partition B of the same size that an upgrade is staged into. No data partition:
//! PID 1 creates it in the free space at the end of the disk on first boot, so the same image fits
//! any disk size. Same inputs give the same bytes. `build_disk` runs the pipeline for the
//! artifacts first, then builds the image from them.

use crate::err;
use crate::error::{Context, Result};
use crate::esp;
use crate::manifest;
use crate::pipeline::{self, Artifacts, Variant};
use crate::progress::{fmt_size, Outcome, Step};
use crate::uki;
use crate::workspace;
use boot_disk::entry::{Entry, Slot};
use boot_disk::gpt::{self, Gpt, Guid, Partition, ALIGN, SECTOR};
use boot_disk::layout;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// The ESP holds two unified kernel images (A/B) plus slack; never below this.
const ESP_MIN: u64 = 64 * MIB;
/// A system partition is the system ext4 plus a quarter (`slot_size`), rounded up to this: room
/// for later versions' templates, because an installed appliance's partitions never move and an
/// upgrade's system ext4 must fit the slot its first image made. Measured (Debian 12, 2026-12-04):
/// with base alone, stored uncompressed, the system ext4 was 388.5 MiB (271 MiB allocated), slots
/// 512 MiB; base, python and node uncompressed would need 1379.8 MiB, slots 1728 MiB, which no
/// appliance installed with 512 MiB slots could take as an upgrade. Stored zstd-compressed
/// (system_disk.rs, level 9: 73.7, 82.3 and 114.1 MiB) they make a system ext4 of 367.8 MiB
/// (278.6 MiB allocated), 144 MiB inside `FIRST_SLOT_SIZE`, and slots of 512 MiB again: the
/// same partition layout as the first images. The raw image is 1100 MiB (291 MiB allocated).
const SYSTEM_ROUND: u64 = 64 * MIB;
/// The system slots of the first disk images (base alone, stored uncompressed). An installed
/// appliance's partitions never move, so as long as such appliances are in service every
/// image's system ext4 must fit this for them to take it as an upgrade
/// (appliance/src/upgrade/install.rs); the build warns when it does not (`first_slots_warning`).
pub const FIRST_SLOT_SIZE: u64 = 512 * MIB;
/// The operator configuration file's name on the ESP.
pub const CONFIG_FILE: &str = layout::CONFIG_FILE;
/// Its content as shipped: every setting documented and commented out.
pub const CONFIG_TEMPLATE: &str = include_str!("../opencomputer.conf");
/// systemd-boot from Debian's systemd-boot-efi (252 in bookworm: boot counting, Type #2 entries).
pub const BOOTLOADER: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// No menu: boot the first entry in systemd-boot's order at once (the menu still opens with a
/// key held down); no automatic firmware or Windows entries.
pub const LOADER_CONF: &str = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n";
/// The entry of the image as built: generation 1, slot A, committed.
pub fn initial_entry() -> Entry {
    Entry::new(1, Slot::A, None)
}

pub struct DiskImage {
    pub path: PathBuf,
    pub manifest: PathBuf,
    /// The signature statement (`<image>.sig`) an upload sends along.
    pub signature: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// What distinguishes one build of the disk image from another of the same sources.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub version: String,
    /// Appended to the unified kernel image's command line (the tests build a broken image so).
    pub extra_cmdline: String,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions { version: pipeline::image_version(), extra_cmdline: String::new() }
    }
}

/// The artifacts plus the bootable disk image made from them.
pub fn build_disk(variant: Variant) -> Result<(Artifacts, DiskImage)> {
    build_disk_with(variant, &DiskOptions::default())
}

pub fn build_disk_with(variant: Variant, options: &DiskOptions) -> Result<(Artifacts, DiskImage)> {
    let artifacts = pipeline::build_versioned(variant, &options.version)?;
    let disk = build(&artifacts, options)?;
    Ok((artifacts, disk))
}

/// Builds target/image/<variant>/opencomputer.img from the pipeline's artifacts.
pub fn build(artifacts: &Artifacts, options: &DiskOptions) -> Result<DiskImage> {
    let out_dir = workspace::target_dir().join("image").join(artifacts.inputs.variant.name());
    std::fs::create_dir_all(&out_dir).ctx(|| format!("create {}", out_dir.display()))?;

    let step = Step::start("unified kernel image");
    let cmdline = out_dir.join("uki.cmdline");
    let mut cmdline_text =
        format!("{} {} {}", artifacts.cmdline, pipeline::DISK_BOOT_ARG, initial_entry().slot.cmdline_arg());
    if !options.extra_cmdline.is_empty() {
        cmdline_text = format!("{cmdline_text} {}", options.extra_cmdline);
    }
    std::fs::write(&cmdline, &cmdline_text).ctx(|| "write the command line".into())?;
    let osrel = out_dir.join("uki.osrel");
    std::fs::write(&osrel, uki::os_release(&artifacts.version)).ctx(|| "write os-release".into())?;
    let uki_path = out_dir.join(initial_entry().file_name());
    uki::build(
        &[
            uki::Section { name: ".osrel", file: &osrel },
            uki::Section { name: ".cmdline", file: &cmdline },
            uki::Section { name: ".linux", file: &artifacts.kernel },
            uki::Section { name: ".initrd", file: &artifacts.initramfs },
        ],
        &uki_path,
    )?;
    let uki_size = size_of(&uki_path)?;
    step.finish(Outcome::Built, &format!("{} at {}", fmt_size(uki_size), uki_path.display()));

    let step = Step::start("EFI system partition");
    let conf = out_dir.join(layout::CONFIG_FILE);
    std::fs::write(&conf, CONFIG_TEMPLATE).ctx(|| format!("write {}", conf.display()))?;
    let loader_conf = out_dir.join("loader.conf");
    std::fs::write(&loader_conf, LOADER_CONF).ctx(|| format!("write {}", loader_conf.display()))?;
    crate::host::ensure(&[crate::host::tool(BOOTLOADER, uki::STUB_PACKAGE)])?;
    // Room for two unified kernel images (the running one and a staged upgrade) plus one
    // being written, and slack.
    let esp_size = round_up(3 * uki_size + 16 * MIB, MIB).max(ESP_MIN);
    let esp_path = out_dir.join("esp.fat");
    let entry_path = initial_entry().path();
    esp::build(
        &esp_path,
        esp_size,
        &[
            (layout::BOOTLOADER_PATH, Path::new(BOOTLOADER)),
            (layout::LOADER_CONF, &loader_conf),
            (&entry_path, &uki_path),
            (layout::CONFIG_FILE, &conf),
        ],
    )?;
    step.finish(Outcome::Built, &format!("FAT32 {}", fmt_size(esp_size)));

    let step = Step::start("disk image");
    let system_size = size_of(&artifacts.system_disk)?;
    let slot_size = slot_size(system_size);
    if let Some(warning) = first_slots_warning(system_size) {
        eprintln!("[image] WARNING: {warning}");
    }
    let identity = identity_hash(&uki_path, &artifacts.system_disk)?;
    let table = plan(&identity, esp_size, slot_size)?;
    let disk_sectors = table.end_of_partitions() + gpt::ALIGN;
    let image = out_dir.join("opencomputer.img");
    let _ = std::fs::remove_file(&image);
    let mut file = File::create(&image).ctx(|| format!("create {}", image.display()))?;
    file.set_len(disk_sectors * SECTOR).ctx(|| format!("size {}", image.display()))?;
    table.write_to(&mut file, disk_sectors).map_err(|e| err!("{}: {e}", image.display()))?;
    let part = |name: &str| table.find(name).map(|(_, p)| p.clone()).ok_or_else(|| err!("no {name} partition planned"));
    copy_sparse(&esp_path, &mut file, part(layout::ESP_NAME)?.offset_bytes())?;
    copy_sparse(&artifacts.system_disk, &mut file, part(layout::SYSTEM_A_NAME)?.offset_bytes())?;
    file.sync_all().ctx(|| format!("sync {}", image.display()))?;
    drop(file);
    let sha256 = sha256_file(&image)?;
    let size = disk_sectors * SECTOR;
    let manifest_path = out_dir.join("opencomputer.manifest");
    let uki_label = format!("UKI {entry_path}");
    let files = [
        (uki_label.as_str(), uki_size),
        ("  .linux (appliance kernel)", size_of(&artifacts.kernel)?),
        ("  .initrd (initramfs, zstd)", size_of(&artifacts.initramfs)?),
        ("system ext4 (partition A)", system_size),
    ];
    let text = manifest::render(&manifest::Manifest {
        image: &image,
        sha256: &sha256,
        size,
        cmdline: &cmdline_text,
        inputs: &artifacts.inputs,
        table: &table,
        files: &files,
    });
    std::fs::write(&manifest_path, &text).ctx(|| format!("write {}", manifest_path.display()))?;
    step.finish(Outcome::Built, &format!("{} at {}", fmt_size(size), image.display()));
    eprint!("{}", manifest::summary(&text));
    eprintln!("[image] sha256 {sha256}  {}", image.display());
    eprintln!("[image] manifest: {}", manifest_path.display());
    let key = crate::signing::SigningKey::load()?;
    let signature = key.sign_image(&image, &sha256, &manifest_path, &artifacts.version)?;
    eprintln!("[image] signed with key {} ({}): {}", key.public_hex(), key.source.display(), signature.display());
    let _ = std::fs::remove_file(&esp_path);
    Ok(DiskImage { path: image, manifest: manifest_path, signature, size, sha256 })
}

/// The partition table for the given sizes; GUIDs come from `identity` (a hash of the inputs).
pub fn plan(identity: &[u8], esp_size: u64, slot_size: u64) -> Result<Gpt> {
    let guid = |what: &str| {
        let digest = Sha256::new().chain_update(identity).chain_update(what.as_bytes()).finalize();
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&digest[..16]);
        Guid::from_random(raw)
    };
    let mut table = Gpt::new(guid("disk"));
    let mut next = ALIGN;
    for (name, type_guid, size) in [
        (layout::ESP_NAME, gpt::ESP_TYPE, esp_size),
        (layout::SYSTEM_A_NAME, gpt::LINUX_FS_TYPE, slot_size),
        (layout::SYSTEM_B_NAME, gpt::LINUX_FS_TYPE, slot_size),
    ] {
        let sectors = round_up(size, MIB) / SECTOR;
        table
            .add(Partition {
                type_guid,
                guid: guid(name),
                first_lba: next,
                last_lba: next + sectors - 1,
                attributes: 0,
                name: name.into(),
            })
            .map_err(|e| err!("{e}"))?;
        next += sectors;
    }
    Ok(table)
}

fn identity_hash(uki: &Path, system_disk: &Path) -> Result<Vec<u8>> {
    // The system disk's cache directory is named after the hash of what it was built from.
    let mut hasher = Sha256::new();
    hasher.update(sha256_file(uki)?.as_bytes());
    hasher.update(system_disk.to_string_lossy().as_bytes().rsplit(|&b| b == b'/').nth(1).unwrap_or_default());
    Ok(hasher.finalize().to_vec())
}

/// Copies `source` into `out` at `offset`, skipping all-zero blocks so the image stays sparse.
fn copy_sparse(source: &Path, out: &mut File, offset: u64) -> Result<()> {
    let mut input = File::open(source).ctx(|| format!("open {}", source.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let n = read_full(&mut input, &mut buf).ctx(|| format!("read {}", source.display()))?;
        if n == 0 {
            return Ok(());
        }
        for chunk in buf[..n].chunks(64 << 10) {
            if chunk.iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(at)).ctx(|| "seek in the disk image".into())?;
                out.write_all(chunk).ctx(|| "write the disk image".into())?;
            }
            at += chunk.len() as u64;
        }
    }
}

fn read_full(input: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ctx(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::cache::hex(&hasher.finalize()))
}

fn size_of(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?.len())
}

/// Why appliances installed from the first images cannot take this one as an upgrade, if they
/// cannot: its system ext4 is larger than their system slots (`FIRST_SLOT_SIZE`).
pub fn first_slots_warning(system_size: u64) -> Option<String> {
    (system_size > FIRST_SLOT_SIZE).then(|| {
        format!(
            "the system ext4 ({}) is larger than the system slots of the first disk images ({}): \
             appliances installed from those refuse this image as an upgrade",
            fmt_size(system_size),
            fmt_size(FIRST_SLOT_SIZE)
        )
    })
}

/// The size of each system partition (A and B) for a system ext4 of `system_size` bytes.
pub fn slot_size(system_size: u64) -> u64 {
    round_up(system_size + system_size / 4, SYSTEM_ROUND)
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// The byte offset of the ESP inside an image built here, in mtools' `@@offset` form.
pub fn esp_offset_spec(image: &Path) -> Result<String> {
    let (offset, _) = partition_extent(image, layout::ESP_NAME)?;
    Ok(format!("@@{offset}"))
}

/// Where the partition named `name` lies in a disk image: (byte offset, size in bytes).
pub fn partition_extent(image: &Path, name: &str) -> Result<(u64, u64)> {
    let mut file = File::open(image).ctx(|| format!("open {}", image.display()))?;
    let sectors = file.metadata().ctx(|| format!("stat {}", image.display()))?.len() / SECTOR;
    let (table, _) = Gpt::read_from(&mut file, sectors).map_err(|e| err!("{}: {e}", image.display()))?;
    let (_, partition) = table.find(name).ok_or_else(|| err!("{} has no {name} partition", image.display()))?;
    Ok((partition.offset_bytes(), partition.size_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_aligned_deterministic_and_leaves_b_the_size_of_a() {
        let a = plan(b"inputs", 100 * MIB, 512 * MIB).expect("plan");
        assert_eq!(a, plan(b"inputs", 100 * MIB, 512 * MIB).expect("plan"));
        assert_ne!(a.disk_guid, plan(b"other", 100 * MIB, 512 * MIB).expect("plan").disk_guid);
        let parts: Vec<&Partition> = a.partitions().map(|(_, p)| p).collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.first_lba % ALIGN == 0 && (p.last_lba + 1) % ALIGN == 0));
        assert_eq!(parts[1].sectors(), parts[2].sectors());
        assert_eq!(parts[0].type_guid, gpt::ESP_TYPE);
        a.validate(a.end_of_partitions() + ALIGN).expect("fits with 1 MiB for the backup table");
    }

    #[test]
    fn system_slots_leave_a_quarter_for_later_versions() {
        // The measured system ext4 sizes of SYSTEM_ROUND's comment: base alone, base, python
        // and node uncompressed, and the three compressed.
        assert_eq!(slot_size(407_422_976), 512 * MIB);
        assert_eq!(slot_size(1_446_785_024), 1728 * MIB);
        assert_eq!(slot_size(385_673_216), 512 * MIB);
        assert_eq!(slot_size(SYSTEM_ROUND), 128 * MIB);
    }

    #[test]
    fn the_build_warns_when_the_first_images_slots_cannot_take_the_system_ext4() {
        assert_eq!(first_slots_warning(385_673_216), None, "the three templates, compressed");
        assert_eq!(first_slots_warning(FIRST_SLOT_SIZE), None);
        let warning = first_slots_warning(1_446_785_024).expect("uncompressed, they did not fit");
        assert!(warning.contains("(1379.8 MiB)") && warning.contains("(512.0 MiB)"), "{warning}");
        assert!(warning.contains("refuse this image as an upgrade"), "{warning}");
    }
}
