//! A read-only FAT32 reader: enough to list directories and read files (long names included) on
//! an EFI system partition inside a disk image or on a block device, without mounting it.
//! Everything read from the disk is bounds-checked; a damaged filesystem gives an error.

use std::io::{Read, Seek, SeekFrom};

const DIR_ENTRY: usize = 32;
const ATTR_LONG_NAME: u8 = 0x0F;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const END_OF_CHAIN: u32 = 0x0FFF_FFF8;
/// A FAT directory holds at most 65536 entries of 32 bytes; a longer chain is damage or a loop
/// (the cluster count in the boot sector is not checked against the disk, so it cannot bound a
/// directory's size).
const MAX_DIR_BYTES: u64 = 65536 * DIR_ENTRY as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u32,
    first_cluster: u32,
}

pub struct Fat<R> {
    disk: R,
    /// Byte offset of the filesystem on `disk`.
    base: u64,
    cluster_bytes: u64,
    fat_offset: u64,
    data_offset: u64,
    root_cluster: u32,
    clusters: u32,
}

impl<R: Read + Seek> Fat<R> {
    /// Opens the FAT32 filesystem that starts at byte `base` of `disk`.
    pub fn open(mut disk: R, base: u64) -> Result<Fat<R>, String> {
        let mut bpb = [0u8; 512];
        read_at(&mut disk, base, &mut bpb)?;
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([bpb[o], bpb[o + 1]]));
        let u32_at = |o: usize| u32::from_le_bytes([bpb[o], bpb[o + 1], bpb[o + 2], bpb[o + 3]]);
        if bpb[510..512] != [0x55, 0xAA] {
            return Err("no FAT boot sector (signature 55 AA missing)".into());
        }
        let bytes_per_sector = u16_at(11);
        let sectors_per_cluster = u64::from(bpb[13]);
        let reserved = u16_at(14);
        let fats = u64::from(bpb[16]);
        let root_entries = u16_at(17);
        let fat_size16 = u16_at(22);
        let fat_size32 = u64::from(u32_at(36));
        let total = if u16_at(19) != 0 { u16_at(19) } else { u64::from(u32_at(32)) };
        if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
            || !sectors_per_cluster.is_power_of_two()
            || fats == 0
            || reserved == 0
        {
            return Err("not a FAT filesystem (implausible boot sector)".into());
        }
        if fat_size16 != 0 || root_entries != 0 || fat_size32 == 0 {
            return Err("a FAT12/16 filesystem; only FAT32 is supported".into());
        }
        let data_sector = reserved + fats * fat_size32;
        let clusters = total.checked_sub(data_sector).ok_or("FAT larger than the filesystem")? / sectors_per_cluster;
        Ok(Fat {
            disk,
            base,
            cluster_bytes: bytes_per_sector * sectors_per_cluster,
            fat_offset: reserved * bytes_per_sector,
            data_offset: data_sector * bytes_per_sector,
            root_cluster: u32_at(44),
            clusters: u32::try_from(clusters).map_err(|_| "too many clusters for FAT32")?,
        })
    }

    /// The entries of the directory at `path` ("" or "/" is the root), without `.` and `..`.
    pub fn list(&mut self, path: &str) -> Result<Vec<DirEntry>, String> {
        let cluster = self.find_dir(path)?;
        self.read_dir(cluster)
    }

    /// The content of the file at `path`, refused if larger than `limit` bytes.
    pub fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, String> {
        let entry = self.lookup(path)?.ok_or_else(|| format!("{path}: no such file"))?;
        if entry.is_dir {
            return Err(format!("{path} is a directory"));
        }
        if u64::from(entry.size) > limit {
            return Err(format!("{path} is {} bytes, more than the {limit} allowed", entry.size));
        }
        let mut data = self.read_chain(entry.first_cluster, Some(u64::from(entry.size)))?;
        data.truncate(entry.size as usize);
        if data.len() != entry.size as usize {
            return Err(format!("{path}: cluster chain shorter than the file size"));
        }
        Ok(data)
    }

    /// The entry at `path`, or None if some component does not exist.
    pub fn lookup(&mut self, path: &str) -> Result<Option<DirEntry>, String> {
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some(last) = parts.pop() else { return Err("empty path".into()) };
        let Ok(dir) = self.find_dir(&parts.join("/")) else { return Ok(None) };
        Ok(self.read_dir(dir)?.into_iter().find(|e| e.name.eq_ignore_ascii_case(last)))
    }

    fn find_dir(&mut self, path: &str) -> Result<u32, String> {
        let mut cluster = self.root_cluster;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let entry = self.read_dir(cluster)?.into_iter().find(|e| e.name.eq_ignore_ascii_case(part));
            match entry {
                Some(e) if e.is_dir => cluster = if e.first_cluster == 0 { self.root_cluster } else { e.first_cluster },
                Some(_) => return Err(format!("{part} in {path} is not a directory")),
                None => return Err(format!("{path}: no such directory")),
            }
        }
        Ok(cluster)
    }

    fn read_dir(&mut self, cluster: u32) -> Result<Vec<DirEntry>, String> {
        let raw = self.read_chain(cluster, None)?;
        Ok(parse_dir(&raw))
    }

    /// Follows the cluster chain from `first`: a file's, reading up to `file_size` bytes, or
    /// (None) a directory's, to the end of the chain and at most `MAX_DIR_BYTES`.
    fn read_chain(&mut self, first: u32, file_size: Option<u64>) -> Result<Vec<u8>, String> {
        let want = file_size.unwrap_or(MAX_DIR_BYTES);
        let mut out = Vec::new();
        let mut cluster = first;
        let mut steps = 0u32;
        loop {
            if out.len() as u64 >= want {
                if file_size.is_none() {
                    return Err(format!("directory at cluster {first:#x} is larger than {MAX_DIR_BYTES} bytes"));
                }
                break;
            }
            if cluster < 2 || cluster - 2 >= self.clusters {
                if file_size.is_none() && cluster >= END_OF_CHAIN {
                    break;
                }
                return Err(format!("cluster chain points at invalid cluster {cluster:#x}"));
            }
            steps += 1;
            if steps > self.clusters {
                return Err("cluster chain loops".into());
            }
            let mut buf = vec![0u8; self.cluster_bytes as usize];
            let at = self.base + self.data_offset + u64::from(cluster - 2) * self.cluster_bytes;
            read_at(&mut self.disk, at, &mut buf)?;
            out.extend_from_slice(&buf);
            let next = self.next_cluster(cluster)?;
            if next >= END_OF_CHAIN {
                break;
            }
            cluster = next;
        }
        Ok(out)
    }

    fn next_cluster(&mut self, cluster: u32) -> Result<u32, String> {
        let mut raw = [0u8; 4];
        let at = self.base + self.fat_offset + u64::from(cluster) * 4;
        read_at(&mut self.disk, at, &mut raw)?;
        Ok(u32::from_le_bytes(raw) & 0x0FFF_FFFF)
    }
}

