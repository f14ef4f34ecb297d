//! OCI image layouts: index.json (and one nested image index), the manifest of the linux/amd64
//! image, its config, and its layers, each blob checked against its descriptor. Only index.json
//! and the blobs are needed (oci-layout is not read); image indexes and manifests may use the
//! OCI or the docker (schema 2) media types.

use serde::Deserialize;

use crate::config::{self, parse_json};
use crate::digest::Digest;
use crate::outer::Outer;
use crate::{LayerRef, Plan, Refusal, Verify};

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
/// Tar layers, uncompressed, gzip or zstd (the bytes decide which: see the crate doc).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
/// The platform the appliance runs sandboxes for.
const OS: &str = "linux";
const ARCHITECTURE: &str = "amd64";

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// A blob's own mediaType field, for descriptors that do not say what they point to.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
}

pub(crate) fn plan(outer: &Outer) -> Result<Plan, Refusal> {
    let Some(bytes) = outer.read_json("index.json", "index.json")? else {
        return Err(Refusal::Invalid("the archive has no index.json".to_string()));
    };
    let index: Index = parse_json(&bytes, "index.json")?;
    let mut chosen = choose(&index.manifests, "index.json")?;
    let mut bytes = read_blob(outer, chosen, "the manifest")?;
    if is_index(chosen, &bytes)? {
        let nested: Index = parse_json(&bytes, "the nested image index")?;
        chosen = choose(&nested.manifests, "the nested image index")?;
        bytes = read_blob(outer, chosen, "the image manifest")?;
        if is_index(chosen, &bytes)? {
            return Err(Refusal::Invalid("the image index nests more than one level of indexes".to_string()));
        }
    }
    let manifest: Manifest = parse_json(&bytes, "the image manifest")?;
    let config = config::parse(&read_blob(outer, &manifest.config, "the image config")?)?.config;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        let digest = Digest::parse(&layer.digest).map_err(|why| Refusal::Invalid(format!("layer {}: {why}", i + 1)))?;
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(Refusal::Invalid(format!(
                "layer {} ({digest}) has media type {:?}, which is not a tar layer this appliance unpacks",
                i + 1,
                layer.media_type
            )));
        }
        layers.push(LayerRef {
            member: digest.blob_path(),
            label: digest.to_string(),
            size: Some(layer.size),
            verify: Verify::Blob(digest),
        });
    }
    Ok(Plan { config, layers })
}

/// The linux/amd64 entry when the entries name platforms, else the first.
fn choose<'a>(manifests: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, Refusal> {
    let Some(first) = manifests.first() else {
        return Err(Refusal::Invalid(format!("{what} lists no manifests")));
    };
    if manifests.iter().all(|m| m.platform.is_none()) {
        return Ok(first);
    }
    let ours = |p: &Platform| p.os == OS && p.architecture == ARCHITECTURE;
    if let Some(found) = manifests.iter().find(|m| m.platform.as_ref().is_some_and(ours)) {
        return Ok(found);
    }
    let offered: Vec<String> =
        manifests.iter().filter_map(|m| m.platform.as_ref()).map(|p| format!("{}/{}", p.os, p.architecture)).collect();
    Err(Refusal::Invalid(format!("{what} has no {OS}/{ARCHITECTURE} image (it has {})", offered.join(", "))))
}

/// Whether a manifest descriptor points to an image index rather than an image manifest: by its
/// media type, or the blob's own when the descriptor has none.
fn is_index(descriptor: &Descriptor, bytes: &[u8]) -> Result<bool, Refusal> {
    let media_type = if descriptor.media_type.is_empty() {
        let shape: Shape = parse_json(bytes, "the image manifest")?;
        if shape.media_type.is_empty() {
            return Ok(shape.manifests.is_some());
        }
        shape.media_type
    } else {
        descriptor.media_type.clone()
    };
    if INDEX_TYPES.contains(&media_type.as_str()) {
        return Ok(true);
    }
    if MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Ok(false);
    }
    Err(Refusal::Invalid(format!("the image manifest has media type {media_type:?}, which is not an image manifest")))
}

/// A JSON blob named by a descriptor, checked against its size and digest.
fn read_blob(outer: &Outer, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, Refusal> {
    let digest = Digest::parse(&descriptor.digest).map_err(|why| Refusal::Invalid(format!("{what}: {why}")))?;
    let Some(bytes) = outer.read_json(&digest.blob_path(), &format!("{what} ({digest})"))? else {
        return Err(Refusal::Invalid(format!("{what} ({digest}) is not in the archive")));
    };
    if bytes.len() as u64 != descriptor.size {
        return Err(Refusal::Invalid(format!(
            "{what} ({digest}) is {} bytes; its descriptor says {}",
            bytes.len(),
            descriptor.size
        )));
    }
    if !digest.matches_bytes(&bytes) {
        return Err(Refusal::Invalid(format!("{what} ({digest}) does not match its digest")));
    }
    Ok(bytes)
}
