//! Operator configuration: `opencomputer.conf` (`key = value` lines, documented in
//! image/opencomputer.conf and the README) on the EFI system partition, with `oc.<key>=` on the
//! kernel command line overriding the file. Problems are collected as plain sentences naming the
//! key and the line, printed on the console, and never stop the boot.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Keys the file may set (besides `host.<name>`).
const KEYS: &[&str] = &[
    "admin_key",
    "hostname",
    "net",
    "ip",
    "gw",
    "dns",
    "iface",
    "data",
    "trusted_ca",
    "allow_private",
    "trial_timeout",
    "tls_cert",
    "tls_key",
    "plain_http",
    "upgrade_keys",
];
/// Keys that never come from the kernel command line: the admin key because the kernel prints
/// its command line on the console, the API's TLS settings and the extra trusted upgrade keys to
/// keep them in one place.
const FILE_ONLY: &[&str] = &["admin_key", "tls_cert", "tls_key", "plain_http", "upgrade_keys"];
/// An Ed25519 public key in upgrade_keys: the raw 32 bytes as hex digits.
const UPGRADE_KEY_HEX_DIGITS: usize = 64;
/// Keys whose values init's existing command-line parsers read (as `oc.<key>=`).
const CMDLINE_KEYS: &[&str] = &["hostname", "net", "ip", "gw", "dns", "iface", "data"];
pub const HOST_PREFIX: &str = "host.";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Line number in the file.
    File(usize),
    Cmdline,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub origin: Origin,
}

#[derive(Debug, Default)]
pub struct Config {
    pub settings: BTreeMap<String, Setting>,
    pub problems: Vec<String>,
}

impl Config {
    /// The file (if any) with the kernel command line's `oc.*` values on top.
    pub fn merge(file: Option<&str>, file_name: &str, cmdline: &str) -> Config {
        let mut config = Config::default();
        if let Some(text) = file {
            config.read_file(text, file_name);
        }
        for word in cmdline.split_ascii_whitespace().take_while(|w| *w != "--") {
            let Some((key, value)) = word.split_once('=') else { continue };
            let Some(key) = key.strip_prefix("oc.") else { continue };
            if FILE_ONLY.contains(&key) {
                let why = if key == "admin_key" {
                    "it would be printed on the console"
                } else {
                    "it is read only from the file"
                };
                config
                    .problems
                    .push(format!("oc.{key} on the kernel command line is ignored: {why}. Set {key} in {file_name}"));
                continue;
            }
            if known(key) && !value.is_empty() {
                config.settings.insert(key.to_string(), Setting { value: value.to_string(), origin: Origin::Cmdline });
            }
        }
        config.validate(file_name);
        config
    }

