//! `docker save` archives: manifest.json names the config and the layer tars of each image
//! (the first is unpacked). Layers are checked against their content-addressed names (newer
//! docker: `blobs/sha256/<hex>`) or else the config's `rootfs.diff_ids` (older docker:
//! `<id>/layer.tar`, uncompressed).

use serde::Deserialize;

use crate::config::{self, parse_json};
use crate::digest::Digest;
use crate::outer::{normalize, Outer};
use crate::{LayerRef, Plan, Refusal, Verify};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Image {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

pub(crate) fn plan(outer: &Outer) -> Result<Plan, Refusal> {
    let Some(bytes) = outer.read_json("manifest.json", "manifest.json")? else {
        return Err(Refusal::Invalid("the archive has no manifest.json".to_string()));
    };
    let images: Vec<Image> = parse_json(&bytes, "manifest.json")?;
    let Some(image) = images.first() else {
        return Err(Refusal::Invalid("manifest.json lists no images".to_string()));
    };
    let config_name = normalize(&image.config);
    let Some(config_bytes) = outer.read_json(&config_name, "the image config")? else {
        return Err(Refusal::Invalid(format!("the image config {config_name} is not in the archive")));
    };
    let config_digest = content_digest(&config_name).or_else(|| {
        let file_name = config_name.rsplit('/').next().unwrap_or_default();
        file_name.strip_suffix(".json").and_then(Digest::from_hex)
    });
    if let Some(digest) = config_digest.filter(|d| !d.matches_bytes(&config_bytes)) {
        return Err(Refusal::Invalid(format!("the image config ({digest}) does not match its digest")));
    }
    let parsed = config::parse(&config_bytes)?;
    if !parsed.diff_ids.is_empty() && parsed.diff_ids.len() != image.layers.len() {
        return Err(Refusal::Invalid(format!(
            "manifest.json lists {} layers but the image config's rootfs lists {}",
            image.layers.len(),
            parsed.diff_ids.len()
        )));
    }
    let mut layers = Vec::with_capacity(image.layers.len());
    for (i, name) in image.layers.iter().enumerate() {
        let member = normalize(name);
        let (label, verify) = if let Some(digest) = content_digest(&member) {
            (digest.to_string(), Verify::Blob(digest))
        } else if let Some(diff_id) = parsed.diff_ids.get(i) {
            let digest =
                Digest::parse(diff_id).map_err(|why| Refusal::Invalid(format!("the image config's rootfs: {why}")))?;
            (digest.to_string(), Verify::Tar(digest))
        } else {
            (member.clone(), Verify::Nothing)
        };
        layers.push(LayerRef { member, label, size: None, verify });
    }
    Ok(Plan { config: parsed.config, layers })
}

/// The digest a content-addressed member name (`blobs/sha256/<hex>`) promises.
fn content_digest(member: &str) -> Option<Digest> {
    member.strip_prefix("blobs/sha256/").and_then(Digest::from_hex)
}
