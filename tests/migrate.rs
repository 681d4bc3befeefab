//! `regmux inventory` and `regmux migrate` against real registries: an old mirror holding complete,
//! partial and manifest-only images, a multi-platform index and a tag that moved upstream; a copy target
//! (a plain registry that accepts pushes) and a warm target (a registry in proxy mode whose upstream is
//! the old mirror, as a Harbor proxy-cache project pointed at it would be).

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_regmux");

fn regmux(args: &[&str]) -> Output {
    run(Command::new(BIN).args(args), Duration::from_secs(120))
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: stdout {}\nstderr {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// The old mirror: alpine (complete, schema2), keycloak (partial: first layer gone), multi (an OCI index,
/// complete), mysql:8 (complete; the tag moved upstream since), bare (manifest only: every blob gone).
fn old_mirror(lab: &Lab) -> Registry {
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", old.addr()), Format::V2s2);
    push("other", &format!("{}/keycloak/keycloak:24.0", old.addr()), Format::Oci);
    delete_blob(&old.url(), "keycloak/keycloak", &layer_digests("other")[0]);
    push("multi", &format!("{}/multi/app:1", old.addr()), Format::All);
    push("small", &format!("{}/library/mysql:8", old.addr()), Format::Oci);
    push("multi-arm64", &format!("{}/bare/img:1", old.addr()), Format::Oci);
    for d in blob_digests("multi-arm64") {
        delete_blob(&old.url(), "bare/img", &d);
    }
    old
}

fn config(lab: &Lab, target: &str, old: &Registry) -> std::path::PathBuf {
    lab.write("regmux.toml", config_text(lab, target, old, "backends = [\"target\", \"old\"]"))
}

/// Backends `target` and `old`, and route `hub` (Docker Hub, default) with `route` added.
fn config_text(lab: &Lab, target: &str, old: &Registry, route: &str) -> String {
    format!(
        "{header}\n[backends.target]\nurl = \"{target}\"\n[backends.old]\nurl = \"{old}\"\n\
         [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\ndefault = true\n{route}\n",
        header = config_header(&lab.path().join("ledger.db")),
        old = old.url()
    )
}

fn inventory(cfg: &std::path::Path, extra: &[&str]) -> Value {
    let mut args = vec!["inventory", "--config", cfg.to_str().expect("utf-8"), "--backend", "old", "--format", "json"];
    args.extend_from_slice(extra);
    let out = regmux(&args);
    assert!(out.status.success(), "inventory: {}", String::from_utf8_lossy(&out.stderr));
    json_of(&out)
}

fn find<'a>(inv: &'a Value, repo: &str) -> &'a Value {
    inv.as_array()
        .expect("array")
        .iter()
        .find(|i| i["repository"] == repo)
        .unwrap_or_else(|| panic!("{repo} in {inv:#}"))
}

fn manifest_digest_on(reg: &Registry, repo: &str, reference: &str) -> Option<String> {
    let accept: Vec<(&str, &str)> = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
    .iter()
    .map(|t| ("Accept", *t))
    .collect();
    let r = http("GET", &format!("{}/v2/{repo}/manifests/{reference}", reg.url()), &accept);
    (r.status == 200).then(|| r.body_digest())
}

fn blob_is_whole_on(reg: &Registry, repo: &str, digest: &str) -> bool {
    let r = http("GET", &format!("{}/v2/{repo}/blobs/{digest}", reg.url()), &[]);
    r.status == 200 && r.complete && r.body_digest() == digest
}