    fn read_file(&mut self, text: &str, file_name: &str) {
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                self.problems.push(format!("{file_name} line {line_no}: expected `key = value`, found {line:?}"));
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if !known(key) {
                self.problems.push(format!(
                    "{file_name} line {line_no}: unknown key {key:?} (known: {}, host.<name>)",
                    KEYS.join(", ")
                ));
                continue;
            }
            if value.is_empty() {
                self.problems.push(format!("{file_name} line {line_no}: {key} has no value"));
                continue;
            }
            if let Some(earlier) = self.settings.get(key) {
                if let Origin::File(first) = earlier.origin {
                    self.problems.push(format!(
                        "{file_name} line {line_no}: {key} was already set on line {first}; using line {line_no}"
                    ));
                }
            }
            self.settings.insert(key.to_string(), Setting { value: value.to_string(), origin: Origin::File(line_no) });
        }
    }

    /// Checks values no later parser looks at; a bad one is reported and dropped.
    fn validate(&mut self, file_name: &str) {
        let mut bad = Vec::new();
        let mut warnings = Vec::new();
        for (key, setting) in &self.settings {
            let problem = if let Some(name) = key.strip_prefix(HOST_PREFIX) {
                if name.is_empty() || !valid_host_name(name) {
                    Some(format!("{key}: {name:?} is not a valid host name"))
                } else if setting.value.parse::<IpAddr>().is_err() {
                    Some(format!("{key} = {}: not an IP address", setting.value))
                } else {
                    None
                }
            } else {
                match key.as_str() {
                    "hostname" if !valid_host_name(&setting.value) || setting.value.len() > 64 => Some(format!(
                        "hostname = {}: use letters, digits, '-' and '.', at most 64 characters",
                        setting.value
                    )),
                    "allow_private" => setting
                        .value
                        .split(',')
                        .map(str::trim)
                        .find(|c| !valid_cidr(c))
                        .map(|c| format!("allow_private: {c:?} is not an address range like 10.1.2.0/24")),
                    "trial_timeout" if trial_timeout_secs(&setting.value).is_none() => Some(format!(
                        "trial_timeout = {}: a number of seconds from {} to {}",
                        setting.value,
                        TRIAL_TIMEOUT_RANGE.start(),
                        TRIAL_TIMEOUT_RANGE.end()
                    )),
                    "trusted_ca" | "tls_cert" | "tls_key" if !valid_esp_path(&setting.value) => {
                        Some(format!("{key} = {}: name a file on the EFI partition, without '..'", setting.value))
                    }
                    "plain_http" if setting.value != "true" && setting.value != "false" => {
                        Some(format!("plain_http = {}: use true or false (default false)", setting.value))
                    }
                    "admin_key" if setting.value.len() < 16 => {
                        // Accepted (refusing would lock the operator out), but said plainly.
                        warnings.push(format!(
                            "{}admin_key is shorter than 16 characters; use a long random key",
                            self.where_set(key, file_name)
                        ));
                        None
                    }
                    _ => None,
                }
            };
            if let Some(problem) = problem {
                bad.push((key.clone(), problem));
            }
        }
        self.problems.extend(warnings);
        for (key, problem) in bad {
            self.problems.push(format!("{}{problem}; ignored", self.where_set(&key, file_name)));
            self.settings.remove(&key);
        }
        // The API's certificate and its key come together or not at all.
        for (key, other) in [("tls_cert", "tls_key"), ("tls_key", "tls_cert")] {
            if self.settings.contains_key(key) && !self.settings.contains_key(other) {
                self.problems.push(format!(
                    "{}{key} is set but {other} is not (both or neither); ignored, the appliance's generated certificate is used instead",
                    self.where_set(key, file_name)
                ));
                self.settings.remove(key);
            }
        }
        if self.plain_http() && self.settings.contains_key("tls_cert") {
            self.problems.push(format!(
                "{}plain_http = true: the API serves plain HTTP, so tls_cert and tls_key are not used",
                self.where_set("plain_http", file_name)
            ));
        }
        // upgrade_keys: each entry stands alone; a bad one is dropped, the others still count.
        if let Some(value) = self.get("upgrade_keys").map(str::to_string) {
            let (keys, problems) = check_upgrade_keys(&value);
            let prefix = self.where_set("upgrade_keys", file_name);
            self.problems.extend(problems.into_iter().map(|p| format!("{prefix}{p}")));
            if keys.is_empty() {
                self.settings.remove("upgrade_keys");
            } else if let Some(setting) = self.settings.get_mut("upgrade_keys") {
                setting.value = keys.join(",");
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(|s| s.value.as_str())
    }

    /// "opencomputer.conf line 4: " or "kernel command line: " for a set key.
    pub fn where_set(&self, key: &str, file_name: &str) -> String {
        match self.settings.get(key).map(|s| &s.origin) {
            Some(Origin::File(line)) => format!("{file_name} line {line}: "),
            Some(Origin::Cmdline) => "kernel command line: ".to_string(),
            None => String::new(),
        }
    }

    /// The settings init's command-line parsers read, as `oc.key=value` words.
    pub fn as_cmdline(&self) -> String {
        CMDLINE_KEYS.iter().filter_map(|k| self.get(k).map(|v| format!("oc.{k}={v}"))).collect::<Vec<_>>().join(" ")
    }

    /// A parser's error about `oc.<key>=...`, told with where that key was set.
    pub fn explain(&self, error: &str, file_name: &str) -> String {
        let key = error.strip_prefix("oc.").and_then(|rest| rest.split(['=', ' ']).next()).unwrap_or_default();
        let prefix = self.where_set(key, file_name);
        if prefix.is_empty() {
            error.to_string()
        } else {
            format!("{prefix}{error}")
        }
    }

    /// `host.<name>` settings.
    pub fn hosts(&self) -> Vec<(&str, &str)> {
        self.settings
            .iter()
            .filter_map(|(k, s)| k.strip_prefix(HOST_PREFIX).map(|name| (name, s.value.as_str())))
            .collect()
    }

    /// `plain_http = true`: the API serves plain HTTP instead of HTTPS.
    pub fn plain_http(&self) -> bool {
        self.get("plain_http") == Some("true")
    }

    /// `upgrade_keys`: the extra Ed25519 public keys the operator trusts for upgrade images,
    /// validated and in lowercase hex (64 digits each).
    pub fn upgrade_keys(&self) -> Vec<&str> {
        self.get("upgrade_keys").map(|v| v.split(',').filter(|k| !k.is_empty()).collect()).unwrap_or_default()
    }

    /// The upgrade keys handoff file's text (one lowercase hex key per line), if any key is set.
    pub fn upgrade_keys_text(&self) -> Option<String> {
        let keys = self.upgrade_keys();
        if keys.is_empty() {
            return None;
        }
        Some(keys.iter().map(|k| format!("{k}\n")).collect())
    }

    /// The API's TLS settings (the appliance's api-tls JSON), if the operator set any: plain HTTP,
    /// or their certificate chain and key (PEM text, read from the EFI partition).
    pub fn api_tls_json(&self, cert_and_key_pem: Option<(&str, &str)>) -> Option<String> {
        let plain_http = self.plain_http();
        if !plain_http && cert_and_key_pem.is_none() {
            return None;
        }
        let mut json = format!("{{\"plainHttp\": {plain_http}");
        if let Some((cert, key)) = cert_and_key_pem {
            json.push_str(&format!(", \"certPem\": {}, \"keyPem\": {}", json_string(cert), json_string(key)));
        }
        json.push_str("}\n");
        Some(json)
    }

    /// The sealing proxy's settings (the appliance's proxy-config JSON), if any key asks for one.
    pub fn proxy_json(&self, trusted_ca_pem: Option<&str>) -> Option<String> {
        let hosts = self.hosts();
        let allow: Vec<&str> =
            self.get("allow_private").map(|v| v.split(',').map(str::trim).collect()).unwrap_or_default();
        if hosts.is_empty() && allow.is_empty() && trusted_ca_pem.is_none() {
            return None;
        }
        let hosts: Vec<String> = hosts.iter().map(|(n, a)| format!("{}: {}", json_string(n), json_string(a))).collect();
        let allow: Vec<String> = allow.iter().map(|c| json_string(c)).collect();
        let mut json = format!("{{\"hosts\": {{{}}}, \"allowPrivate\": [{}]", hosts.join(", "), allow.join(", "));
        if let Some(pem) = trusted_ca_pem {
            json.push_str(&format!(", \"trustedCaPem\": {}", json_string(pem)));
        }
        json.push_str("}\n");
        Some(json)
    }
}

/// How long a trial boot of an upgrade may take to answer healthy (init::appliance::slot).
pub const TRIAL_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 30..=86_400;

pub fn trial_timeout_secs(value: &str) -> Option<u64> {
    value.parse::<u64>().ok().filter(|s| TRIAL_TIMEOUT_RANGE.contains(s))
}

/// upgrade_keys' entries (comma separated, spaces around them allowed): the valid ones in
/// lowercase, and a sentence for each one dropped, naming its position (1 for the first).
fn check_upgrade_keys(value: &str) -> (Vec<String>, Vec<String>) {
    // Each valid key with its entry's position.
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut problems = Vec::new();
    for (n, entry) in value.split(',').map(str::trim).enumerate() {
        let position = n + 1;
        let length = entry.chars().count();
        let problem = if entry.is_empty() {
            Some(format!("upgrade_keys entry {position} is empty"))
        } else if length != UPGRADE_KEY_HEX_DIGITS {
            Some(format!(
                "upgrade_keys entry {position} is {length} characters long; an Ed25519 public key is \
                 {UPGRADE_KEY_HEX_DIGITS} hex digits"
            ))
        } else if !entry.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(format!(
                "upgrade_keys entry {position} is not hex; an Ed25519 public key is {UPGRADE_KEY_HEX_DIGITS} \
                 hex digits (0-9, a-f)"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            problems.push(format!("{problem}; that entry is ignored"));
            continue;
        }
        let key = entry.to_ascii_lowercase();
        match keys.iter().find(|(k, _)| *k == key) {
            Some((_, first)) => {
                problems.push(format!("upgrade_keys entry {position} repeats entry {first}; counted once"));
            }
            None => keys.push((key, position)),
        }
    }
    (keys.into_iter().map(|(k, _)| k).collect(), problems)
}

fn known(key: &str) -> bool {
    KEYS.contains(&key) || key.strip_prefix(HOST_PREFIX).is_some_and(|n| !n.is_empty())
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_cidr(text: &str) -> bool {
    let Some((addr, prefix)) = text.split_once('/') else { return false };
    let Ok(addr) = addr.parse::<IpAddr>() else { return false };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) && prefix.parse::<u32>().is_ok_and(|p| p <= max)
}

/// A relative path inside the ESP.
fn valid_esp_path(path: &str) -> bool {
    let trimmed = path.trim_start_matches('/');
    !trimmed.is_empty() && trimmed.split('/').all(|p| !p.is_empty() && p != "..")
}

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "opencomputer.conf";

    #[test]
    fn reads_keys_comments_and_host_maps() {
        let text = "# comment\n\nadmin_key = 0123456789abcdef0123\nnet = static\nip = 10.0.2.15/24\nhost.api.internal = 10.1.2.3\n";
        let c = Config::merge(Some(text), FILE, "console=ttyS0");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.get("admin_key"), Some("0123456789abcdef0123"));
        assert_eq!(c.as_cmdline(), "oc.net=static oc.ip=10.0.2.15/24");
        assert_eq!(c.hosts(), vec![("api.internal", "10.1.2.3")]);
        assert_eq!(c.where_set("ip", FILE), "opencomputer.conf line 5: ");
    }

    #[test]
    fn the_kernel_command_line_overrides_the_file_but_never_carries_the_key() {
        let c = Config::merge(
            Some("hostname = from-file\nnet = static\n"),
            FILE,
            "oc.hostname=from-cmdline oc.net=dhcp oc.admin_key=leaked -- sandbox oc.iface=x",
        );
        assert_eq!(c.get("hostname"), Some("from-cmdline"));
        assert_eq!(c.get("net"), Some("dhcp"));
        assert_eq!(c.get("admin_key"), None);
        assert_eq!(c.get("iface"), None, "words after -- are init's arguments");
        assert!(c.problems.iter().any(|p| p.contains("oc.admin_key") && !p.contains("leaked")), "{:?}", c.problems);
    }

    #[test]
    fn problems_name_the_line_and_the_key_and_bad_values_are_dropped() {
        let text = "hostnmae = x\nno equals sign\nhost.api = not-an-ip\nallow_private = 10.0.0.0/33\ntrusted_ca = ../etc/passwd\nhostname =\nadmin_key = short\n";
        let c = Config::merge(Some(text), FILE, "");
        let all = c.problems.join("\n");
        assert!(all.contains("line 1: unknown key \"hostnmae\""), "{all}");
        assert!(all.contains("line 2: expected `key = value`"), "{all}");
        assert!(all.contains("line 3: host.api = not-an-ip: not an IP address"), "{all}");
        assert!(all.contains("line 4: allow_private"), "{all}");
        assert!(all.contains("line 5: trusted_ca"), "{all}");
        assert!(all.contains("line 6: hostname has no value"), "{all}");
        assert!(all.contains("line 7: admin_key is shorter than 16"), "{all}");
        assert!(!all.contains("short\""), "the key's value is never repeated: {all}");
        assert_eq!(c.get("host.api"), None);
        assert_eq!(c.get("admin_key"), Some("short"), "a short key still works");
    }

    #[test]
    fn trial_timeout_comes_from_the_file_or_the_command_line_within_bounds() {
        let c = Config::merge(Some("trial_timeout = 600\n"), FILE, "oc.trial_timeout=45");
        assert_eq!(c.get("trial_timeout").and_then(trial_timeout_secs), Some(45));
        let c = Config::merge(Some("trial_timeout = 5\n"), FILE, "");
        assert_eq!(c.get("trial_timeout"), None, "below the minimum is dropped");
        assert!(
            c.problems.iter().any(|p| p.contains("line 1: trial_timeout = 5: a number of seconds from 30 to 86400")),
            "{:?}",
            c.problems
        );
        let c = Config::merge(None, FILE, "oc.trial_timeout=soon");
        assert!(
            c.problems.iter().any(|p| p.starts_with("kernel command line: trial_timeout = soon")),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn parser_errors_are_explained_with_their_origin() {
        let c = Config::merge(Some("net = static\n"), FILE, "oc.ip=1.2.3.4/99");
        assert_eq!(c.explain("oc.net=static needs oc.ip", FILE), "opencomputer.conf line 1: oc.net=static needs oc.ip");
        assert_eq!(c.explain("oc.ip=1.2.3.4/99: bad", FILE), "kernel command line: oc.ip=1.2.3.4/99: bad");
    }

    #[test]
    fn proxy_settings_become_the_appliances_json() {
        let c =
            Config::merge(Some("host.api.internal = 10.1.2.3\nallow_private = 10.1.2.3/32, 10.9.0.0/16\n"), FILE, "");
        let json = c.proxy_json(Some("-----BEGIN CERTIFICATE-----\nAB\"C\n")).expect("json");
        assert_eq!(
            json,
            "{\"hosts\": {\"api.internal\": \"10.1.2.3\"}, \"allowPrivate\": [\"10.1.2.3/32\", \"10.9.0.0/16\"], \
             \"trustedCaPem\": \"-----BEGIN CERTIFICATE-----\\nAB\\\"C\\n\"}\n"
        );
        assert_eq!(Config::merge(None, FILE, "").proxy_json(None), None);
    }

    #[test]
    fn tls_cert_and_tls_key_come_together_or_not_at_all() {
        let c = Config::merge(Some("tls_cert = tls/api.crt\ntls_key = tls/api.key\n"), FILE, "");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!((c.get("tls_cert"), c.get("tls_key")), (Some("tls/api.crt"), Some("tls/api.key")));

        let c = Config::merge(Some("tls_cert = api.crt\n"), FILE, "");
        assert_eq!(c.get("tls_cert"), None);
        assert_eq!(
            c.problems,
            vec!["opencomputer.conf line 1: tls_cert is set but tls_key is not (both or neither); ignored, \
                 the appliance's generated certificate is used instead"
                .to_string()]
        );

        // A key whose certificate was dropped (a bad path) is dropped too, and said so.
        let c = Config::merge(Some("tls_cert = ../api.crt\ntls_key = api.key\n"), FILE, "");
        assert_eq!((c.get("tls_cert"), c.get("tls_key")), (None, None));
        let all = c.problems.join("\n");
        assert!(all.contains("line 1: tls_cert = ../api.crt: name a file on the EFI partition"), "{all}");
        assert!(all.contains("line 2: tls_key is set but tls_cert is not (both or neither)"), "{all}");
        assert!(all.contains("generated certificate is used instead"), "{all}");
    }

    #[test]
    fn tls_settings_never_come_from_the_kernel_command_line() {
        let c = Config::merge(None, FILE, "oc.tls_cert=a.crt oc.tls_key=a.key oc.plain_http=true");
        assert_eq!((c.get("tls_cert"), c.get("tls_key"), c.get("plain_http")), (None, None, None));
        assert!(!c.plain_http());
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
        assert!(
            c.problems.iter().all(|p| p.contains("on the kernel command line is ignored") && !p.contains("a.key")),
            "{:?}",
            c.problems
        );
        assert_eq!(c.api_tls_json(None), None);
    }

    #[test]
    fn plain_http_is_true_or_false_and_defaults_to_false() {
        assert!(!Config::merge(None, FILE, "").plain_http());
        assert!(!Config::merge(Some("plain_http = false\n"), FILE, "").plain_http());
        let c = Config::merge(Some("plain_http = true\n"), FILE, "");
        assert!(c.plain_http() && c.problems.is_empty(), "{:?}", c.problems);
        for bad in ["yes", "TRUE", "1"] {
            let c = Config::merge(Some(&format!("plain_http = {bad}\n")), FILE, "");
            assert!(!c.plain_http(), "{bad}");
            assert_eq!(c.get("plain_http"), None);
            assert_eq!(
                c.problems,
                vec![format!(
                    "opencomputer.conf line 1: plain_http = {bad}: use true or false (default false); ignored"
                )]
            );
        }
        let c = Config::merge(Some("plain_http = true\ntls_cert = a.crt\ntls_key = a.key\n"), FILE, "");
        assert!(c.plain_http());
        assert!(c.problems.iter().any(|p| p.contains("line 1: plain_http = true: the API serves plain HTTP")));
    }

    const KEY_A: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const KEY_B: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

    #[test]
    fn upgrade_keys_are_a_list_of_hex_keys_in_lowercase() {
        let text = format!("upgrade_keys = {} ,  {KEY_B}\n", KEY_A.to_uppercase());
        let c = Config::merge(Some(&text), FILE, "");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.upgrade_keys(), vec![KEY_A, KEY_B]);
        assert_eq!(c.upgrade_keys_text(), Some(format!("{KEY_A}\n{KEY_B}\n")));

        let c = Config::merge(Some(&format!("upgrade_keys = {KEY_B}\n")), FILE, "");
        assert_eq!(c.upgrade_keys_text(), Some(format!("{KEY_B}\n")));

        let none = Config::merge(Some("plain_http = false\n"), FILE, "");
        assert!(none.upgrade_keys().is_empty());
        assert_eq!(none.upgrade_keys_text(), None);
    }

    #[test]
    fn a_bad_upgrade_key_is_dropped_by_position_and_the_others_still_count() {
        let short = &KEY_B[..63];
        let not_hex = format!("{}g", &KEY_B[..63]);
        let text = format!("hostname = box\nupgrade_keys = {KEY_A}, {short},{not_hex}, ,{KEY_A}\n");
        let c = Config::merge(Some(&text), FILE, "");
        assert_eq!(c.upgrade_keys(), vec![KEY_A]);
        assert_eq!(c.upgrade_keys_text(), Some(format!("{KEY_A}\n")));
        assert_eq!(
            c.problems,
            vec![
                "opencomputer.conf line 2: upgrade_keys entry 2 is 63 characters long; an Ed25519 public key is \
                 64 hex digits; that entry is ignored"
                    .to_string(),
                "opencomputer.conf line 2: upgrade_keys entry 3 is not hex; an Ed25519 public key is 64 hex digits \
                 (0-9, a-f); that entry is ignored"
                    .to_string(),
                "opencomputer.conf line 2: upgrade_keys entry 4 is empty; that entry is ignored".to_string(),
                "opencomputer.conf line 2: upgrade_keys entry 5 repeats entry 1; counted once".to_string(),
            ]
        );

        // No valid entry at all: the key is dropped.
        let c = Config::merge(Some(&format!("upgrade_keys = {short}\n")), FILE, "");
        assert_eq!(c.get("upgrade_keys"), None);
        assert_eq!(c.upgrade_keys_text(), None);
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert!(c.problems[0].starts_with("opencomputer.conf line 1: upgrade_keys entry 1 is 63 characters long"));
    }

    #[test]
    fn upgrade_keys_never_come_from_the_kernel_command_line() {
        let c = Config::merge(None, FILE, &format!("oc.upgrade_keys={KEY_A}"));
        assert_eq!(c.get("upgrade_keys"), None);
        assert_eq!(c.upgrade_keys_text(), None);
        assert_eq!(
            c.problems,
            vec!["oc.upgrade_keys on the kernel command line is ignored: it is read only from the file. \
                 Set upgrade_keys in opencomputer.conf"
                .to_string()]
        );
        // Nor does the command line drop the file's.
        let c = Config::merge(Some(&format!("upgrade_keys = {KEY_B}\n")), FILE, &format!("oc.upgrade_keys={KEY_A}"));
        assert_eq!(c.upgrade_keys(), vec![KEY_B]);
    }

    #[test]
    fn tls_settings_become_the_appliances_json() {
        let none = Config::merge(Some("plain_http = false\n"), FILE, "");
        assert_eq!(none.api_tls_json(None), None, "nothing set: the appliance generates its certificate");
        assert_eq!(
            none.api_tls_json(Some(("-----BEGIN CERTIFICATE-----\nAB\"C\n", "-----BEGIN PRIVATE KEY-----\r\nK\\\n"))),
            Some(
                "{\"plainHttp\": false, \"certPem\": \"-----BEGIN CERTIFICATE-----\\nAB\\\"C\\n\", \
                 \"keyPem\": \"-----BEGIN PRIVATE KEY-----\\r\\nK\\\\\\n\"}\n"
                    .to_string()
            )
        );
        let plain = Config::merge(Some("plain_http = true\n"), FILE, "");
        assert_eq!(plain.api_tls_json(None), Some("{\"plainHttp\": true}\n".to_string()));
    }
}
