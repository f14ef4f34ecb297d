//! Guest vsock CIDs: 0-2 are reserved (hypervisor, local, host); each live sandbox holds one,
//! which is also its identity for the proxy, so a CID is reused only after its VMM is gone.

use std::collections::BTreeSet;
use std::sync::Mutex;

pub const FIRST_GUEST_CID: u32 = 3;

#[derive(Default)]
pub struct CidPool {
    used: Mutex<BTreeSet<u32>>,
}

impl CidPool {
    /// The lowest free CID.
    pub fn allocate(&self) -> Option<u32> {
        let mut used = self.used.lock().ok()?;
        let cid = (FIRST_GUEST_CID..u32::MAX).find(|c| !used.contains(c))?;
        used.insert(cid);
        Some(cid)
    }

    /// Marks a CID held by an adopted VMM.
    pub fn claim(&self, cid: u32) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(cid);
        }
    }

    pub fn release(&self, cid: u32) {
        if let Ok(mut used) = self.used.lock() {
            used.remove(&cid);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.lock().map_or(0, |u| u.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_reuses_released() {
        let pool = CidPool::default();
        pool.claim(4);
        assert_eq!(pool.allocate(), Some(3));
        assert_eq!(pool.allocate(), Some(5));
        pool.release(3);
        assert_eq!(pool.allocate(), Some(3));
        assert_eq!(pool.in_use(), 3);
    }
}
