//! Test images, built once per test process with umoci into an OCI layout, and pushed with skopeo.
//!
//! | name          | what                                                                   |
//! |---------------|------------------------------------------------------------------------|
//! | `small`       | linux/amd64, two layers of random bytes: ~1 MiB and ~3 MiB             |
//! | `other`       | linux/amd64, one ~512 KiB layer, different bytes                       |
//! | `multi-amd64` | linux/amd64, one ~256 KiB layer                                        |
//! | `multi-arm64` | linux/arm64, one ~256 KiB layer                                        |
//! | `multi`       | OCI index of `multi-amd64` and `multi-arm64` (push with `Format::All`,  |
//! |               | or `Format::V2s2` for a Docker manifest list of schema2 manifests)     |
//!
//! File contents are deterministic (a seeded PRNG, so gzip cannot shrink them); digests are not
//! (tar mtimes and config timestamps differ per build), so tests ask this module for digests.
//! Each image's manifest is known in both forms a push can produce: as laid out (OCI) and as
//! skopeo converts it with `--format v2s2` (computed once through a `dir:` copy, which yields the
//! same bytes as the push conversion).
//!
//! The layout lives in `target/tmp/images-<pid>-*` for the whole process; folders left by earlier
//! processes that are gone are removed when the next one builds.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::Digest as _;

use super::process::{describe, pid_alive, run};

/// What a push produces on the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The OCI manifest as built (digest unchanged by the push).
    Oci,
    /// `--format v2s2`: a Docker schema2 manifest (same config and layer blobs); for an index,
    /// `--format v2s2 --all`: a Docker manifest list of schema2 manifests.
    V2s2,
    /// `--all`: an index and every image it lists, unchanged (for `multi`; same as `Oci` otherwise).
    All,
}

/// One image in the layout, with everything tests need to know about it.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub name: String,
    /// The manifest (or index, for `multi`) bytes as laid out, and their digest.
    pub oci_manifest: Vec<u8>,
    pub oci_digest: String,
    /// The `--format v2s2` manifest (a Docker manifest list for an index) and its digest.
    pub v2s2_manifest: Vec<u8>,
    pub v2s2_digest: String,
    /// Config blob digest (None for an index).
    pub config: Option<String>,
    /// `(digest, size)` of each layer, in order (empty for an index).
    pub layers: Vec<(String, u64)>,
    /// For an index: the names of the images it lists, in order.
    pub children: Vec<String>,
}

impl BuiltImage {
    pub fn is_index(&self) -> bool {
        !self.children.is_empty()
    }
}

/// The layout and its images.
#[derive(Debug)]
pub struct Images {
    layout: PathBuf,
    policy: PathBuf,
    by_name: BTreeMap<String, BuiltImage>,
    _dir: tempfile::TempDir,
}

impl Images {
    /// The OCI layout folder (`oci:<layout>:<name>` references work).
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    /// `oci:<layout>:<name>` for skopeo.
    pub fn oci_ref(&self, name: &str) -> String {
        format!("oci:{}:{name}", self.layout.display())
    }

    /// A blob's bytes from the layout.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let p = self.layout.join("blobs/sha256").join(hex);
        fs::read(&p).unwrap_or_else(|e| panic!("read layout blob {}: {e}", p.display()))
    }
}

/// The images, built on first use (about a second) and kept for the process.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(build)
}

/// One image by name; panics on an unknown name.
pub fn image(name: &str) -> &'static BuiltImage {
    images()
        .by_name
        .get(name)
        .unwrap_or_else(|| panic!("no test image {name:?} (have: small, other, multi, multi-amd64, multi-arm64)"))
}

/// The digest the registry will report for `image` pushed in `format`.
pub fn manifest_digest(name: &str, format: Format) -> String {
    let img = image(name);
    match format {
        Format::Oci | Format::All => {
            assert!(
                format == Format::All || !img.is_index(),
                "{name} is an index: push it with Format::All or Format::V2s2"
            );
            img.oci_digest.clone()
        }
        Format::V2s2 => img.v2s2_digest.clone(),
    }
}

/// The manifest bytes the registry will serve for `image` pushed in `format`.
pub fn manifest_bytes(name: &str, format: Format) -> Vec<u8> {
    let img = image(name);
    match format {
        Format::Oci | Format::All => img.oci_manifest.clone(),
        Format::V2s2 => img.v2s2_manifest.clone(),
    }
}

/// The config digest of a (non-index) image.
pub fn config_digest(name: &str) -> String {
    image(name).config.clone().unwrap_or_else(|| panic!("{name} is an index: it has no config"))
}

/// Layer digests in order; for an index, every child's layers.
pub fn layer_digests(name: &str) -> Vec<String> {
    let img = image(name);
    if img.is_index() {
        return img.children.iter().flat_map(|c| layer_digests(c)).collect();
    }
    img.layers.iter().map(|(d, _)| d.clone()).collect()
}

