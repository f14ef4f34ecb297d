//! The image config (OCI and docker share its shape): the run configuration, and the digests
//! of the uncompressed layers that a docker save archive's layers are checked against.

use serde::Deserialize;

use crate::{ImageConfig, Refusal};

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Option<Vec<String>>,
}

pub(crate) struct Parsed {
    pub config: ImageConfig,
    /// `rootfs.diff_ids`, as written (empty when absent).
    pub diff_ids: Vec<String>,
}

pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed, Refusal> {
    let file: ConfigFile = parse_json(bytes, "the image config")?;
    let run = file.config.unwrap_or_default();
    let env = run
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (entry, String::new()),
        })
        .collect();
    let config = ImageConfig {
        env,
        working_dir: run.working_dir.filter(|d| !d.is_empty()),
        user: run.user.filter(|u| !u.is_empty()),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
    };
    let diff_ids = file.rootfs.and_then(|r| r.diff_ids).unwrap_or_default();
    Ok(Parsed { config, diff_ids })
}

/// Parses one of the archive's JSON documents; `what` names it in the refusal.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|e| Refusal::Invalid(format!("{what} is not valid JSON of its kind: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_configuration_is_carried_and_absent_fields_are_empty() {
        let json = br#"{"architecture":"amd64","config":{"Env":["PATH=/usr/bin","A=b=c","BARE"],
            "WorkingDir":"/srv","User":"1000:1000","Entrypoint":["/bin/sh","-c"],"Cmd":null},
            "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#;
        let parsed = parse(json).expect("parse");
        assert_eq!(
            parsed.config.env,
            [("PATH".into(), "/usr/bin".into()), ("A".into(), "b=c".into()), ("BARE".into(), String::new())]
        );
        assert_eq!(parsed.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(parsed.config.user.as_deref(), Some("1000:1000"));
        assert_eq!(parsed.config.entrypoint, ["/bin/sh", "-c"]);
        assert!(parsed.config.cmd.is_empty());
        assert_eq!(parsed.diff_ids, ["sha256:00"]);
        let empty = parse(br#"{"config":{"WorkingDir":"","User":""}}"#).expect("parse");
        assert_eq!(empty.config, ImageConfig::default());
        assert!(matches!(parse(b"{not json"), Err(Refusal::Invalid(m)) if m.contains("the image config")));
    }
}
