//! Templates made on the appliance (`/api/templates`), through the real API: an OCI image layout
//! and a `docker save` archive built by the test (template_fixture.rs: Debian minbase plus `jq`,
//! no python3 or curl) become templates whose sandboxes run `jq`, get the image's `Env` (the
//! create's `envs` win), `WorkingDir` and `User`, and see its layers applied with their whiteouts; a
//! sandbox's disk becomes a template of its own; a template in use cannot be deleted, a shipped
//! one never; hostile archives are refused with 400 and leave the list as it was. Everything
//! made here is deleted again.

use crate::api::{rfc3339_seconds, Api, Uploaded};
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use crate::template_fixture::{
    self as fixture, Archive, Fixture, CMD, DOCKER_USER, ENTRYPOINT, IMAGE_ARCHIVE_TYPE, IMAGE_ENV, IMAGE_PATH,
    JQ_LINK, MARKER, MARKER_TEXT, OPAQUE_DIR, OPAQUE_DIR_KEEPS, WHITED_OUT_DIR, WHITED_OUT_FILE, WORKING_DIR,
};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "templates from an OCI layout and a docker-save archive run the image's programs with its Env, WorkingDir and User; a sandbox's disk becomes a template",
        run: imported_templates,
    },
    Scenario {
        name: "templates: hostile archives are refused with 400 and change nothing; shipped templates cannot be deleted",
        run: refused_archives,
    },
];

const OCI_NAME: &str = "oci-e2e";
const OCI_TAG: &str = "e2e";
const DOCKER_NAME: &str = "docker-e2e";
const SAVED_NAME: &str = "saved-e2e";
const REFUSED_NAME: &str = "refused-e2e";
const SAVED_FILE: &str = "/root/saved-e2e.txt";
const SAVED_TEXT: &str = "written in a sandbox before its disk became a template";
const SHIPPED: &[&str] = &["base", "python", "node"];

/// The names in `GET /api/templates`, in its order.
pub fn template_names(api: &Api) -> Result<Vec<String>> {
    let list = api.expect(200, "GET", "/templates", &Value::Null)?;
    let entries = list.as_array().ok_or_else(|| err!("the template list is not an array: {list}"))?;
    entries
        .iter()
        .map(|t| t["name"].as_str().map(str::to_string).ok_or_else(|| err!("a template without a name: {t}")))
        .collect()
}

/// Uploads `archive` as template `name`; anything but 201 is an error naming the answer.
pub fn import(api: &Api, name: &str, tag: Option<&str>, content_type: &str, archive: &Archive) -> Result<Uploaded> {
    let query = match tag {
        Some(tag) => format!("/templates?name={name}&tag={tag}"),
        None => format!("/templates?name={name}"),
    };
    let uploaded = api.upload(&query, content_type, &archive.path)?;
    if uploaded.status != 201 {
        return Err(err!(
            "importing {} ({:.1} MiB) as {name}: expected 201, got {} after {:.1}s: {}",
            archive.path.display(),
            archive.mib(),
            uploaded.status,
            uploaded.answered.as_secs_f64(),
            uploaded.body
        ));
    }
    Ok(uploaded)
}

/// What an imported template's `defaults` are, `image` being `IMAGE_ENV`'s value in its config
/// and `user` its `User` (None: empty).
fn expected_defaults(image: &str, user: Option<&str>) -> Value {
    json!({
        "env": {"PATH": IMAGE_PATH, (IMAGE_ENV): image},
        "workingDir": WORKING_DIR,
        "user": user,
        "entrypoint": ENTRYPOINT,
        "cmd": CMD,
    })
}

