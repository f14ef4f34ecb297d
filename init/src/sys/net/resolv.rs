//! Writing the resolver configuration: nameserver lines only, replaced atomically so a reader
//! never sees a half-written file.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Replaces `path` with a comment naming `origin` and one `nameserver` line per server.
pub fn write(path: &Path, servers: &[Ipv4Addr], origin: &str) -> Result<(), String> {
    let mut text = format!("# written by init: {origin}\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    let file_name = path.file_name().ok_or_else(|| format!("{}: not a file path", path.display()))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".init-tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_nameserver_lines_and_replaces_the_old_file() {
        let dir = std::env::temp_dir().join(format!("oc-net-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.1\nsearch old\n").unwrap();
        write(&path, &[Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 4)], "DHCP on eth0").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "# written by init: DHCP on eth0\nnameserver 10.0.2.3\nnameserver 10.0.2.4\n");
        assert!(!dir.join("resolv.conf.init-tmp").exists());
        let err = write(&dir.join("missing-dir/resolv.conf"), &[Ipv4Addr::new(10, 0, 2, 3)], "x").unwrap_err();
        assert!(err.contains("missing-dir"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
