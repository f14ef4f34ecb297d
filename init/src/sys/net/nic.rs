//! Finding the NIC to configure in sysfs. Drivers probe asynchronously, so callers may wait.

use std::path::Path;
use std::time::{Duration, Instant};

pub const SYS_CLASS_NET: &str = "/sys/class/net";
const POLL: Duration = Duration::from_millis(100);
/// ARPHRD_ETHER as /sys/class/net/<if>/type shows it; DHCP here speaks Ethernet only.
const TYPE_ETHERNET: &str = "1";

/// The physical Ethernet interfaces under `class_net`, sorted by name. Having a `device` link
/// is what separates hardware (and virtio) NICs from lo, tunnels, bridges, bonds, veth, dummy.
pub fn ethernet_nics(class_net: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(class_net) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(std::result::Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .filter(|name| std::fs::symlink_metadata(class_net.join(name).join("device")).is_ok())
        .filter(|name| {
            std::fs::read_to_string(class_net.join(name).join("type")).is_ok_and(|t| t.trim() == TYPE_ETHERNET)
        })
        .collect();
    names.sort();
    names
}

/// The first NIC by name, polling until `wait` has passed.
pub fn first_nic_in(class_net: &Path, wait: Duration) -> Option<String> {
    poll(wait, || ethernet_nics(class_net).into_iter().next())
}

/// True once an interface called `name` exists, polling until `wait` has passed.
pub fn wait_for_in(class_net: &Path, name: &str, wait: Duration) -> bool {
    poll(wait, || class_net.join(name).exists().then_some(())).is_some()
}

fn poll<T>(wait: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + wait;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        let now = Instant::now();
        if now >= until {
            return None;
        }
        std::thread::sleep(POLL.min(until - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(tag: &str) -> FakeSysfs {
            let dir = std::env::temp_dir().join(format!("oc-net-sysfs-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeSysfs(dir)
        }

        fn add(&self, name: &str, link_type: &str, with_device: bool) {
            let dir = self.0.join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("type"), format!("{link_type}\n")).unwrap();
            if with_device {
                fs::create_dir(dir.join("device")).unwrap();
            }
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn picks_the_first_hardware_ethernet_nic_by_name() {
        let sys = FakeSysfs::new("pick");
        sys.add("lo", "772", false);
        sys.add("sit0", "776", false);
        sys.add("dummy0", "1", false);
        sys.add("bond0", "1", false);
        sys.add("ib0", "32", true);
        sys.add("eth1", "1", true);
        sys.add("enp0s3", "1", true);
        assert_eq!(ethernet_nics(&sys.0), vec!["enp0s3".to_string(), "eth1".to_string()]);
        assert_eq!(first_nic_in(&sys.0, Duration::ZERO).as_deref(), Some("enp0s3"));
    }

    #[test]
    fn waits_for_a_nic_that_appears_late_and_gives_up_otherwise() {
        let sys = FakeSysfs::new("late");
        sys.add("lo", "772", false);
        let started = Instant::now();
        assert_eq!(first_nic_in(&sys.0, Duration::from_millis(300)), None);
        assert!(started.elapsed() >= Duration::from_millis(300));

        let root = sys.0.clone();
        let adder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(250));
            let dir = root.join("eth0");
            fs::create_dir_all(dir.join("device")).unwrap();
            fs::write(dir.join("type"), "1\n").unwrap();
        });
        assert_eq!(first_nic_in(&sys.0, Duration::from_secs(5)).as_deref(), Some("eth0"));
        adder.join().unwrap();
        assert!(wait_for_in(&sys.0, "eth0", Duration::ZERO));
        assert!(!wait_for_in(&sys.0, "eth9", Duration::from_millis(150)));
    }
}