/// Directory entries from raw directory bytes: long names assembled, deleted entries skipped.
fn parse_dir(raw: &[u8]) -> Vec<DirEntry> {
    let mut entries = Vec::new();
    let mut long: Vec<(u8, Vec<u16>)> = Vec::new();
    for e in raw.chunks_exact(DIR_ENTRY) {
        match e[0] {
            0x00 => break,
            0xE5 => {
                long.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr == ATTR_LONG_NAME {
            let mut units = Vec::with_capacity(13);
            for range in [1..11, 14..26, 28..32] {
                units.extend(e[range].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
            }
            long.push((e[0] & 0x1F, units));
            continue;
        }
        if attr & ATTR_VOLUME_ID != 0 {
            long.clear();
            continue;
        }
        let name = if long.is_empty() { short_name(e) } else { long_name(&mut long) };
        long.clear();
        if name == "." || name == ".." {
            continue;
        }
        let cluster =
            u32::from(u16::from_le_bytes([e[20], e[21]])) << 16 | u32::from(u16::from_le_bytes([e[26], e[27]]));
        let size = u32::from_le_bytes([e[28], e[29], e[30], e[31]]);
        entries.push(DirEntry { name, is_dir: attr & ATTR_DIRECTORY != 0, size, first_cluster: cluster });
    }
    entries
}

fn long_name(parts: &mut [(u8, Vec<u16>)]) -> String {
    parts.sort_by_key(|(seq, _)| *seq);
    let units: Vec<u16> =
        parts.iter().flat_map(|(_, u)| u.iter().copied()).take_while(|&u| u != 0 && u != 0xFFFF).collect();
    String::from_utf16_lossy(&units)
}

fn short_name(e: &[u8]) -> String {
    // NT reserved byte: 0x08 base name in lower case, 0x10 extension in lower case.
    let case = |bytes: &[u8], lower: bool| {
        let text = String::from_utf8_lossy(bytes).trim_end().to_string();
        if lower {
            text.to_ascii_lowercase()
        } else {
            text
        }
    };
    let base = case(&e[0..8], e[12] & 0x08 != 0);
    let ext = case(&e[8..11], e[12] & 0x10 != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn read_at<R: Read + Seek>(disk: &mut R, at: u64, buf: &mut [u8]) -> Result<(), String> {
    disk.seek(SeekFrom::Start(at)).map_err(|e| format!("seek to byte {at}: {e}"))?;
    disk.read_exact(buf).map_err(|e| format!("read {} bytes at byte {at}: {e}", buf.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::process::Command;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    /// A FAT32 image built by dosfstools/mtools (what the image pipeline uses), at an offset.
    #[test]
    fn reads_files_and_long_names_from_an_mtools_image() {
        if !have("mkfs.fat") || !have("mcopy") {
            eprintln!("dosfstools/mtools not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("init-fat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fs = dir.join("esp.fat");
        let ok = Command::new("mkfs.fat")
            .args(["-C", "-F", "32", "-n", "TEST"])
            .arg(&fs)
            .arg("40960")
            .output()
            .expect("mkfs");
        assert!(ok.status.success(), "{ok:?}");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("big"), &big).expect("write");
        std::fs::write(dir.join("small"), b"hello").expect("write");
        let img = fs.display().to_string();
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).env("MTOOLS_SKIP_CHECK", "1").output().expect("mtools");
            assert!(out.status.success(), "{args:?}: {out:?}");
        };
        run(&["mmd", "-i", &img, "::/EFI", "::/EFI/Linux"]);
        run(&["mcopy", "-i", &img, &dir.join("big").display().to_string(), "::/EFI/Linux/opencomputer-12-b+3.efi"]);
        run(&["mcopy", "-i", &img, &dir.join("small").display().to_string(), "::/CONF.TXT"]);
        run(&["mcopy", "-i", &img, &dir.join("small").display().to_string(), "::/EFI/Linux/gone.efi"]);
        run(&["mdel", "-i", &img, "::/EFI/Linux/gone.efi"]);
        // Put the filesystem 1 MiB into a "disk", like a partition.
        let mut disk = vec![0u8; 1 << 20];
        disk.extend(std::fs::read(&fs).expect("read"));
        let mut fat = Fat::open(Cursor::new(disk), 1 << 20).expect("opens");
        let names: Vec<String> = fat.list("EFI/Linux").expect("list").into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["opencomputer-12-b+3.efi".to_string()]);
        assert_eq!(fat.read_file("/efi/linux/OPENCOMPUTER-12-B+3.EFI", 1 << 20).expect("read"), big);
        assert_eq!(fat.read_file("CONF.TXT", 10).expect("read"), b"hello");
        assert!(fat.read_file("CONF.TXT", 4).unwrap_err().contains("more than"));
        assert!(fat.read_file("EFI/none.efi", 10).unwrap_err().contains("no such file"));
        assert!(fat.list("").expect("root").iter().any(|e| e.name == "EFI" && e.is_dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A FAT32 image of 512-byte sectors and clusters, one FAT of one sector, the root directory
    /// in cluster 2 holding `root`; `fat` gives the FAT's first entries, `total` the sector count
    /// the boot sector claims.
    fn tiny_fat32(fat: &[u32], root: &[u8], total: u32) -> Vec<u8> {
        let mut img = vec![0u8; 4 * 512];
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 1;
        img[14..16].copy_from_slice(&1u16.to_le_bytes());
        img[16] = 1;
        img[32..36].copy_from_slice(&total.to_le_bytes());
        img[36..40].copy_from_slice(&1u32.to_le_bytes());
        img[44..48].copy_from_slice(&2u32.to_le_bytes());
        img[510..512].copy_from_slice(&[0x55, 0xAA]);
        for (i, v) in fat.iter().enumerate() {
            img[512 + 4 * i..516 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        img[1024..1024 + root.len()].copy_from_slice(root);
        img
    }

    /// Found while writing the `fat` fuzz target (which runs out of memory on the image built
    /// here, laid out like its seed): a boot sector claiming 2^32 sectors and a root
    /// directory whose chain points back at itself. Reading the directory appended the same
    /// cluster about 4 billion times (until memory ran out), because only the claimed cluster
    /// count bounded the walk.
    #[test]
    fn a_directory_chain_that_loops_is_refused_at_the_directory_size_limit() {
        let mut entry = [b' '; 32];
        entry[11] = 0x20;
        entry[12..32].fill(0);
        let img = tiny_fat32(&[0x0FFF_FFF8, 0x0FFF_FFFF, 2], &entry, u32::MAX);
        let mut fat = Fat::open(Cursor::new(img), 0).expect("opens");
        let error = fat.list("").unwrap_err();
        assert!(error.contains("larger than"), "{error}");
        assert!(fat.read_file("x", 10).is_err());
        // The same directory with its chain ended lists.
        let img = tiny_fat32(&[0x0FFF_FFF8, 0x0FFF_FFFF, 0x0FFF_FFFF], &entry, u32::MAX);
        assert_eq!(Fat::open(Cursor::new(img), 0).expect("opens").list("").expect("lists").len(), 1);
    }

    #[test]
    fn refuses_what_is_not_fat32() {
        assert!(Fat::open(Cursor::new(vec![0u8; 4096]), 0).is_err());
        assert!(Fat::open(Cursor::new(vec![0u8; 100]), 0).is_err());
    }

    #[test]
    fn short_names_honour_the_lower_case_flags() {
        let mut e = [b' '; 32];
        e[0..6].copy_from_slice(b"BOOTX6");
        e[8..11].copy_from_slice(b"EFI");
        e[11] = 0x20;
        e[12] = 0x18;
        e[28..32].copy_from_slice(&5u32.to_le_bytes());
        e[20..22].fill(0);
        e[26..28].copy_from_slice(&3u16.to_le_bytes());
        let mut raw = e.to_vec();
        raw.extend([0u8; 32]);
        let entries = parse_dir(&raw);
        assert_eq!(entries, vec![DirEntry { name: "bootx6.efi".into(), is_dir: false, size: 5, first_cluster: 3 }]);
    }
}