#[test]
fn inventory_by_api_equals_inventory_by_storage() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let cfg = config(&lab, "http://127.0.0.1:1", &old);
    let by_api = inventory(&cfg, &[]);
    let storage = old.storage_dir();
    let by_storage = inventory(&cfg, &["--storage", storage.to_str().expect("utf-8")]);
    assert_eq!(by_api, by_storage, "the API and the storage folder give the same inventory");

    assert_eq!(find(&by_api, "library/alpine")["status"], "complete");
    assert_eq!(find(&by_api, "library/alpine")["digest"], manifest_digest("small", Format::V2s2));
    let kc = find(&by_api, "keycloak/keycloak");
    assert_eq!(kc["status"], "partial");
    assert_eq!(kc["missing"], serde_json::json!([layer_digests("other")[0]]));
    let multi = find(&by_api, "multi/app");
    assert_eq!(multi["status"], "complete");
    assert_eq!(multi["digest"], manifest_digest("multi", Format::All));
    assert_eq!(multi["platforms"].as_array().map(Vec::len), Some(2));
    assert_eq!(find(&by_api, "bare/img")["status"], "manifest-only");

    // Text: one repo:tag@digest per line, pasteable; --repo filters.
    let out =
        regmux(&["inventory", "--config", cfg.to_str().expect("utf-8"), "--backend", "old", "--repo", "library/*"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            format!("library/alpine:3.19@{}", manifest_digest("small", Format::V2s2)),
            format!("library/mysql:8@{}", manifest_digest("small", Format::Oci)),
        ]
    );
}

#[test]
fn migrate_copy_moves_complete_images_by_digest_and_reports_the_rest() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain());
    // Upstream moved mysql:8 since the old mirror cached it; the target already follows the new tag.
    push("other", &format!("{}/library/mysql:8", target.addr()), Format::Oci);
    let cfg = config(&lab, &target.url(), &old);
    let inv = lab.write("inventory.json", serde_json::to_vec(&inventory(&cfg, &[])).expect("json"));

    let c = cfg.to_str().expect("utf-8");
    let i = inv.to_str().expect("utf-8");
    let before_dry = target.requests().len();
    let dry = regmux(&["migrate", "--config", c, "--route", "hub", "--from", i, "--mode", "copy", "--dry-run"]);
    let dry_text = String::from_utf8_lossy(&dry.stdout);
    assert!(dry_text.contains("would move"), "{dry_text}");
    assert_eq!(manifest_digest_on(&target, "library/alpine", "3.19"), None, "a dry run moves nothing");
    // The dry run checks that the source holds every blob: partial images fail there too, not "would move".
    for (repo, lacks) in
        [("keycloak/keycloak", vec![layer_digests("other")[0].clone()]), ("bare/img", blob_digests("multi-arm64"))]
    {
        let line = dry_text.lines().find(|l| l.contains(repo)).unwrap_or_else(|| panic!("{repo}: {dry_text}"));
        assert!(line.starts_with("failed"), "{line}");
        for d in &lacks {
            assert!(line.contains(d.as_str()), "{d} named: {line}");
        }
    }
    assert_eq!(dry.status.code(), Some(1), "{dry_text}");
    let writes: Vec<String> = target.requests()[before_dry..]
        .iter()
        .filter(|r| r.method != "HEAD" && r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "a dry run only reads the target: {writes:?}");

    let out = regmux(&["migrate", "--config", c, "--route", "hub", "--from", i, "--mode", "copy", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "failures make a non-zero exit: {}", String::from_utf8_lossy(&out.stderr));
    let s = json_of(&out);
    let images = |k: &str| -> Vec<String> {
        s[k].as_array().expect(k).iter().map(|e| e["image"].as_str().expect("image").to_owned()).collect()
    };
    let moved = images("moved");
    for want in ["library/alpine:3.19@", "multi/app:1@", "library/mysql:8@"] {
        assert!(moved.iter().any(|m| m.starts_with(want)), "{want} moved: {s:#}");
    }
    let failed = &s["failed"];
    let kc =
        failed.as_array().expect("failed").iter().find(|f| f["image"].as_str().unwrap_or("").starts_with("keycloak"));
    let reason = kc.expect("keycloak failed")["reason"].as_str().expect("reason");
    assert!(reason.contains(&layer_digests("other")[0]), "the partial image's missing blob is named: {reason}");
    // Every missing digest is named, not only the first: bare/img lacks its config and its layer.
    let bare =
        failed.as_array().expect("failed").iter().find(|f| f["image"].as_str().unwrap_or("").starts_with("bare/img"));
    let reason = bare.expect("bare/img failed")["reason"].as_str().expect("reason");
    for d in blob_digests("multi-arm64") {
        assert!(reason.contains(&d), "{d} named in: {reason}");
    }
    // Nothing of a partial image is sent: the blob keycloak does have stayed home.
    for d in blob_digests("other").iter().filter(|d| **d != layer_digests("other")[0]) {
        assert!(!blob_is_whole_on(&target, "keycloak/keycloak", d), "{d} of a partial image was copied");
    }
    let stale = s["stale_tags"].to_string();
    assert!(stale.contains("library/mysql:8") && stale.contains(&manifest_digest("other", Format::Oci)), "{stale}");

    // Byte-identical digests on the target; tags set where free, never moved.
    assert_eq!(manifest_digest_on(&target, "library/alpine", "3.19"), Some(manifest_digest("small", Format::V2s2)));
    assert_eq!(manifest_digest_on(&target, "multi/app", "1"), Some(manifest_digest("multi", Format::All)));
    for child in ["multi-amd64", "multi-arm64"] {
        let d = manifest_digest(child, Format::Oci);
        assert_eq!(manifest_digest_on(&target, "multi/app", &d), Some(d.clone()));
    }
    let old_mysql = manifest_digest("small", Format::Oci);
    assert_eq!(manifest_digest_on(&target, "library/mysql", &old_mysql), Some(old_mysql.clone()), "moved by digest");
    assert_eq!(
        manifest_digest_on(&target, "library/mysql", "8"),
        Some(manifest_digest("other", Format::Oci)),
        "tag untouched"
    );
    for d in blob_digests("small") {
        assert!(blob_is_whole_on(&target, "library/alpine", &d), "{d}");
    }

    // A second run finds everything there.
    let again = json_of(&regmux(&[
        "migrate", "--config", c, "--route", "hub", "--from", i, "--mode", "copy", "--format", "json",
    ]));
    assert_eq!(again["moved"].as_array().map(Vec::len), Some(0), "{again:#}");
    assert_eq!(again["already"].as_array().map(Vec::len), Some(3), "{again:#}");
}