/// A made template as the API shows it: its fields, source, digest and defaults.
fn check_template(
    api: &Api,
    t: &Value,
    name: &str,
    tag: &str,
    source: &str,
    digest: &str,
    defaults: &Value,
) -> Result<()> {
    let fields = [
        ("templateID", json!(name)),
        ("name", json!(name)),
        ("tag", json!(tag)),
        ("status", json!("ready")),
        ("builtIn", json!(false)),
        ("source", json!(source)),
        ("sourceDigest", json!(digest)),
        ("defaults", defaults.clone()),
    ];
    for (field, want) in fields {
        check(t[field] == want, || format!("template {name}: {field} is {}, expected {want}: {t}", t[field]))?;
    }
    check(t["sizeBytes"].as_u64().is_some_and(|n| n > 0), || format!("template {name}: sizeBytes in {t}"))?;
    check(t["diskMB"].as_u64().is_some_and(|n| n > 0), || format!("template {name}: diskMB in {t}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let created = t["createdAt"].as_str().and_then(rfc3339_seconds);
    check(created.is_some_and(|c| (c - now).abs() < 3600), || format!("template {name}: createdAt in {t}"))?;
    // GET answers the same template (its allocated size may move on).
    let mut got = api.expect(200, "GET", &format!("/templates/{name}"), &Value::Null)?;
    let mut posted = t.clone();
    for v in [&mut got, &mut posted] {
        if let Some(map) = v.as_object_mut() {
            map.remove("sizeBytes");
        }
    }
    check(got == posted, || format!("GET /templates/{name} answers {got}, the create answered {posted}"))
}

/// What the probe prints as `key=value` lines: everything a sandbox of the fixture's images
/// should show (POSIX sh only: the image has dash and bash, no python3).
fn probe_commands() -> Vec<(&'static str, String)> {
    let present = |path: &str| format!("test -e {path} && echo present || echo absent");
    vec![
        ("pwd", "pwd".into()),
        ("user", "id -un".into()),
        ("image", format!("printf %s \"${IMAGE_ENV}\"")),
        ("path", "printf %s \"$PATH\"".into()),
        ("jq", "jq --version".into()),
        ("jq_filter", "echo '{\"a\":[1,2,3]}' | jq -c '.a|length'".into()),
        // Relative: the command runs in the image's WorkingDir.
        ("marker", format!("cat {}", MARKER.trim_start_matches(&format!("{WORKING_DIR}/")))),
        ("marker_links", format!("stat -c %h {MARKER}")),
        ("jq_symlink", format!("{JQ_LINK} -n -c '{{ok:true}}'")),
        ("whited_out_file", present(WHITED_OUT_FILE)),
        ("layer1_file", present("/etc/issue")),
        ("opaque_dir", format!("ls -A {OPAQUE_DIR} | tr '\\n' ' '")),
        ("whited_out_dir", present(WHITED_OUT_DIR)),
        ("python3", "command -v python3 || echo absent".into()),
        ("curl", "command -v curl || echo absent".into()),
        ("hostname", "hostname".into()),
        ("uname", "uname -a".into()),
    ]
}

/// Runs the probe in `sid`; answers key -> value.
fn probe(api: &Api, sid: &str) -> Result<BTreeMap<String, String>> {
    let (code, out, stderr) = api.run(sid, &probe_line(), 60)?;
    check(code == 0, || format!("the probe in {sid} exited {code}: {out:?} {stderr:?}"))?;
    Ok(probe_values(&out))
}

/// The probe as one shell line.
fn probe_line() -> String {
    let parts: Vec<String> =
        probe_commands().iter().map(|(key, cmd)| format!("printf '%s=%s\\n' {key} \"$({cmd} 2>&1)\"")).collect();
    parts.join("; ")
}

/// key -> value of the probe's output.
fn probe_values(out: &str) -> BTreeMap<String, String> {
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.trim().to_string())).collect()
}

