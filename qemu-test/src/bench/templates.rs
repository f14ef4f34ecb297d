//! `qemu-test bench templates`: in one booted test appliance, how fast an image archive becomes
//! a template (the OCI archive of template_fixture.rs, from the upload's first byte to the `201`,
//! which comes once the template is ready and its template snapshot taken), and whether its
//! sandboxes start as fast as those of the shipped `base`: create -> first command output,
//! alternating the two (and which goes first), `runs` times each. Target: imported within 10 %
//! of base (ratio <= 1.10).

use super::snapshot::{create_to_first_output, median, wait_for_base_snapshot};
use crate::harness::Appliance;
use crate::scenarios::templates::import;
use crate::template_fixture::{self as fixture, IMAGE_ARCHIVE_TYPE};
use image::err;
use image::error::Result;
use serde_json::{json, Value};

const NAME: &str = "bench-imported";
/// The target: sandboxes of an imported template start within 10 % of base's.
pub const TARGET_RATIO: f64 = 1.10;

pub struct TemplateBench {
    pub archive_mib: f64,
    /// Upload start to the 201.
    pub import_s: f64,
    /// Upload start to the last byte of the body sent.
    pub upload_s: f64,
    /// Whether the appliance took a template snapshot of the imported template.
    pub imported_snapshot: bool,
    pub base_ms: Vec<f64>,
    pub imported_ms: Vec<f64>,
}

impl TemplateBench {
    pub fn ratio(&self) -> f64 {
        let base = median(&self.base_ms);
        if base > 0.0 {
            median(&self.imported_ms) / base
        } else {
            0.0
        }
    }

    pub fn last_line(&self) -> String {
        format!(
            "template-bench import_mib={:.1} import_s={:.1} import_mib_per_s={:.2} base_create_ms={:.0} imported_create_ms={:.0} ratio={:.2}",
            self.archive_mib,
            self.import_s,
            self.archive_mib / self.import_s.max(0.001),
            median(&self.base_ms),
            median(&self.imported_ms),
            self.ratio()
        )
    }

    pub fn report(&self) -> String {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        let ratio = self.ratio();
        format!(
            "import of the OCI archive ({:.1} MiB): body sent in {:.1}s, 201 after {:.1}s{}\ncreate -> first command, base (ms): {}\ncreate -> first command, imported (ms): {}\ntarget ratio <= {TARGET_RATIO:.2}: {} ({ratio:.2})\n{}",
            self.archive_mib,
            self.upload_s,
            self.import_s,
            if self.imported_snapshot { "" } else { " (no template snapshot taken: its creates boot a kernel)" },
            list(&self.base_ms),
            list(&self.imported_ms),
            if ratio <= TARGET_RATIO { "met" } else { "not met" },
            self.last_line()
        )
    }
}

pub fn templates(runs: u32) -> Result<TemplateBench> {
    // Before the boot: a cold cache runs mmdebstrap.
    let fixture = fixture::build()?;
    let appliance = Appliance::boot_fresh()?;
    eprintln!(
        "[qemu-test] appliance up after {:.1}s; waiting for the template snapshots",
        appliance.boot_time.as_secs_f64()
    );
    let waited = wait_for_base_snapshot(&appliance)?;
    eprintln!(
        "[qemu-test] template snapshots ready after {:.1}s; importing {:.1} MiB",
        waited.as_secs_f64(),
        fixture.oci.mib()
    );
    let api = appliance.api();
    let console_before = appliance.console_len();
    let uploaded = import(&api, NAME, None, IMAGE_ARCHIVE_TYPE, &fixture.oci)?;
    let console = appliance.machine.console();
    let imported_snapshot =
        console.get(console_before..).is_some_and(|new| new.contains(&format!("template {NAME}: snapshot")));
    let mut bench = TemplateBench {
        archive_mib: fixture.oci.mib(),
        import_s: uploaded.answered.as_secs_f64(),
        upload_s: uploaded.sent.as_secs_f64(),
        imported_snapshot,
        base_ms: Vec::new(),
        imported_ms: Vec::new(),
    };
    eprintln!(
        "[qemu-test] imported in {:.1}s ({:.2} MiB/s; body sent in {:.1}s){}",
        bench.import_s,
        bench.archive_mib / bench.import_s.max(0.001),
        bench.upload_s,
        if imported_snapshot { "" } else { "; NO template snapshot of it was taken" }
    );
    let result = (|| {
        for n in 0..runs {
            // Alternate which goes first, so neither always follows the other's delete.
            let order: [(&str, bool); 2] =
                if n % 2 == 0 { [("base", false), (NAME, true)] } else { [(NAME, true), ("base", false)] };
            for (template, imported) in order {
                let (ms, id) = create_to_first_output(&api, &json!({"templateID": template, "timeout": 0}))?;
                api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
                eprintln!("[qemu-test] run {n}: {template} {ms:.0} ms");
                if imported {
                    bench.imported_ms.push(ms);
                } else {
                    bench.base_ms.push(ms);
                }
            }
        }
        Ok::<_, image::error::Error>(())
    })();
    let deleted = api.call("DELETE", &format!("/templates/{NAME}"), &Value::Null);
    result?;
    match deleted {
        Ok((204, _)) => Ok(bench),
        Ok((status, body)) => Err(err!("DELETE /templates/{NAME} after the runs answered {status}: {body}")),
        Err(e) => Err(e),
    }
}