#[test]
fn migrate_warm_fills_a_proxy_cache_target() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let warm = Registry::start(lab.dir("warm"), RegistryOpts::plain().proxy(&old.url()));
    let cfg = config(&lab, &warm.url(), &old);
    let inv = lab.write("inventory.txt", {
        let out = regmux(&["inventory", "--config", cfg.to_str().expect("utf-8"), "--backend", "old"]);
        out.stdout
    });
    let out = regmux(&[
        "migrate",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--route",
        "hub",
        "--from",
        inv.to_str().expect("utf-8"),
        "--mode",
        "warm",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "failures make a non-zero exit: {}", String::from_utf8_lossy(&out.stderr));
    let s = json_of(&out);
    let moved = s["moved"].to_string();
    for want in ["library/alpine:3.19@", "multi/app:1@", "library/mysql:8@"] {
        assert!(moved.contains(want), "{want} warmed: {s:#}");
    }
    let reason_of = |repo: &str| -> String {
        let failed = s["failed"].as_array().expect("failed");
        let f = failed.iter().find(|f| f["image"].as_str().unwrap_or("").starts_with(repo));
        f.unwrap_or_else(|| panic!("{repo} failed: {s:#}"))["reason"].as_str().expect("reason").to_owned()
    };
    let kc = reason_of("keycloak/keycloak");
    assert!(kc.contains(&layer_digests("other")[0]), "the partial image's missing blob is named: {kc}");
    let bare = reason_of("bare/img");
    for d in blob_digests("multi-arm64") {
        assert!(bare.contains(&d), "every missing blob of the manifest-only image is named ({d}): {bare}");
    }

    // A distribution proxy stores a blob in a goroutine of its own, which may finish after the
    // response that warmed it (and needs the old mirror until then): wait for its files first.
    // It is served locally once the repository links it.
    let stored = |repo: &str, d: &str| {
        let hex = d.trim_start_matches("sha256:");
        warm.storage_dir().join(format!("docker/registry/v2/repositories/{repo}/_layers/sha256/{hex}/link")).exists()
    };
    let all: Vec<(&str, String)> = (blob_digests("small").into_iter().map(|d| ("library/alpine", d)))
        .chain(blob_digests("multi").into_iter().map(|d| ("multi/app", d)))
        .collect();
    wait_for("the warm target to store every warmed blob", Duration::from_secs(20), || {
        all.iter().all(|(repo, d)| stored(repo, d)).then_some(())
    });
    // The target holds the images now: with the old mirror gone it still serves every byte.
    drop(old);
    assert_eq!(
        manifest_digest_on(&warm, "library/alpine", &manifest_digest("small", Format::V2s2)),
        Some(manifest_digest("small", Format::V2s2))
    );
    for d in blob_digests("small") {
        assert!(blob_is_whole_on(&warm, "library/alpine", &d), "{d} cached in the warm target");
    }
    for d in blob_digests("multi") {
        assert!(blob_is_whole_on(&warm, "multi/app", &d), "{d} cached in the warm target");
    }
    // The index and each platform's manifest, and mysql by the old mirror's digest, all by digest.
    let index = manifest_digest("multi", Format::All);
    assert_eq!(manifest_digest_on(&warm, "multi/app", &index), Some(index.clone()));
    for child in ["multi-amd64", "multi-arm64"] {
        let d = manifest_digest(child, Format::Oci);
        assert_eq!(manifest_digest_on(&warm, "multi/app", &d), Some(d.clone()), "{child}");
    }
    let mysql = manifest_digest("small", Format::Oci);
    assert_eq!(manifest_digest_on(&warm, "library/mysql", &mysql), Some(mysql.clone()));
}