/// The probe in sandbox `sid` of an image template: `image` is what `$OC_E2E_IMAGE` must be,
/// `user` who commands run as (the image's `User`, else root).
fn check_image_sandbox(api: &Api, sid: &str, image: &str, user: &str) -> Result<()> {
    let seen = probe(api, sid)?;
    let get = |k: &str| seen.get(k).map_or("<missing>", String::as_str);
    let hostname = format!("sandbox-{}", &sid[..8.min(sid.len())]);
    let marker_text = MARKER_TEXT.trim();
    let exact: &[(&str, &str, &str)] = &[
        ("pwd", WORKING_DIR, "the image's WorkingDir"),
        ("user", user, "the image's User"),
        ("image", image, "the Env (or the create's envs)"),
        ("path", IMAGE_PATH, "the image's PATH"),
        ("jq_filter", "3", "jq in a pipe"),
        ("marker", marker_text, "layer 2's marker, read relative to the WorkingDir"),
        ("marker_links", "2", "layer 2's hard link"),
        ("jq_symlink", "{\"ok\":true}", "layer 2's absolute symlink to /usr/bin/jq"),
        ("whited_out_file", "absent", "a file of layer 1 whited out by layer 2"),
        ("layer1_file", "present", "a file of layer 1"),
        ("opaque_dir", OPAQUE_DIR_KEEPS, "a directory of layer 1 made opaque by layer 2"),
        ("whited_out_dir", "absent", "a directory of layer 1 whited out by layer 2"),
        ("hostname", &hostname, "the sandbox's own hostname"),
    ];
    for (key, want, what) in exact {
        check(get(key) == *want, || format!("sandbox {sid}: {key} ({what}) is {:?}, expected {want:?}", get(key)))?;
    }
    check(get("jq").starts_with("jq-"), || format!("sandbox {sid}: jq --version said {:?}", get("jq")))?;
    for absent in ["python3", "curl"] {
        check(get(absent) == "absent", || {
            format!("sandbox {sid}: {absent} is at {:?}; the image has none", get(absent))
        })?;
    }
    check(get("uname").starts_with("Linux "), || format!("sandbox {sid}: uname -a said {:?}", get("uname")))?;
    Ok(())
}

fn created_sandbox(api: &Api, body: &Value) -> Result<(String, f64)> {
    let started = Instant::now();
    let id = api.create_sandbox(body)?;
    Ok((id, started.elapsed().as_secs_f64()))
}

fn mib_per_s(archive: &Archive, uploaded: &Uploaded) -> f64 {
    archive.mib() / uploaded.answered.as_secs_f64().max(0.001)
}

fn imported_templates(appliance: &mut Appliance) -> Result<()> {
    let fixture = fixture::build()?;
    let api = appliance.api();
    let before = template_names(&api)?;
    let mut sandboxes: Vec<String> = Vec::new();
    let mut templates: Vec<&str> = Vec::new();
    let result = run_imported(&api, &fixture, &before, &mut sandboxes, &mut templates);
    for id in &sandboxes {
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    }
    for name in &templates {
        let _ = api.call("DELETE", &format!("/templates/{name}"), &Value::Null);
    }
    result
}

/// Deletes sandbox `id` (204) and forgets it.
fn delete_sandbox(api: &Api, sandboxes: &mut Vec<String>, id: &str) -> Result<()> {
    api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
    sandboxes.retain(|s| s != id);
    Ok(())
}

/// Deletes template `name` (204), checks it is gone, and forgets it.
fn delete_template(api: &Api, templates: &mut Vec<&str>, name: &str) -> Result<()> {
    api.expect(204, "DELETE", &format!("/templates/{name}"), &Value::Null)?;
    let (status, _) = api.call("GET", &format!("/templates/{name}"), &Value::Null)?;
    check(status == 404, || format!("GET /templates/{name} after its delete answered {status}"))?;
    templates.retain(|t| *t != name);
    Ok(())
}

fn expect_in_use(api: &Api, name: &str, sid: &str) -> Result<()> {
    let (status, body) = api.call("DELETE", &format!("/templates/{name}"), &Value::Null)?;
    check(status == 409 && body["error"].is_string(), || {
        format!("DELETE /templates/{name} while sandbox {sid} runs answered {status}: {body}")
    })
}

