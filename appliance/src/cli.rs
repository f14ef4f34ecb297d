//! Command-line parsing for the `appliance` binary.

use std::path::PathBuf;

use crate::api_tls::TlsChoice;
use crate::capacity::{CapacityConfig, DEFAULT_DISK_RESERVE_MB};
use crate::http::front::ConnectionLimits;
use crate::master_key::Choice;
use crate::sandbox_side::{
    SandboxOptions, DEFAULT_CA_ROOTS, DEFAULT_GUEST_INITRD, DEFAULT_GUEST_KERNEL, DEFAULT_PROXY_CONFIG,
};
use crate::serve::ServeConfig;

pub const USAGE: &str = "usage:
  appliance serve [--listen ADDR] [--loopback-listen 127.0.0.1:PORT] [--data-dir DIR] [--vmm-bin PATH] [--admin-key-file FILE]
                  [--master-key-file FILE | --master-key-store auto|tpm[:DEVICE]|esp|data-dir]
                  [--guest-kernel VMLINUX] [--guest-initrd CPIO] [--templates-dir DIR]
                  [--ca-roots PEM] [--proxy-config JSON] [--stopped-retention-sec N] [--quiet]
                  [--power-control] [--require-data-mount] [--memory-reserve-mb N]
                  [--disk-reserve-mb N] [--max-connections N]
                  [--plain-http | --tls-cert PEM --tls-key PEM | --tls-settings JSON]
                  [--tls-trust-out FILE] [--upgrade-keys FILE] [--upgrade-keys-extra FILE]
  appliance bench api [--clients N] [--requests N] [--data-dir DIR]
  appliance rotate-key --data-dir DIR [--master-key-store WHERE | --master-key-file OLD --new-master-key-file NEW]";

/// How long a stopped sandbox's record stays visible (status, endAt) before it is forgotten.
pub const DEFAULT_STOPPED_RETENTION_SEC: usize = 3600;

/// Where the image ships the keys it trusts to sign upgrades (image/src/signing.rs).
pub const DEFAULT_UPGRADE_KEYS: &str = "/etc/opencomputer/upgrade-keys";

pub const DEFAULT_ADMIN_KEY_FILE: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/admin-key/raw";

// Parsed once per process; boxing the serve configuration would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    Serve(ServeConfig, SandboxOptions),
    BenchApi(BenchOptions),
    RotateKey { data_dir: PathBuf, store: Choice, old_key: Option<PathBuf>, new_key: Option<PathBuf> },
    Help,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub clients: usize,
    /// Requests per client per server (each iteration is two requests).
    pub requests: usize,
    pub data_dir: Option<PathBuf>,
}

struct Flags {
    args: Vec<String>,
}

impl Flags {
    /// Takes `--name VALUE` out of the argument list.
    fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        let Some(i) = self.args.iter().position(|a| a == name) else { return Ok(None) };
        if i + 1 >= self.args.len() {
            return Err(format!("{name} needs a value"));
        }
        let v = self.args.remove(i + 1);
        self.args.remove(i);
        Ok(Some(v))
    }

    fn switch(&mut self, name: &str) -> bool {
        match self.args.iter().position(|a| a == name) {
            Some(i) => {
                self.args.remove(i);
                true
            }
            None => false,
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.args.first() {
            Some(a) => Err(format!("unexpected argument {a:?}")),
            None => Ok(()),
        }
    }
}

fn number(name: &str, v: Option<String>, default: usize) -> Result<usize, String> {
    match v {
        None => Ok(default),
        Some(s) => {
            s.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{name} must be a positive integer"))
        }
    }
}

/// A size in MiB; 0 is allowed (no reserve).
fn megabytes(name: &str, v: &str) -> Result<u64, String> {
    v.parse::<u64>().map_err(|_| format!("{name} must be a whole number of MiB"))
}

/// HTTPS with the appliance's own certificate unless a flag says otherwise: `--plain-http`,
/// the operator's `--tls-cert`/`--tls-key`, or init's handoff file `--tls-settings` (absent
/// when the operator set nothing).
fn tls_choice(flags: &mut Flags) -> Result<TlsChoice, String> {
    let plain = flags.switch("--plain-http");
    let cert = flags.value("--tls-cert")?;
    let key = flags.value("--tls-key")?;
    let settings = flags.value("--tls-settings")?;
    match (plain, cert, key, settings) {
        (false, None, None, None) => Ok(TlsChoice::Generated),
        (true, None, None, None) => Ok(TlsChoice::Plain),
        (false, Some(cert), Some(key), None) => TlsChoice::from_files(cert.as_ref(), key.as_ref()),
        (false, None, None, Some(settings)) => TlsChoice::from_handoff(settings.as_ref()),
        (false, Some(_), None, None) | (false, None, Some(_), None) => {
            Err("--tls-cert and --tls-key must be given together".into())
        }
        _ => Err("choose one of --plain-http, --tls-cert/--tls-key and --tls-settings".into()),
    }
}

/// `--master-key-store`: where the master key is kept; the data directory unless told.
fn master_key_store(flags: &mut Flags) -> Result<Choice, String> {
    flags.value("--master-key-store")?.map_or(Ok(Choice::DataDir), |v| Choice::parse(&v))
}