#[test]
fn migrate_resumes_after_kill_9_without_sending_twice() {
    let lab = Lab::new();
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    let images = ["small", "other", "multi-amd64", "multi-arm64"];
    let mut lines = String::new();
    for (n, img) in images.iter().cycle().take(8).enumerate() {
        push(img, &format!("{}/r{n}/img:1", old.addr()), Format::Oci);
        lines.push_str(&format!("r{n}/img:1@{}\n", manifest_digest(img, Format::Oci)));
    }
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain());
    let cfg = config(&lab, &target.url(), &old);
    let inv = lab.write("inventory.txt", &lines);
    let args = [
        "migrate",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--route",
        "hub",
        "--from",
        inv.to_str().expect("utf-8"),
        "--concurrency",
        "1",
        "--format",
        "json",
    ];

    let mut first =
        ChildGuard::spawn("migrate", Command::new(BIN).args(args).stdout(std::process::Stdio::null()), None);
    wait_for("the first image on the target", Duration::from_secs(60), || {
        target
            .requests()
            .iter()
            .any(|r| r.method == "PUT" && r.path.contains("/manifests/") && r.status == 201)
            .then_some(())
    });
    run(Command::new("kill").args(["-9", &first.pid().to_string()]), Duration::from_secs(5));
    first.wait_exit(Duration::from_secs(10));
    let uploads_before: Vec<String> = blob_uploads(&target);

    let out = regmux(&args);
    assert!(out.status.success(), "the re-run finishes: {}", String::from_utf8_lossy(&out.stderr));
    let s = json_of(&out);
    let (moved, already) = (s["moved"].as_array().map_or(0, Vec::len), s["already"].as_array().map_or(0, Vec::len));
    assert_eq!(moved + already, 8, "{s:#}");
    assert!(already >= 1, "what the killed run finished is skipped: {s:#}");
    assert!(moved >= 1, "the kill came before the end, so the re-run had work left: {s:#}");
    for (n, img) in images.iter().cycle().take(8).enumerate() {
        assert_eq!(manifest_digest_on(&target, &format!("r{n}/img"), "1"), Some(manifest_digest(img, Format::Oci)));
    }
    // No blob's bytes were uploaded twice anywhere, across both runs and all eight repositories: a
    // layer already in one repository of the target (pushed by the killed run, or found there by the
    // re-run) is mounted into the next one.
    let uploads = blob_uploads(&target);
    let mut seen = std::collections::HashSet::new();
    for u in &uploads {
        let digest = u.split(' ').nth(1).expect("repo digest");
        assert!(
            seen.insert(digest.to_owned()),
            "{u}: uploaded twice (before the kill: {uploads_before:?}; all: {uploads:?})"
        );
    }
    let mounts: Vec<String> = target
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 201 && r.path.contains("mount=") && r.path.contains("from="))
        .map(|r| r.path.clone())
        .collect();
    assert!(!mounts.is_empty(), "cross-repository mounts answered 201: {:?}", target.requests());
}