fn run_imported(
    api: &Api,
    fixture: &Fixture,
    before: &[String],
    sandboxes: &mut Vec<String>,
    templates: &mut Vec<&'static str>,
) -> Result<()> {
    let list = api.expect(200, "GET", "/templates", &Value::Null)?;
    for name in SHIPPED {
        let shipped = list.as_array().and_then(|l| l.iter().find(|t| t["name"] == *name));
        check(shipped.is_some_and(|t| t["builtIn"] == true && t["source"] == "image"), || {
            format!("shipped template {name} in the list: {shipped:?}")
        })?;
    }

    // The OCI layout.
    let oci = import(api, OCI_NAME, Some(OCI_TAG), IMAGE_ARCHIVE_TYPE, &fixture.oci)?;
    templates.push(OCI_NAME);
    let digest = format!("sha256:{}", fixture.oci.sha256);
    check_template(api, &oci.body, OCI_NAME, OCI_TAG, "oci-archive", &digest, &expected_defaults("oci", None))?;
    let names = template_names(api)?;
    check(names.iter().any(|n| n == OCI_NAME), || format!("{OCI_NAME} is not in the list {names:?}"))?;
    let (oci_sid, oci_create_s) = created_sandbox(api, &json!({"templateID": OCI_NAME, "timeout": 0}))?;
    sandboxes.push(oci_sid.clone());
    check_image_sandbox(api, &oci_sid, "oci", "root")?;
    expect_in_use(api, OCI_NAME, &oci_sid)?;

    // The sandbox's disk as a template: the file written in it is there, the defaults carried over.
    let (status, _) =
        api.raw("PUT", &format!("/sandboxes/{oci_sid}/files?path={SAVED_FILE}"), SAVED_TEXT.as_bytes())?;
    check(status == 204, || format!("writing {SAVED_FILE} answered {status}"))?;
    let started = Instant::now();
    let saved = api.expect(201, "POST", &format!("/sandboxes/{oci_sid}/template"), &json!({"name": SAVED_NAME}))?;
    let save_s = started.elapsed().as_secs_f64();
    templates.push(SAVED_NAME);
    let saved_digest = format!("sandbox:{oci_sid}");
    check_template(api, &saved, SAVED_NAME, "latest", "sandbox", &saved_digest, &expected_defaults("oci", None))?;
    let (saved_sid, saved_create_s) = created_sandbox(api, &json!({"templateID": SAVED_NAME, "timeout": 0}))?;
    sandboxes.push(saved_sid.clone());
    check_image_sandbox(api, &saved_sid, "oci", "root")?;
    let (code, text, stderr) = api.run(&saved_sid, &format!("cat {SAVED_FILE}"), 30)?;
    check(code == 0 && text == SAVED_TEXT, || {
        format!("{SAVED_FILE} in a sandbox of {SAVED_NAME}: exit {code}, {text:?}, {stderr:?}")
    })?;
    expect_in_use(api, SAVED_NAME, &saved_sid)?;
    delete_sandbox(api, sandboxes, &saved_sid)?;
    delete_template(api, templates, SAVED_NAME)?;
    delete_sandbox(api, sandboxes, &oci_sid)?;
    delete_template(api, templates, OCI_NAME)?;

    // The docker-save archive; the create's envs win over the image's Env.
    let docker = import(api, DOCKER_NAME, None, IMAGE_ARCHIVE_TYPE, &fixture.docker)?;
    templates.push(DOCKER_NAME);
    let digest = format!("sha256:{}", fixture.docker.sha256);
    check_template(
        api,
        &docker.body,
        DOCKER_NAME,
        "latest",
        "docker-archive",
        &digest,
        &expected_defaults("docker", Some(DOCKER_USER)),
    )?;
    let body = json!({"templateID": DOCKER_NAME, "timeout": 0, "envs": {(IMAGE_ENV): "from-the-request"}});
    let (docker_sid, docker_create_s) = created_sandbox(api, &body)?;
    sandboxes.push(docker_sid.clone());
    check_image_sandbox(api, &docker_sid, "from-the-request", DOCKER_USER)?;
    expect_in_use(api, DOCKER_NAME, &docker_sid)?;
    delete_sandbox(api, sandboxes, &docker_sid)?;
    delete_template(api, templates, DOCKER_NAME)?;

    let after = template_names(api)?;
    check(after == before, || format!("the templates were {before:?} before, {after:?} after"))?;
    eprintln!(
        "[qemu-test]   OCI {:.1} MiB: 201 after {:.1}s ({:.1} MiB/s, body sent in {:.1}s), create {oci_create_s:.1}s; docker-save {:.1} MiB: 201 after {:.1}s ({:.1} MiB/s, body sent in {:.1}s), create {docker_create_s:.1}s; saved from a sandbox in {save_s:.1}s, create {saved_create_s:.1}s",
        fixture.oci.mib(),
        oci.answered.as_secs_f64(),
        mib_per_s(&fixture.oci, &oci),
        oci.sent.as_secs_f64(),
        fixture.docker.mib(),
        docker.answered.as_secs_f64(),
        mib_per_s(&fixture.docker, &docker),
        docker.sent.as_secs_f64(),
    );
    Ok(())
}

