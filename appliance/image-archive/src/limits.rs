//! The running totals checked against the caller's [`Limits`], before anything they count is
//! written.

use crate::{Limits, Refusal};

pub(crate) struct Budget {
    limits: Limits,
    bytes: u64,
    entries: u64,
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Budget {
        Budget { limits, bytes: 0, entries: 0 }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    /// Counts one more entry (an archive entry, or a parent directory made for one).
    pub(crate) fn take_entry(&mut self) -> Result<(), Refusal> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Refusal::TooLarge(format!("the archive has more than {} entries", self.limits.max_entries)));
        }
        Ok(())
    }

    /// Counts a file's declared size, before its content is written.
    pub(crate) fn take_bytes(&mut self, size: u64) -> Result<(), Refusal> {
        let total = self.bytes.saturating_add(size);
        if total > self.limits.max_unpacked_bytes {
            return Err(Refusal::TooLarge(format!(
                "the files in the archive add up to more than {} bytes",
                self.limits.max_unpacked_bytes
            )));
        }
        self.bytes = total;
        Ok(())
    }
}