/// `repo digest` of every completed blob upload (a PUT with `digest=` that got 201).
fn blob_uploads(reg: &Registry) -> Vec<String> {
    reg.requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.status == 201 && r.path.contains("/blobs/uploads/"))
        .filter_map(|r| {
            let repo = r.path.strip_prefix("/v2/")?.split("/blobs/").next()?.to_owned();
            let digest = r.path.split("digest=").nth(1)?.split('&').next()?.replace("%3A", ":");
            Some(format!("{repo} {digest}"))
        })
        .collect()
}

#[test]
fn migrate_from_the_ledger_resolves_the_misses() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain());
    let cfg = config(&lab, &target.url(), &old);
    let config_text = std::fs::read_to_string(&cfg).expect("config");
    let rx = Regmux::start(BIN, lab.dir("regmux"), &config_text);
    // A pull through regmux: the target lacks everything, the old mirror serves it.
    let conf = write_registries_conf(lab.path(), "docker.io", &format!("{}/docker.io", rx.addr()));
    let out = skopeo_copy_via_mirror(&conf, "docker.io/library/alpine:3.19", &lab.path().join("pulled"));
    assert!(out.status.success(), "pull: {}", String::from_utf8_lossy(&out.stderr));
    let c = rx.config_path().to_str().expect("utf-8").to_owned();
    let open = |c: &str| -> u64 {
        let out = regmux(&["misses", "--config", c, "--format", "json"]);
        json_of(&out)[0]["open_misses"].as_u64().expect("open_misses")
    };
    // Four misses: the manifest, the config and the two layers of `small`. Waiting for fewer races the
    // ledger's batch commit, and a miss recorded after migrate has read the ledger stays open.
    wait_for("the fallbacks in the ledger", Duration::from_secs(5), || (open(&c) == 4).then_some(()));

    let out = regmux(&["migrate", "--config", &c, "--route", "hub", "--from-ledger", "--mode", "copy"]);
    assert!(
        out.status.success(),
        "migrate: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(manifest_digest_on(&target, "library/alpine", "3.19"), Some(manifest_digest("small", Format::V2s2)));
    assert_eq!(open(&c), 0, "migrate marked the misses it brought over as resolved");
}

