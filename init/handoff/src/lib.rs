//! The contract between PID 1 and the appliance service it supervises: the files init writes
//! under `/run/opencomputer` (a tmpfs, 0600 where secret) before starting the service, and the
//! port on which init health-checks the API to commit a trial boot. The image builder names the
//! same files in the service definition.

/// The tmpfs directory holding everything below.
pub const RUN_DIR: &str = "/run/opencomputer";
/// The admin API key (0600); the appliance stores only its hash.
pub const ADMIN_KEY_FILE: &str = "/run/opencomputer/admin-key";
/// The proxy's operator settings (host maps, private ranges, extra trusted CA), JSON.
pub const PROXY_CONFIG_FILE: &str = "/run/opencomputer/proxy-config.json";
/// The operator's API TLS settings (their certificate and key, or plain HTTP), JSON, 0600:
/// `{"plainHttp": bool, "certPem": "...", "keyPem": "..."}`, the two PEMs both present or both
/// absent. Absent when the operator set none; then the appliance generates its certificate.
pub const API_TLS_FILE: &str = "/run/opencomputer/api-tls.json";
/// Extra Ed25519 public keys the operator trusts for upgrade images (`upgrade_keys` in
/// opencomputer.conf), besides those shipped in the image: the raw 32-byte keys as lowercase hex,
/// one per line, each line ending in `\n`. Public (0644). Absent when the operator set none.
pub const UPGRADE_KEYS_FILE: &str = "/run/opencomputer/upgrade-keys";
/// Which slot init booted and whether that boot is committed (see [`BootState`]).
pub const BOOT_STATE_FILE: &str = "/run/opencomputer/boot-slot";
/// Why the data disk could not be mounted (absent when it was).
pub const DATA_PROBLEM_FILE: &str = "/run/opencomputer/data-problem";
/// The port the appliance API listens on inside the appliance.
pub const API_PORT: u16 = 8080;
/// The API server's own plain-HTTP listener on 127.0.0.1 (the public port's front relays to it
/// after TLS): init health-checks it without a TLS stack. Reachable only from inside the
/// appliance, where the inner listener already was.
pub const LOOPBACK_API_PORT: u16 = 8079;

/// The booted slot as init records it: `slot=`, `entry=` and `state=` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// `a` or `b`.
    pub slot: String,
    /// The boot entry's file name on the ESP (empty when unknown).
    pub entry: String,
    /// `committed`, `trial` or `unknown`.
    pub state: String,
}

impl BootState {
    pub fn encode(&self) -> String {
        format!("slot={}\nentry={}\nstate={}\n", self.slot, self.entry, self.state)
    }

    /// Reads the file's text; a missing key reads as empty.
    pub fn parse(text: &str) -> BootState {
        let get = |key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("").to_string()
        };
        BootState { slot: get("slot"), entry: get("entry"), state: get("state") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_state_round_trips() {
        let state = BootState { slot: "b".into(), entry: "opencomputer-2-b+3.efi".into(), state: "trial".into() };
        assert_eq!(BootState::parse(&state.encode()), state);
        assert_eq!(
            BootState::parse("slot=a\n"),
            BootState { slot: "a".into(), entry: String::new(), state: String::new() }
        );
    }

    #[test]
    fn every_file_is_in_the_run_dir() {
        for file in
            [ADMIN_KEY_FILE, PROXY_CONFIG_FILE, API_TLS_FILE, UPGRADE_KEYS_FILE, BOOT_STATE_FILE, DATA_PROBLEM_FILE]
        {
            assert!(file.starts_with(RUN_DIR) && file.len() > RUN_DIR.len() + 1, "{file}");
        }
    }
}