pub fn parse(args: Vec<String>) -> Result<Command, String> {
    let mut it = args.into_iter();
    let sub = it.next();
    let mut flags = Flags { args: it.collect() };
    let command = match sub.as_deref() {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("serve") => {
            let config = ServeConfig {
                listen: flags.value("--listen")?.unwrap_or_else(|| "0.0.0.0:8080".into()),
                loopback_listen: flags.value("--loopback-listen")?.unwrap_or_else(|| "127.0.0.1:0".into()),
                data_dir: PathBuf::from(flags.value("--data-dir")?.unwrap_or_else(|| "/data".into())),
                vmm_bin: PathBuf::from(flags.value("--vmm-bin")?.unwrap_or_else(|| "/bin/vmm".into())),
                admin_key_file: Some(PathBuf::from(
                    flags.value("--admin-key-file")?.unwrap_or_else(|| DEFAULT_ADMIN_KEY_FILE.into()),
                )),
                master_key_file: flags.value("--master-key-file")?.map(PathBuf::from),
                master_key_store: master_key_store(&mut flags)?,
                log_requests: !flags.switch("--quiet"),
                stopped_retention: std::time::Duration::from_secs(number(
                    "--stopped-retention-sec",
                    flags.value("--stopped-retention-sec")?,
                    DEFAULT_STOPPED_RETENTION_SEC,
                )? as u64),
                power_control: flags.switch("--power-control"),
                require_data_mount: flags.switch("--require-data-mount"),
                capacity: CapacityConfig {
                    memory_reserve_mb: flags
                        .value("--memory-reserve-mb")?
                        .map(|v| megabytes("--memory-reserve-mb", &v))
                        .transpose()?,
                    disk_reserve_mb: flags
                        .value("--disk-reserve-mb")?
                        .map(|v| megabytes("--disk-reserve-mb", &v))
                        .transpose()?
                        .unwrap_or(DEFAULT_DISK_RESERVE_MB),
                    ..CapacityConfig::default()
                },
                connections: ConnectionLimits {
                    max_connections: number(
                        "--max-connections",
                        flags.value("--max-connections")?,
                        ConnectionLimits::default().max_connections,
                    )?,
                    ..ConnectionLimits::default()
                },
                tls: tls_choice(&mut flags)?,
                upgrade_key_files: {
                    let shipped = flags.value("--upgrade-keys")?.unwrap_or_else(|| DEFAULT_UPGRADE_KEYS.into());
                    let extra = flags.value("--upgrade-keys-extra")?;
                    std::iter::once(shipped).chain(extra).map(PathBuf::from).collect()
                },
                tls_trust_out: flags.value("--tls-trust-out")?.map(PathBuf::from),
            };
            let sandbox = SandboxOptions {
                vmm_bin: config.vmm_bin.clone(),
                guest_kernel: PathBuf::from(
                    flags.value("--guest-kernel")?.unwrap_or_else(|| DEFAULT_GUEST_KERNEL.into()),
                ),
                guest_initrd: PathBuf::from(
                    flags.value("--guest-initrd")?.unwrap_or_else(|| DEFAULT_GUEST_INITRD.into()),
                ),
                templates_dir: flags.value("--templates-dir")?.map(PathBuf::from),
                ca_roots: PathBuf::from(flags.value("--ca-roots")?.unwrap_or_else(|| DEFAULT_CA_ROOTS.into())),
                proxy_config: Some(PathBuf::from(
                    flags.value("--proxy-config")?.unwrap_or_else(|| DEFAULT_PROXY_CONFIG.into()),
                )),
            };
            Command::Serve(config, sandbox)
        }
        Some("bench") => {
            if flags.args.first().map(String::as_str) != Some("api") {
                return Err("the only benchmark is `bench api`".into());
            }
            flags.args.remove(0);
            Command::BenchApi(BenchOptions {
                clients: number("--clients", flags.value("--clients")?, 16)?,
                requests: number("--requests", flags.value("--requests")?, 1000)?,
                data_dir: flags.value("--data-dir")?.map(PathBuf::from),
            })
        }
        Some("rotate-key") => Command::RotateKey {
            data_dir: PathBuf::from(flags.value("--data-dir")?.ok_or("rotate-key needs --data-dir")?),
            store: master_key_store(&mut flags)?,
            old_key: flags.value("--master-key-file")?.map(PathBuf::from),
            new_key: flags.value("--new-master-key-file")?.map(PathBuf::from),
        },
        Some(other) => return Err(format!("unknown command {other:?}")),
    };
    flags.finish()?;
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_the_pid1_command_line() {
        let cmd = parse(args(
            "serve --listen 0.0.0.0:8080 --data-dir /data --vmm-bin /bin/vmm --admin-key-file /sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/admin-key/raw",
        ))
        .expect("parse");
        let Command::Serve(c, sandbox) = cmd else { panic!("not serve") };
        assert_eq!(sandbox.guest_kernel, PathBuf::from(DEFAULT_GUEST_KERNEL));
        assert_eq!(sandbox.guest_initrd, PathBuf::from(DEFAULT_GUEST_INITRD));
        assert_eq!(sandbox.templates_dir, None);
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.admin_key_file.as_deref(), Some(std::path::Path::new(DEFAULT_ADMIN_KEY_FILE)));
        assert!(c.log_requests);

        let Command::Serve(_, sandbox) =
            parse(args("serve --guest-kernel /k/vmlinux --guest-initrd /k/initrd.cpio")).expect("parse")
        else {
            panic!("not serve")
        };
        assert_eq!(sandbox.guest_kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(sandbox.guest_initrd, PathBuf::from("/k/initrd.cpio"));
    }

    #[test]
    fn rejects_unknown_and_incomplete_arguments() {
        assert!(parse(args("serve --bogus")).is_err());
        assert!(parse(args("serve --listen")).is_err());
        assert!(parse(args("bench other")).is_err());
        assert!(parse(args("bench api --clients 0")).is_err());
        assert!(parse(args("rotate-key")).is_err());
        assert!(matches!(parse(args("bench api --clients 4")), Ok(Command::BenchApi(BenchOptions { clients: 4, .. }))));
    }
}