/// Config and layer digests (what `GET /v2/<name>/blobs/<digest>` serves); for an index, every
/// child's. The same for both formats (the v2s2 conversion keeps the blobs).
pub fn blob_digests(name: &str) -> Vec<String> {
    let img = image(name);
    if img.is_index() {
        return img.children.iter().flat_map(|c| blob_digests(c)).collect();
    }
    let mut v = vec![config_digest(name)];
    v.extend(layer_digests(name));
    v
}

/// `skopeo copy` of `name` to `docker://<dest>` (e.g. `127.0.0.1:PORT/library/alpine:3.19`);
/// panics with skopeo's output on failure.
pub fn push(name: &str, dest: &str, format: Format) {
    let out = try_push(name, dest, format, None);
    assert!(out.status.success(), "push {name} to {dest} ({format:?}) failed: {}", describe(&out));
}

/// [`push`] with `--dest-creds user:pass`.
pub fn push_with_creds(name: &str, dest: &str, format: Format, user: &str, pass: &str) {
    let out = try_push(name, dest, format, Some((user, pass)));
    assert!(out.status.success(), "push {name} to {dest} ({format:?}) as {user} failed: {}", describe(&out));
}

/// The push itself, returning skopeo's output whatever happened.
pub fn try_push(name: &str, dest: &str, format: Format, creds: Option<(&str, &str)>) -> Output {
    let imgs = images();
    if format == Format::Oci {
        assert!(!image(name).is_index(), "{name} is an index: push it with Format::All or Format::V2s2");
    }
    let mut cmd = Command::new("skopeo");
    cmd.arg("copy").arg("--quiet").arg("--policy").arg(&imgs.policy).arg("--dest-tls-verify=false");
    match format {
        Format::Oci => {}
        Format::V2s2 => {
            cmd.args(["--format", "v2s2"]);
            if image(name).is_index() {
                cmd.arg("--all");
            }
        }
        Format::All => {
            cmd.arg("--all");
        }
    }
    if let Some((u, p)) = creds {
        cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    cmd.arg(imgs.oci_ref(name)).arg(format!("docker://{dest}"));
    run(&mut cmd, Duration::from_secs(120))
}

/// `DELETE /v2/<repo>/blobs/<digest>` on a registry without auth (needs `delete: enabled`, which
/// [`super::Registry`] sets): the blob stays on disk but the repository no longer links it, so the
/// image becomes partly present there. Panics unless the registry answers 202.
pub fn delete_blob(registry_url: &str, repo: &str, digest: &str) {
    let url = format!("{registry_url}/v2/{repo}/blobs/{digest}");
    let resp = super::http("DELETE", &url, &[]);
    assert_eq!(resp.status, 202, "DELETE {url}: {} {}", resp.status, resp.text());
}

/// Overwrites a blob's bytes in a registry's storage with as many different bytes (each byte
/// inverted), so the registry serves content that no longer matches its digest.
pub fn corrupt_blob(storage_dir: &Path, digest: &str) {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = storage_dir.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data");
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read blob {}: {e}", path.display()));
    let flipped: Vec<u8> = bytes.iter().map(|b| !b).collect();
    fs::write(&path, flipped).unwrap_or_else(|e| panic!("write blob {}: {e}", path.display()));
}

/// One single-platform image: each layer is one file of `size` random bytes from `seed`.
struct ImageSpec {
    name: &'static str,
    arch: &'static str,
    layers: &'static [(u64, usize)],
}

const SPECS: [ImageSpec; 4] = [
    ImageSpec { name: "small", arch: "amd64", layers: &[(1, 1 << 20), (2, 3 << 20)] },
    ImageSpec { name: "other", arch: "amd64", layers: &[(3, 512 << 10)] },
    ImageSpec { name: "multi-amd64", arch: "amd64", layers: &[(4, 256 << 10)] },
    ImageSpec { name: "multi-arm64", arch: "arm64", layers: &[(5, 256 << 10)] },
];

fn build() -> Images {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    remove_stale_layouts(&base);
    let dir = tempfile::Builder::new()
        .prefix(&format!("images-{}-", std::process::id()))
        .tempdir_in(&base)
        .expect("create image layout dir in target/tmp");
    let layout = dir.path().join("layout");
    let policy = dir.path().join("policy.json");
    fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("write policy.json");

    umoci(&["init", "--layout", path_str(&layout)]);
    for ImageSpec { name, arch, layers } in SPECS {
        let image = format!("{}:{name}", layout.display());
        umoci(&["new", "--image", &image]);
        for (seed, size) in layers {
            let src = dir.path().join(format!("src-{name}-{seed}"));
            fs::create_dir_all(&src).expect("create layer source dir");
            fs::write(src.join(format!("data-{seed}.bin")), random_bytes(*seed, *size)).expect("write layer content");
            umoci(&["insert", "--image", &image, path_str(&src), &format!("/data{seed}")]);
        }
        umoci(&["config", "--image", &image, "--os", "linux", "--architecture", arch]);
    }
    umoci(&["gc", "--layout", path_str(&layout)]);

    let mut by_name = BTreeMap::new();
    for ImageSpec { name, .. } in SPECS {
        by_name.insert(name.to_string(), describe_image(&layout, dir.path(), &policy, name));
    }
    let mut index = write_index(&layout, &by_name, "multi", &[("multi-amd64", "amd64"), ("multi-arm64", "arm64")]);
    index.v2s2_manifest = v2s2_form(&layout, dir.path(), &policy, "multi", true);
    index.v2s2_digest = sha256_digest(&index.v2s2_manifest);
    by_name.insert("multi".into(), index);
    Images { layout, policy, by_name, _dir: dir }
}

/// Reads `name`'s manifest from the layout and derives its v2s2 form with skopeo.
fn describe_image(layout: &Path, work: &Path, policy: &Path, name: &str) -> BuiltImage {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("read index.json"))
            .expect("parse index.json");
    let desc = index["manifests"]
        .as_array()
        .expect("index.json manifests")
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("{name} not in index.json"));
    let digest = desc["digest"].as_str().expect("descriptor digest").to_string();
    let manifest = fs::read(blob_path(layout, &digest)).expect("read manifest blob");
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).expect("parse manifest");
    let config = parsed["config"]["digest"].as_str().expect("config digest").to_string();
    let layers = parsed["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| (l["digest"].as_str().expect("layer digest").to_string(), l["size"].as_u64().expect("layer size")))
        .collect();

    let v2s2 = v2s2_form(layout, work, policy, name, false);
    BuiltImage {
        name: name.into(),
        oci_digest: sha256_digest(&manifest),
        oci_manifest: manifest,
        v2s2_digest: sha256_digest(&v2s2),
        v2s2_manifest: v2s2,
        config: Some(config),
        layers,
        children: Vec::new(),
    }
}

