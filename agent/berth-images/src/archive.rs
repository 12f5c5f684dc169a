//! Writes OCI image-layout archives: what the appliance build does with a
//! shell script, here for tests and tools that need an image without a
//! registry.

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::hex_string;

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex_string(&Sha256::digest(bytes)))
}

/// An uncompressed layer holding `files` (path, content, mode), owned by root.
pub fn layer(files: &[(&str, &[u8], u32)]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(*mode);
        h.set_size(body.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *body)?;
    }
    b.into_inner()
}

/// Writes an archive of one image, tagged `reference`, with these layers
/// and this OCI config (`{"config": {"Cmd": [...], ...}}`).
pub fn write(
    path: &Path,
    reference: &str,
    layers: &[Vec<u8>],
    config: &serde_json::Value,
) -> io::Result<()> {
    let config = serde_json::to_vec(config)?;
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    for l in layers {
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(l), "size": l.len()
        }));
        blobs.push((digest(l), l.clone()));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": layer_descs,
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(&manifest),
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": reference}}],
    }))?;
    blobs.push((digest(&config), config));
    blobs.push((digest(&manifest), manifest));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, body: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, name, body)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (d, body) in &blobs {
        add(&format!("blobs/sha256/{}", &d[7..]), body)?;
    }
    std::fs::write(path, b.into_inner()?)
}
