//! The disk image's manifest: what went in (kernel versions, template packages), how the disk
//! is laid out and how big each piece is, so an image can be inspected without booting it.

use crate::pipeline::BuildInputs;
use crate::progress::fmt_size;
use boot_disk::gpt::Gpt;
use std::fmt::Write;
use std::path::Path;

pub struct Manifest<'a> {
    pub image: &'a Path,
    pub sha256: &'a str,
    pub size: u64,
    pub cmdline: &'a str,
    pub inputs: &'a BuildInputs,
    pub table: &'a Gpt,
    /// (what, bytes)
    pub files: &'a [(&'a str, u64)],
}

/// The manifest text. Lines up to the "packages" section are the summary printed at build time.
pub fn render(m: &Manifest) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "OpenComputer disk image, variant {}", m.inputs.variant.name());
    let _ = writeln!(out, "image: {} ({} bytes, {})", m.image.display(), m.size, fmt_size(m.size));
    let _ = writeln!(out, "sha256: {}", m.sha256);
    let _ = writeln!(out, "appliance kernel: {}", m.inputs.appliance_kernel);
    let _ = writeln!(out, "guest kernel: {}", m.inputs.guest_kernel);
    let _ = writeln!(out, "kernel command line: {}", m.cmdline);
    let _ = writeln!(out, "disk GUID: {}", m.table.disk_guid);
    let _ = writeln!(out, "partitions:");
    for (slot, p) in m.table.partitions() {
        let _ = writeln!(
            out,
            "  {} {:<12} start {:>6} MiB  size {:>10}  type {}  guid {}",
            slot + 1,
            p.name,
            p.offset_bytes() >> 20,
            fmt_size(p.size_bytes()),
            p.type_guid,
            p.guid
        );
    }
    let _ = writeln!(
        out,
        "  (no data partition: the appliance creates it in the free space at the end of the disk on first boot)"
    );
    let _ = writeln!(out, "files:");
    for (what, bytes) in m.files {
        let _ = writeln!(out, "  {what:<30} {bytes:>12} bytes ({})", fmt_size(*bytes));
    }
    for t in &m.inputs.templates {
        let _ = writeln!(out, "template {}: id {}, {} packages", t.name, t.id, t.packages.len());
    }
    for t in &m.inputs.templates {
        let _ = writeln!(out, "\npackages of template {}:", t.name);
        for (package, version) in &t.packages {
            let _ = writeln!(out, "  {package} {version}");
        }
    }
    out
}

/// The manifest up to its package lists, for the build's output.
pub fn summary(text: &str) -> String {
    text.split("\npackages of").next().unwrap_or(text).lines().map(|l| format!("[image]   {l}\n")).collect()
}
