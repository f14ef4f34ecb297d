//! The one fact of ext4 the boot disk's readers need: its volume label, read from the
//! superblock (the system partitions carry `oc-system`; init finds and the appliance checks
//! them by it).

/// The label of every system partition's ext4 filesystem (both slots carry it).
pub const SYSTEM_LABEL: &str = "oc-system";
/// ext4 superblock: starts at byte 1024; magic 0xEF53 at +56, volume label (16 bytes) at +120.
const SUPERBLOCK: usize = 1024;
const MAGIC_OFFSET: usize = SUPERBLOCK + 56;
const LABEL_OFFSET: usize = SUPERBLOCK + 120;
const LABEL_LEN: usize = 16;
/// How many bytes of a device [`label`] needs.
pub const HEAD_LEN: usize = LABEL_OFFSET + LABEL_LEN;

/// The ext4 label in a device's first bytes, if it holds an ext2/3/4 filesystem.
pub fn label(head: &[u8]) -> Option<String> {
    if head.len() < HEAD_LEN || head[MAGIC_OFFSET] != 0x53 || head[MAGIC_OFFSET + 1] != 0xEF {
        return None;
    }
    let raw = &head[LABEL_OFFSET..LABEL_OFFSET + LABEL_LEN];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(label: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 2048];
        head[MAGIC_OFFSET] = 0x53;
        head[MAGIC_OFFSET + 1] = 0xEF;
        head[LABEL_OFFSET..LABEL_OFFSET + label.len()].copy_from_slice(label);
        head
    }

    #[test]
    fn reads_the_label_of_an_ext4_superblock() {
        assert_eq!(label(&superblock(b"oc-system")).as_deref(), Some("oc-system"));
        assert_eq!(label(&superblock(b"sixteen-chars-xx")).as_deref(), Some("sixteen-chars-xx"));
    }

    #[test]
    fn rejects_non_ext4_and_short_input() {
        let mut head = superblock(b"oc-system");
        head[MAGIC_OFFSET] = 0;
        assert_eq!(label(&head), None);
        assert_eq!(label(&[0u8; 100]), None);
    }
}
