//! Loads the kernel modules the image pipeline selected. The pipeline resolved dependencies from
//! `modules.dep` and wrote the files in load order (dependencies first) to LOAD_ORDER.

use crate::sys::kmod::{self, Loaded};

pub const LOAD_ORDER: &str = "/lib/modules/load-order";

pub fn load_all() {
    let list = match std::fs::read_to_string(LOAD_ORDER) {
        Ok(list) => list,
        Err(e) => {
            crate::log!("no module list ({LOAD_ORDER}: {e}); relying on built-in drivers");
            return;
        }
    };
    let (mut fresh, mut present, mut failed) = (0, 0, Vec::new());
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match kmod::load(path) {
            Ok(Loaded::Fresh) => fresh += 1,
            Ok(Loaded::AlreadyThere) => present += 1,
            // ENODEV is normal: kvm_intel on AMD, a NIC driver without its hardware...
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => failed.push(format!("{}: {e}", module_name(path))),
        }
    }
    crate::log!("modules: {fresh} loaded, {present} already present, {} failed", failed.len());
    for failure in failed {
        crate::log!("module {failure}");
    }
}

fn module_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path).trim_end_matches(".ko")
}