/// The shadow phase: the old mirror first, `warm = true`; pulls through regmux fill the target (a
/// proxy-cache registry of the old mirror) in the background, and the ledger's misses resolve.
#[test]
fn background_warming_fills_the_target_from_pulls() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain().proxy(&old.url()));
    let config =
        config_text(&lab, &target.url(), &old, "backends = [\"old\", \"target\"]\ntarget = \"target\"\nwarm = true");
    let rx = Regmux::start(BIN, lab.dir("regmux"), &config);
    let conf = write_registries_conf(lab.path(), "docker.io", &format!("{}/docker.io", rx.addr()));
    let stored = |repo: &str, d: &str| {
        let hex = d.trim_start_matches("sha256:");
        target.storage_dir().join(format!("docker/registry/v2/repositories/{repo}/_layers/sha256/{hex}/link")).exists()
    };
    // Every object of an image is warmed once through the target, in the background, into the
    // repository the client pulled. library/mysql:8 shares every blob with library/alpine:3.19, so
    // its blobs are warmed again, into library/mysql: the target keeps blobs per repository.
    let mut warmed = 0;
    let c = rx.config_path().to_str().expect("utf-8").to_owned();
    for (image, repo, format) in
        [("alpine:3.19", "library/alpine", Format::V2s2), ("mysql:8", "library/mysql", Format::Oci)]
    {
        let out = skopeo_copy_via_mirror(
            &conf,
            &format!("docker.io/library/{image}"),
            &lab.path().join(repo.replace('/', "-")),
        );
        assert!(out.status.success(), "pull {image}: {}", String::from_utf8_lossy(&out.stderr));
        let manifest = manifest_digest("small", format);
        let wanted: Vec<String> = blob_digests("small").into_iter().chain([manifest.clone()]).collect();
        warmed += wanted.len();
        let prefix = format!("/v2/{repo}/");
        wait_for(&format!("the target to have fetched every object of {repo}"), Duration::from_secs(20), || {
            let reqs = target.requests();
            wanted
                .iter()
                .all(|d| {
                    reqs.iter().any(|r| {
                        r.method == "GET"
                            && r.path.starts_with(&prefix)
                            && r.path.ends_with(d.as_str())
                            && r.status == 200
                    })
                })
                .then_some(())
        });
        // The proxy stores what it fetched in a goroutine of its own (one digest at a time): wait
        // for its files before the next image asks for the same digests.
        wait_for(&format!("the target to store the blobs of {repo}"), Duration::from_secs(20), || {
            blob_digests("small").iter().all(|d| stored(repo, d)).then_some(())
        });
        wait_for("the misses to be resolved by warming", Duration::from_secs(10), || {
            let report = json_of(&regmux(&["misses", "--config", &c, "--format", "json"]));
            (report[0]["open_misses"] == 0 && report[0]["requests"].as_u64() >= Some(4)).then_some(())
        });
    }
    let warms = rx.logs().lines().filter(|l| l.contains("warmed")).count();
    assert_eq!(warms, warmed, "each object warmed exactly once per repository:\n{}", rx.logs());

    // The target can now serve both images on its own.
    drop(rx);
    drop(old);
    for repo in ["library/alpine", "library/mysql"] {
        for d in blob_digests("small") {
            assert!(blob_is_whole_on(&target, repo, &d), "{d} in {repo} on the target");
        }
    }
}