fn refused_archives(appliance: &mut Appliance) -> Result<()> {
    let fixture = fixture::build()?;
    let api = appliance.api();
    let before = template_names(&api)?;
    let result = run_refused(&api, &fixture, &before);
    // Nothing should exist under this name; if something was taken in, it goes.
    if template_names(&api).is_ok_and(|names| names.iter().any(|n| n == REFUSED_NAME)) {
        let _ = api.call("DELETE", &format!("/templates/{REFUSED_NAME}"), &Value::Null);
    }
    result
}

fn run_refused(api: &Api, fixture: &Fixture, before: &[String]) -> Result<()> {
    let mut seen = Vec::new();
    for hostile in &fixture.hostile {
        let path = format!("/templates?name={REFUSED_NAME}");
        let answer = api.upload(&path, hostile.content_type, &hostile.archive.path)?;
        check(answer.status == 400 && answer.body["error"].is_string(), || {
            format!("{}: expected 400 with an error, got {}: {}", hostile.what, answer.status, answer.body)
        })?;
        let (status, _) = api.call("GET", &format!("/templates/{REFUSED_NAME}"), &Value::Null)?;
        check(status == 404, || {
            format!("after refusing {}, GET /templates/{REFUSED_NAME} answered {status}", hostile.what)
        })?;
        let message = answer.body["error"].as_str().unwrap_or_default();
        seen.push(format!("{}: {}", hostile.what, message.chars().take(100).collect::<String>()));
    }
    // A Dockerfile build is not offered (400 saying what to do instead); other media types 415.
    let (status, body) =
        api.call("POST", &format!("/templates?name={REFUSED_NAME}"), &json!({"dockerfile": "FROM x"}))?;
    check(status == 400 && body["error"].is_string(), || format!("a JSON template build answered {status}: {body}"))?;
    let text_body = fixture.hostile.last().map(|h| h.archive.path.clone()).unwrap_or_default();
    let answer = api.upload(&format!("/templates?name={REFUSED_NAME}"), "text/plain", &text_body)?;
    check(answer.status == 415, || format!("a text/plain upload answered {}: {}", answer.status, answer.body))?;
    let after = template_names(api)?;
    check(after == before, || format!("the templates were {before:?} before the refusals, {after:?} after"))?;

    for name in SHIPPED {
        let (status, body) = api.call("DELETE", &format!("/templates/{name}"), &Value::Null)?;
        check(status == 403 && body["error"].is_string(), || {
            format!("DELETE /templates/{name} answered {status}: {body}")
        })?;
    }
    let (status, _) = api.call("DELETE", "/templates/no-such-template-e2e", &Value::Null)?;
    check(status == 404, || format!("DELETE of a template that does not exist answered {status}"))?;
    let after = template_names(api)?;
    check(after == before, || format!("the templates were {before:?}, {after:?} after the deletes"))?;
    eprintln!("[qemu-test]   refused with 400: {}", seen.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_one_sh_line_printing_every_key_once() {
        let out = std::process::Command::new("sh").arg("-c").arg(probe_line()).output().expect("sh");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let values = probe_values(&text);
        for (key, _) in probe_commands() {
            assert!(values.contains_key(key), "{key} missing in {text}");
        }
        assert_eq!(text.lines().count(), probe_commands().len(), "{text}");
    }
}