/// The manifest skopeo produces for `name` with `--format v2s2` (and `--all` for an index), taken
/// from a `dir:` copy: the conversion is deterministic, so a push produces the same bytes.
fn v2s2_form(layout: &Path, work: &Path, policy: &Path, name: &str, all: bool) -> Vec<u8> {
    let dir_copy = work.join(format!("v2s2-{name}"));
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--format", "v2s2", "--policy"]).arg(policy);
    if all {
        cmd.arg("--all");
    }
    cmd.arg(format!("oci:{}:{name}", layout.display())).arg(format!("dir:{}", dir_copy.display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "skopeo copy --format v2s2 {name} to dir: failed: {}", describe(&out));
    let v2s2 = fs::read(dir_copy.join("manifest.json")).expect("read v2s2 manifest.json");
    let _ = fs::remove_dir_all(&dir_copy);
    v2s2
}

/// umoci cannot make an index: write the index blob ourselves and tag it in `index.json`.
fn write_index(
    layout: &Path,
    images: &BTreeMap<String, BuiltImage>,
    name: &str,
    children: &[(&str, &str)],
) -> BuiltImage {
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|(child, arch)| {
            let img = &images[*child];
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": img.oci_digest,
                "size": img.oci_manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec(&index).expect("serialize index");
    let digest = sha256_digest(&bytes);
    fs::write(blob_path(layout, &digest), &bytes).expect("write index blob");

    let index_json_path = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_json_path).expect("read index.json")).expect("parse index.json");
    top["manifests"].as_array_mut().expect("index.json manifests").push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest,
        "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": name},
    }));
    fs::write(&index_json_path, serde_json::to_vec(&top).expect("serialize index.json")).expect("write index.json");
    BuiltImage {
        name: name.into(),
        oci_manifest: bytes,
        oci_digest: digest,
        v2s2_digest: String::new(), // filled in by the caller once the index is in index.json
        v2s2_manifest: Vec::new(),
        config: None,
        layers: Vec::new(),
        children: children.iter().map(|(c, _)| c.to_string()).collect(),
    }
}

fn umoci(args: &[&str]) {
    let out = run(Command::new("umoci").args(args), Duration::from_secs(60));
    assert!(out.status.success(), "umoci {args:?} failed: {}", describe(&out));
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").expect("sha256 digest"))
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `size` bytes from a splitmix64 stream seeded with `seed`: reproducible and incompressible.
pub fn random_bytes(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Removes `images-<pid>-*` folders whose process is gone.
fn remove_stale_layouts(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("images-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