/// `--to` names the backend that receives the images, whatever the route's own target is.
#[test]
fn migrate_to_names_the_target_backend() {
    let lab = Lab::new();
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    push("small", &format!("{}/library/alpine:3.19", old.addr()), Format::V2s2);
    push("multi", &format!("{}/multi/app:1", old.addr()), Format::All);
    let usual = Registry::start(lab.dir("usual"), RegistryOpts::plain());
    let named = Registry::start(lab.dir("named"), RegistryOpts::plain());
    // The route's target is `target` (its first backend); `named` is another backend of the file.
    let cfg = lab.write(
        "regmux.toml",
        format!(
            "{}[backends.named]\nurl = \"{}\"\n",
            config_text(&lab, &usual.url(), &old, "backends = [\"target\", \"old\"]"),
            named.url()
        ),
    );
    let inv = lab.write(
        "inventory.txt",
        format!(
            "library/alpine:3.19@{}\nmulti/app:1@{}\n",
            manifest_digest("small", Format::V2s2),
            manifest_digest("multi", Format::All)
        ),
    );
    let (c, i) = (cfg.to_str().expect("utf-8"), inv.to_str().expect("utf-8"));
    let out = regmux(&["migrate", "--config", c, "--route", "hub", "--from", i, "--to", "named", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_of(&out)["moved"].as_array().map(Vec::len), Some(2));
    assert_eq!(manifest_digest_on(&named, "library/alpine", "3.19"), Some(manifest_digest("small", Format::V2s2)));
    assert_eq!(manifest_digest_on(&named, "multi/app", "1"), Some(manifest_digest("multi", Format::All)));
    for d in blob_digests("small") {
        assert!(blob_is_whole_on(&named, "library/alpine", &d), "{d}");
    }
    assert_eq!(manifest_digest_on(&usual, "library/alpine", "3.19"), None, "the route's own target got nothing");
    let writes = usual.requests().iter().filter(|r| r.method != "GET" && r.method != "HEAD").count();
    assert_eq!(writes, 0, "{:?}", usual.requests());
}

/// A catalog and a tag list longer than a page: with two entries per page, every repository and every
/// tag is still there (the registry's `Link` is followed), and the answer equals the one-page read.
#[test]
fn inventory_reads_every_page() {
    use regmux::migrate::inventory::{inventory as inventory_of, Source};
    let lab = Lab::new();
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    let repos = ["a/one", "a/two", "b/three", "c/four", "d/five"];
    for r in repos {
        push("multi-amd64", &format!("{}/{r}:1", old.addr()), Format::Oci);
    }
    for t in ["2", "3", "4"] {
        push("multi-arm64", &format!("{}/a/one:{t}", old.addr()), Format::Oci);
    }
    let cfg: regmux::config::BackendConfig = toml::from_str(&format!("url = \"{}\"", old.url())).expect("config");
    let backend = std::sync::Arc::new(
        regmux::backend::Backend::new("old", &cfg, std::sync::Arc::new(regmux::metrics::Metrics::new()))
            .expect("backend"),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let paged = rt.block_on(inventory_of(&Source::api_with_page(backend.clone(), 2), None, 4)).expect("paged");
    let whole = rt.block_on(inventory_of(&Source::api(backend), None, 4)).expect("one page");
    let listed: Vec<String> = paged.iter().map(|i| format!("{}:{}", i.repository, i.tag)).collect();
    assert_eq!(listed, ["a/one:1", "a/one:2", "a/one:3", "a/one:4", "a/two:1", "b/three:1", "c/four:1", "d/five:1"]);
    assert_eq!(paged, whole);
    let catalog_pages =
        old.requests().iter().filter(|r| r.path.starts_with("/v2/_catalog?") && r.path.contains("n=2")).count();
    assert!(catalog_pages >= 3, "five repositories, two a page: {:?}", old.requests());
}

/// A copy target with token auth: the token regmux asks for covers the repository it pushes to,
/// and a registry also wants pull on the repository a blob is mounted from. A refused mount must
/// not fail the image: regmux uploads the blob instead. (library/mysql:8 shares every blob with
/// library/alpine:3.19, so its blobs are mount candidates.)
#[test]
fn copy_to_a_token_target_uploads_when_a_mount_is_refused() {
    let lab = Lab::new();
    let old = old_mirror(&lab);
    let issuer = TokenIssuer::start(lab.dir("token"), TokenOpts::default());
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain().token(&issuer));
    let (admin, admin_pass) = issuer.admin_creds();
    let cfg = lab.write(
        "regmux.toml",
        config_text(&lab, &target.url(), &old, "backends = [\"target\", \"old\"]").replace(
            &format!("url = \"{}\"\n", target.url()),
            &format!("url = \"{}\"\nusername = \"{admin}\"\npassword = \"{admin_pass}\"\n", target.url()),
        ),
    );
    let inv = lab.write(
        "inventory.txt",
        format!(
            "library/alpine:3.19@{}\nlibrary/mysql:8@{}\n",
            manifest_digest("small", Format::V2s2),
            manifest_digest("small", Format::Oci)
        ),
    );
    let (c, i) = (cfg.to_str().expect("utf-8"), inv.to_str().expect("utf-8"));
    let out = regmux(&[
        "migrate",
        "--config",
        c,
        "--route",
        "hub",
        "--from",
        i,
        "--mode",
        "copy",
        "--concurrency",
        "1",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_of(&out)["moved"].as_array().map(Vec::len), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    let mounts: Vec<_> =
        target.requests().into_iter().filter(|r| r.method == "POST" && r.path.contains("mount=")).collect();
    assert!(!mounts.is_empty(), "regmux tried a cross-repository mount: {:?}", target.requests());
    let token = issuer.fetch_token("repository:library/mysql:pull", Some((admin, admin_pass)));
    for d in blob_digests("small") {
        let r = http(
            "GET",
            &format!("{}/v2/library/mysql/blobs/{d}", target.url()),
            &[("Authorization", &format!("Bearer {token}"))],
        );
        assert!(
            r.status == 200 && r.complete && r.body_digest() == d,
            "{d} in library/mysql on the target: {}",
            r.status
        );
    }
}
