//! The migration ledger and everything that reads it or reports beside it, against the real `regmux`
//! binary in front of two real registries: "target" (the migration target, playing Harbor) and "old"
//! (the old mirror), route backends `["target", "old"]`.
//!
//! - what gets recorded (`fallback`, `absent`, `error`, traffic per backend), read straight from the
//!   SQLite file while regmux runs, and what `regmux misses` makes of it;
//! - resolution: a miss closes once the target serves the object;
//! - durability: SIGTERM flushes; `kill -9` under load, five times over the same file, leaves a sound
//!   database missing at most the last second;
//! - `/metrics` counters against the traffic sent (and the backends' own access logs);
//! - `/healthz`, `/readyz` following a backend that stops and comes back;
//! - `/ui` rendered by a real headless Chromium.
//!
//! Assertions that describe independent facts are collected ([`Checks`]) and reported together, so
//! one failing run names every discrepancy at once.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::OpenFlags;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_regmux");

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A blob digest no registry has.
const NO_SUCH_BLOB: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// How long a finished request may take to reach the database (the issue says 1 s; the rest is polling).
const WRITTEN_WITHIN: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------------
// Setup

/// The default route "hub": target first, old mirror as fallback.
const HUB_ROUTE: &str =
    "[[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\nbackends = [\"target\", \"old\"]\ndefault = true\n";

fn config_toml(ledger: &Path, target: &Registry, old: &Registry, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [ledger]\npath = \"{ledger}\"\n\n\
         [backends.target]\nurl = \"{target}\"\n\n[backends.old]\nurl = \"{old}\"\n\n{routes}",
        ledger = ledger.display(),
        target = target.url(),
        old = old.url(),
    )
}

/// Both registries, started side by side (each takes about 1.5 s to answer).
fn start_registries(lab: &Lab) -> (Registry, Registry) {
    let (target_dir, old_dir) = (lab.dir("target"), lab.dir("old"));
    thread::scope(|s| {
        let t = s.spawn(|| Registry::start(&target_dir, RegistryOpts::plain()));
        let o = s.spawn(|| Registry::start(&old_dir, RegistryOpts::plain()));
        (t.join().expect("start target registry"), o.join().expect("start old registry"))
    })
}

/// Pushes run side by side: `(image, registry addr, repo:tag)`.
fn push_all(pushes: &[(&str, String, &str)]) {
    thread::scope(|s| {
        for (image, addr, dest) in pushes {
            s.spawn(move || push(image, &format!("{addr}/{dest}"), Format::Oci));
        }
    });
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs() as i64
}

// ---------------------------------------------------------------------------------------------------
// Requests and what they should count as

/// Accept as real clients send it: one header line per media type.
fn accept_all() -> Vec<(&'static str, &'static str)> {
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].into_iter().map(|t| ("Accept", t)).collect()
}

fn get_manifest(base: &str, repo: &str, reference: &str) -> Response {
    http("GET", &format!("{base}/v2/{repo}/manifests/{reference}"), &accept_all())
}

fn get_blob(base: &str, repo: &str, digest: &str) -> Response {
    http("GET", &format!("{base}/v2/{repo}/blobs/{digest}"), &[])
}

/// Requests and body bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    requests: u64,
    bytes: u64,
}

/// `(route, backend)` → tally; backend `""` when nothing served.
type Traffic = BTreeMap<(String, String), Tally>;

fn credit(t: &mut Traffic, route: &str, backend: &str, bytes: u64) {
    let e = t.entry((route.to_string(), backend.to_string())).or_default();
    e.requests += 1;
    e.bytes += bytes;
}

fn size_of_blob(digest: &str) -> u64 {
    images().blob(digest).len() as u64
}

/// Pulls `image` (pushed as OCI) through regmux as `url_repo:tag`: the manifest by tag, then every
/// blob, each checked byte for byte. Credits every request and its size to `route`/`backend`.
fn pull(base: &str, url_repo: &str, tag: &str, image: &str, route: &str, backend: &str, sent: &mut Traffic) {
    let m = get_manifest(base, url_repo, tag);
    assert_eq!(m.status, 200, "GET manifest {url_repo}:{tag}: {}", m.text());
    assert_eq!(m.body, manifest_bytes(image, Format::Oci), "manifest {url_repo}:{tag}");
    credit(sent, route, backend, m.body.len() as u64);
    for d in blob_digests(image) {
        let b = get_blob(base, url_repo, &d);
        assert_eq!(b.status, 200, "GET blob {url_repo}@{d}: {}", b.text());
        assert!(b.complete, "blob {d} complete");
        assert_eq!(b.body_digest(), d);
        credit(sent, route, backend, size_of_blob(&d));
    }
}

/// The content bytes of an image pulled as in [`pull`].
fn image_bytes(image: &str) -> u64 {
    manifest_bytes(image, Format::Oci).len() as u64 + blob_digests(image).iter().map(|d| size_of_blob(d)).sum::<u64>()
}

// ---------------------------------------------------------------------------------------------------
// Reading the ledger with rusqlite

#[derive(Debug, Clone, PartialEq, Eq)]
struct MissRow {
    route: String,
    repository: String,
    reference: String,
    kind: String,
    outcome: String,
    digest: Option<String>,
    served_by: Option<String>,
    count: i64,
    first_seen: i64,
    last_seen: i64,
    resolved_at: Option<i64>,
    resolved_by: Option<String>,
}

/// Read-only, as `regmux misses` and any reader would while regmux writes (WAL).
fn open_ledger(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open ledger {} read-only: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(5)).expect("busy_timeout");
    c
}

fn miss_rows_in(c: &rusqlite::Connection) -> Vec<MissRow> {
    let mut st = c
        .prepare(
            "SELECT route, repository, reference, kind, outcome, digest, served_by, count, first_seen, last_seen,
                    resolved_at, resolved_by
             FROM misses ORDER BY route, repository, reference, kind, outcome",
        )
        .expect("prepare misses query");
    let rows = st
        .query_map([], |r| {
            Ok(MissRow {
                route: r.get(0)?,
                repository: r.get(1)?,
                reference: r.get(2)?,
                kind: r.get(3)?,
                outcome: r.get(4)?,
                digest: r.get(5)?,
                served_by: r.get(6)?,
                count: r.get(7)?,
                first_seen: r.get(8)?,
                last_seen: r.get(9)?,
                resolved_at: r.get(10)?,
                resolved_by: r.get(11)?,
            })
        })
        .expect("query misses");
    rows.collect::<Result<_, _>>().expect("read misses rows")
}

/// Traffic summed over hours (a test may straddle an hour boundary).
fn traffic_in(c: &rusqlite::Connection) -> Traffic {
    let mut st = c
        .prepare("SELECT route, backend, sum(requests), sum(bytes) FROM traffic GROUP BY route, backend")
        .expect("prepare traffic query");
    let rows = st
        .query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                Tally { requests: r.get::<_, i64>(2)? as u64, bytes: r.get::<_, i64>(3)? as u64 },
            ))
        })
        .expect("query traffic");
    rows.collect::<Result<_, _>>().expect("read traffic rows")
}

fn miss_rows(path: &Path) -> Vec<MissRow> {
    miss_rows_in(&open_ledger(path))
}

fn traffic(path: &Path) -> Traffic {
    traffic_in(&open_ledger(path))
}

fn total_requests(t: &Traffic) -> u64 {
    t.values().map(|v| v.requests).sum()
}

/// Polls until the ledger holds as many traffic requests as were sent, within [`WRITTEN_WITHIN`]
/// (a request is written within a second of its answer); then returns what it holds.
fn wait_ledger(path: &Path, sent: &Traffic) -> (Vec<MissRow>, Traffic) {
    wait_ledger_requests(path, total_requests(sent))
}

fn wait_ledger_requests(path: &Path, want: u64) -> (Vec<MissRow>, Traffic) {
    let deadline = Instant::now() + WRITTEN_WITHIN;
    loop {
        let c = open_ledger(path);
        let t = traffic_in(&c);
        if total_requests(&t) >= want || Instant::now() >= deadline {
            return (miss_rows_in(&c), t);
        }
        drop(c);
        thread::sleep(Duration::from_millis(25));
    }
}

/// The row for one key, if any.
fn row<'a>(rows: &'a [MissRow], repository: &str, reference: &str, kind: &str, outcome: &str) -> Option<&'a MissRow> {
    rows.iter()
        .find(|r| r.repository == repository && r.reference == reference && r.kind == kind && r.outcome == outcome)
}

/// A share as regmux reports it: percent with one decimal; 100 when there was no traffic.
fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (part as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

fn log_tail(regmux: &Regmux) -> String {
    let logs = regmux.logs();
    let lines: Vec<&str> = logs.lines().collect();
    format!("regmux log (last lines):\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
}

// ---------------------------------------------------------------------------------------------------
// `regmux misses`

fn misses_cli(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("misses").arg("--config").arg(config).args(args);
    run(&mut cmd, Duration::from_secs(30))
}

fn misses_json(config: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let out = misses_cli(config, &all);
    assert!(out.status.success(), "regmux misses {all:?}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("regmux misses --format json is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    });
    v.as_array().unwrap_or_else(|| panic!("regmux misses --format json: an array of routes, got {v}")).clone()
}

fn route_report<'a>(reports: &'a [serde_json::Value], route: &str) -> &'a serde_json::Value {
    reports.iter().find(|r| r["route"] == route).unwrap_or_else(|| panic!("no report for route {route}: {reports:?}"))
}

// ---------------------------------------------------------------------------------------------------
// The admin listener

/// One sample of the Prometheus / OpenMetrics text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find(['{', ' ']) {
            Some(i) if line.as_bytes()[i] == b'{' => {
                let (labels, rest) =
                    parse_labels(&line[i + 1..]).unwrap_or_else(|| panic!("bad label set in metrics line {line:?}"));
                (&line[..i], labels, rest)
            }
            Some(i) => (&line[..i], BTreeMap::new(), &line[i..]),
            None => panic!("metrics line without a value: {line:?}"),
        };
        let value = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value in metrics line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in metrics line {line:?}: {e}"));
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

/// `k="v",k2="v2"}rest` → labels and `rest`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        rest = &after[end + 1..];
    }
}

fn scrape(admin: &str) -> Vec<Sample> {
    let r = http("GET", &format!("http://{admin}/metrics"), &[]);
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    parse_exposition(&r.text())
}

/// The value of the sample named `name` whose labels are exactly `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
}

/// The sum over every sample named `name`.
fn metric_sum(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// Polls `/metrics` (counters move when a response body is done) until the sample equals `want`, for
/// up to 5 s; then returns what it holds.
fn wait_metric(admin: &str, name: &str, labels: &[(&str, &str)], want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(&scrape(admin), name, labels);
        if got == Some(want) || Instant::now() >= deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

fn readyz(admin: &str) -> (u16, serde_json::Value) {
    let r = http("GET", &format!("http://{admin}/readyz"), &[]);
    (r.status, r.json())
}

fn route_readiness<'a>(ready: &'a serde_json::Value, route: &str) -> &'a serde_json::Value {
    ready["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["route"] == route))
        .unwrap_or_else(|| panic!("no route {route} in /readyz: {ready}"))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// Backend requests regmux made to `reg` (its user agent), the `GET /v2/` health probes left out.
fn regmux_requests_seen_by(reg: &Registry) -> usize {
    reg.access_log().lines().filter(|l| l.contains("\"regmux/") && !l.contains("\"GET /v2/ HTTP")).count()
}

// ===================================================================================================
// Tests

/// Fallback, absent and error are recorded per route with digest, serving backend, count and times;
/// traffic per backend equals what was sent; `regmux misses` reports the same numbers; SIGTERM flushes
/// what was queued a moment before.
#[test]
fn ledger_records_what_the_target_did_not_serve() {
    let lab = Lab::new();
    let (mut target, old) = start_registries(&lab);
    push_all(&[
        ("small", target.addr(), "lab/both:1"),
        ("small", old.addr(), "lab/both:1"),
        ("other", old.addr(), "lab/old-only:1"),
        ("multi-amd64", target.addr(), "lab/target-only:1"),
    ]);
    let ledger = lab.path().join("ledger/ledger.db");
    let quay_route = "[[routes]]\nname = \"quay\"\nregistries = [\"quay.io\"]\nbackends = [\"old\"]\n";
    let toml = config_toml(&ledger, &target, &old, &format!("{HUB_ROUTE}\n{quay_route}"));
    let mut regmux = Regmux::start(BIN, lab.dir("regmux"), &toml);
    let base = regmux.url();
    let t0 = now_unix();
    let mut sent = Traffic::new();

    // Hits: the target has it (no miss).
    pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent);
    // Fallback: only the old mirror has it; the manifest twice.
    pull(&base, "lab/old-only", "1", "other", "hub", "old", &mut sent);
    let again = get_manifest(&base, "lab/old-only", "1");
    assert_eq!(again.status, 200, "{}", again.text());
    credit(&mut sent, "hub", "old", again.body.len() as u64);
    // Absent: nobody has it (a manifest by tag, a blob by digest). No content bytes are served.
    let absent = get_manifest(&base, "lab/nothing", "nope");
    assert_eq!(absent.status, 404, "{}", absent.text());
    credit(&mut sent, "hub", "", 0);
    let absent_blob = get_blob(&base, "lab/nothing", NO_SUCH_BLOB);
    assert_eq!(absent_blob.status, 404, "{}", absent_blob.text());
    credit(&mut sent, "hub", "", 0);
    // The other route, whose target is the old mirror: served by its target, so no miss.
    let other_layer = layer_digests("other")[0].clone();
    let q = get_manifest(&base, "quay.io/lab/old-only", "1");
    assert_eq!(q.status, 200, "{}", q.text());
    credit(&mut sent, "quay", "old", q.body.len() as u64);
    let qb = get_blob(&base, "quay.io/lab/old-only", &other_layer);
    assert_eq!(qb.status, 200);
    assert_eq!(qb.body_digest(), other_layer);
    credit(&mut sent, "quay", "old", size_of_blob(&other_layer));

    // `regmux_fallbacks_total`: the old-only manifest twice, its config and its layer.
    let admin = regmux.admin_addr();
    let fallbacks = [("route", "hub"), ("from", "target"), ("to", "old")];
    let fallbacks_before = wait_metric(&admin, "regmux_fallbacks_total", &fallbacks, 4.0);

    // Error: the target is down. Once with the old mirror serving, once with nothing serving.
    target.stop();
    let err_served = get_manifest(&base, "lab/both", "1");
    assert_eq!(err_served.status, 200, "the old mirror serves while the target is down: {}", err_served.text());
    credit(&mut sent, "hub", "old", err_served.body.len() as u64);
    let err_nothing = get_manifest(&base, "lab/target-only", "1");
    assert_eq!(err_nothing.status, 503, "only the (dead) target has it: {}", err_nothing.text());
    credit(&mut sent, "hub", "", 0);
    let t1 = now_unix();

    let (rows, got_traffic) = wait_ledger(&ledger, &sent);
    let mut c = Checks::default();
    c.eq("fallbacks_total{hub,target→old} before the target stopped", fallbacks_before, Some(4.0));
    // The failed target's request the old mirror served counts as a fallback too; the one nothing
    // served does not.
    let fallbacks_after = wait_metric(&admin, "regmux_fallbacks_total", &fallbacks, 5.0);
    c.eq("fallbacks_total{hub,target→old}: + the `error` the old mirror served", fallbacks_after, Some(5.0));
    c.eq("fallbacks_total: nothing else", metric_sum(&scrape(&admin), "regmux_fallbacks_total"), 5.0);
    c.eq("ledger traffic per (route, backend), summed over hours", &got_traffic, &sent);

    let small_digest = manifest_digest("small", Format::Oci);
    let other_digest = manifest_digest("other", Format::Oci);
    let other_config = config_digest("other");
    // (repository, reference, kind, outcome, digest, served_by, count)
    type Want<'a> = (&'a str, &'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>, i64);
    let want: Vec<Want> = vec![
        ("lab/both", "1", "manifest", "error", Some(&small_digest), Some("old"), 1),
        ("lab/nothing", NO_SUCH_BLOB, "blob", "absent", Some(NO_SUCH_BLOB), None, 1),
        ("lab/nothing", "nope", "manifest", "absent", None, None, 1),
        ("lab/old-only", "1", "manifest", "fallback", Some(&other_digest), Some("old"), 2),
        ("lab/old-only", &other_config, "blob", "fallback", Some(&other_config), Some("old"), 1),
        ("lab/old-only", &other_layer, "blob", "fallback", Some(&other_layer), Some("old"), 1),
        ("lab/target-only", "1", "manifest", "error", None, None, 1),
    ];
    let got_keys: BTreeSet<_> = rows
        .iter()
        .map(|r| (r.route.clone(), r.repository.clone(), r.reference.clone(), r.kind.clone(), r.outcome.clone()))
        .collect();
    let want_keys: BTreeSet<_> = want
        .iter()
        .map(|w| ("hub".to_string(), w.0.to_string(), w.1.to_string(), w.2.to_string(), w.3.to_string()))
        .collect();
    c.eq("miss rows (route, repository, reference, kind, outcome)", &got_keys, &want_keys);
    for (repo, reference, kind, outcome, digest, served_by, count) in &want {
        let Some(r) = row(&rows, repo, reference, kind, outcome) else { continue };
        let what = format!("{repo} {reference} {kind} {outcome}");
        c.eq(&format!("{what}: digest"), r.digest.as_deref(), *digest);
        c.eq(&format!("{what}: served_by"), r.served_by.as_deref(), *served_by);
        c.eq(&format!("{what}: count"), r.count, *count);
        c.that(
            &format!("{what}: t0 <= first_seen <= last_seen <= t1"),
            t0 <= r.first_seen && r.first_seen <= r.last_seen && r.last_seen <= t1,
            (t0, r.first_seen, r.last_seen, t1),
        );
        c.eq(&format!("{what}: still open"), r.resolved_at, None);
    }

    // `regmux misses --format json`: the same numbers.
    let reports = misses_json(regmux.config_path(), &[]);
    c.eq(
        "routes reported",
        reports.iter().map(|r| r["route"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>(),
        vec!["hub".to_string(), "quay".to_string()],
    );
    let hub = route_report(&reports, "hub");
    let hub_all: Tally = sent
        .iter()
        .filter(|((r, _), _)| r == "hub")
        .fold(Tally::default(), |a, (_, t)| Tally { requests: a.requests + t.requests, bytes: a.bytes + t.bytes });
    let hub_target = sent[&("hub".to_string(), "target".to_string())];
    c.eq("hub: target", hub["target"].as_str(), Some("target"));
    c.eq("hub: requests", hub["requests"].as_u64(), Some(hub_all.requests));
    c.eq("hub: target_requests", hub["target_requests"].as_u64(), Some(hub_target.requests));
    c.eq("hub: bytes", hub["bytes"].as_u64(), Some(hub_all.bytes));
    c.eq("hub: target_bytes", hub["target_bytes"].as_u64(), Some(hub_target.bytes));
    c.close(
        "hub: target_request_share",
        hub["target_request_share"].as_f64().unwrap_or(-1.0),
        share(hub_target.requests, hub_all.requests),
    );
    c.close(
        "hub: target_byte_share",
        hub["target_byte_share"].as_f64().unwrap_or(-1.0),
        share(hub_target.bytes, hub_all.bytes),
    );
    c.eq("hub: open_misses", hub["open_misses"].as_u64(), Some(want.len() as u64));
    let listed = hub["misses"].as_array().cloned().unwrap_or_default();
    c.eq("hub: misses listed", listed.len(), want.len());
    if let Some(first) = listed.first() {
        c.eq(
            "hub: the most asked-for miss comes first",
            (first["repository"].as_str(), first["reference"].as_str(), first["count"].as_u64()),
            (Some("lab/old-only"), Some("1"), Some(2)),
        );
    }
    let counts: Vec<u64> = listed.iter().filter_map(|m| m["count"].as_u64()).collect();
    c.that("hub: misses ranked by count", counts.windows(2).all(|w| w[0] >= w[1]), &counts);
    for m in &listed {
        let key = (
            m["repository"].as_str().unwrap_or(""),
            m["reference"].as_str().unwrap_or(""),
            m["kind"].as_str().unwrap_or(""),
            m["outcome"].as_str().unwrap_or(""),
        );
        match want.iter().find(|w| (w.0, w.1, w.2, w.3) == key) {
            None => c.that("hub: a listed miss that was not caused", false, m),
            Some(w) => {
                c.eq(&format!("misses json {key:?}: digest"), m["digest"].as_str(), w.4);
                c.eq(&format!("misses json {key:?}: served_by"), m["served_by"].as_str(), w.5);
                c.eq(&format!("misses json {key:?}: count"), m["count"].as_i64(), Some(w.6));
                let last = m["last_seen"].as_i64().unwrap_or(0);
                c.that(&format!("misses json {key:?}: last_seen in the test"), (t0..=t1).contains(&last), last);
            }
        }
    }
    let backends: BTreeMap<String, (u64, u64)> = hub["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["backend"].as_str().unwrap_or("?").to_string(),
                        (b["requests"].as_u64().unwrap_or(0), b["bytes"].as_u64().unwrap_or(0)),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let want_backends: BTreeMap<String, (u64, u64)> =
        sent.iter().filter(|((r, _), _)| r == "hub").map(|((_, b), t)| (b.clone(), (t.requests, t.bytes))).collect();
    c.eq("hub: traffic per backend", backends, want_backends);
    let quay = route_report(&reports, "quay");
    let quay_sent = sent[&("quay".to_string(), "old".to_string())];
    c.eq("quay: target (its first backend)", quay["target"].as_str(), Some("old"));
    c.eq(
        "quay: requests / target_requests",
        (quay["requests"].as_u64(), quay["target_requests"].as_u64()),
        (Some(quay_sent.requests), Some(quay_sent.requests)),
    );
    c.eq(
        "quay: bytes / target_bytes",
        (quay["bytes"].as_u64(), quay["target_bytes"].as_u64()),
        (Some(quay_sent.bytes), Some(quay_sent.bytes)),
    );
    c.close("quay: target_request_share", quay["target_request_share"].as_f64().unwrap_or(-1.0), 100.0);
    c.eq("quay: open_misses", quay["open_misses"].as_u64(), Some(0));

    // --route, an unknown route, and the table.
    let only = misses_json(regmux.config_path(), &["--route", "quay", "--since", "1h"]);
    c.eq(
        "--route quay: only that route",
        only.iter().map(|r| r["route"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>(),
        vec!["quay".to_string()],
    );
    let unknown = misses_cli(regmux.config_path(), &["--route", "nope"]);
    c.eq("--route nope: exit code 64", unknown.status.code(), Some(64));
    let table = misses_cli(regmux.config_path(), &["--format", "table"]);
    c.that("table: exit 0", table.status.success(), &table);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    for needle in [
        "lab/old-only:1",
        "lab/nothing:nope",
        other_digest.as_str(),
        small_digest.as_str(),
        other_layer.as_str(),
        "fallback",
        "absent",
        "error",
    ] {
        c.that(&format!("table mentions {needle}"), table.contains(needle), &table);
    }
    c.that(
        &format!("table: hub share line says {:.1}% of requests", share(hub_target.requests, hub_all.requests)),
        table.contains(&format!("{:.1}% of requests", share(hub_target.requests, hub_all.requests))),
        &table,
    );
    // The issue lists the columns of an open miss: repository:tag, digest, kind, served by, count, last seen.
    c.that("table: a LAST SEEN column for the misses", table.to_ascii_lowercase().contains("last seen"), &table);

    // SIGTERM flushes: a burst answered just before the signal must all be in the file after exit
    // (the target is still down: each is an `error`, 503).
    for i in 0..20 {
        let r = get_manifest(&base, "lab/flush", &format!("t{i}"));
        assert_eq!(r.status, 503, "the target is still down: {}", r.text());
        credit(&mut sent, "hub", "", 0);
    }
    regmux.send_signal("TERM");
    let status = regmux.wait_exit(Duration::from_secs(15)).expect("regmux exits after SIGTERM");
    c.that("SIGTERM: exit 0", status.success(), status);
    c.that("SIGTERM: logs `ledger flushed`", regmux.logs().contains("ledger flushed"), "no such line");
    let after = miss_rows(&ledger);
    let flushed = after.iter().filter(|r| r.repository == "lab/flush" && r.outcome == "error" && r.count == 1).count();
    c.eq("SIGTERM: every request answered before the signal is in the ledger", flushed, 20);
    c.eq("SIGTERM: traffic after exit", traffic(&ledger), sent);

    c.finish(|| log_tail(&regmux));
}

/// The user's migration step: the target lacked an image (open misses), it is pushed there, a client
/// pulls again, and every miss of that image closes (resolved by the target), with no new miss.
#[test]
fn misses_close_when_the_target_serves_them() {
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[("other", old.addr(), "lab/app:1")]);
    let ledger = lab.path().join("ledger.db");
    // Where a digest was found is remembered for `location_ttl` (the target is not asked again for it
    // meanwhile): a short one here, so the second pull asks the target.
    let toml = config_toml(&ledger, &target, &old, HUB_ROUTE).replacen(
        "[server]\n",
        "[server]\nlocation_ttl = \"500ms\"\n",
        1,
    );
    assert!(toml.contains("location_ttl"), "{toml}");
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &toml);
    let base = regmux.url();
    let mut sent = Traffic::new();
    pull(&base, "lab/app", "1", "other", "hub", "old", &mut sent);
    let (rows, _) = wait_ledger(&ledger, &sent);
    let open: Vec<_> = rows.iter().filter(|r| r.resolved_at.is_none()).collect();
    assert_eq!(open.len(), 3, "manifest, config and layer fall back to the old mirror: {rows:#?}");
    assert!(open.iter().all(|r| r.outcome == "fallback" && r.served_by.as_deref() == Some("old")), "{rows:#?}");

    // Migrate the image, pull it again the way a client does, once the location hints expired.
    push_all(&[("other", target.addr(), "lab/app:1")]);
    let pushed = std::time::Instant::now();
    wait_for("the location hints to expire", Duration::from_secs(5), || {
        (pushed.elapsed() > Duration::from_millis(600)).then_some(())
    });
    pull(&base, "lab/app", "1", "other", "hub", "target", &mut sent);
    let (rows, got_traffic) = wait_ledger(&ledger, &sent);

    let mut c = Checks::default();
    c.eq("traffic: the second pull is served by the target", &got_traffic, &sent);
    for r in &rows {
        let what = format!("{} {} {}", r.repository, r.reference, r.kind);
        c.that(&format!("{what}: resolved"), r.resolved_at.is_some(), r);
        c.eq(&format!("{what}: resolved_by"), r.resolved_by.as_deref(), Some("target"));
        c.eq(&format!("{what}: no new miss counted"), (r.outcome.as_str(), r.count), ("fallback", 1));
    }
    let reports = misses_json(regmux.config_path(), &[]);
    let hub = route_report(&reports, "hub");
    c.eq(
        "regmux misses: no open miss",
        (hub["open_misses"].as_u64(), hub["misses"].as_array().map(Vec::len)),
        (Some(0), Some(0)),
    );
    c.finish(|| format!("rows: {rows:#?}\n{}", log_tail(&regmux)));
}

/// A manifest missed by tag closes when the target later serves the same manifest by digest (the
/// way a client pins an image), as a warm or `migrate` would close it. regmux is restarted in between
/// (same ledger), so that neither its manifest cache nor its location hints answer for the target.
#[test]
fn a_tag_miss_closes_when_the_target_serves_the_manifest_by_digest() {
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[("other", old.addr(), "lab/app:1")]);
    let ledger = lab.path().join("ledger.db");
    let toml = config_toml(&ledger, &target, &old, HUB_ROUTE);
    let digest = manifest_digest("other", Format::Oci);
    let mut sent = Traffic::new();
    let mut regmux = Regmux::start(BIN, lab.dir("regmux-1"), &toml);
    let by_tag = get_manifest(&regmux.url(), "lab/app", "1");
    assert_eq!(by_tag.status, 200, "{}", by_tag.text());
    credit(&mut sent, "hub", "old", by_tag.body.len() as u64);
    regmux.send_signal("TERM");
    assert!(regmux.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()), "{}", log_tail(&regmux));
    let rows = miss_rows(&ledger);
    let miss = row(&rows, "lab/app", "1", "manifest", "fallback").unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!((miss.digest.as_deref(), miss.resolved_at), (Some(digest.as_str()), None), "{rows:#?}");

    push_all(&[("other", target.addr(), "lab/app:1")]);
    let regmux = Regmux::start(BIN, lab.dir("regmux-2"), &toml);
    let by_digest = get_manifest(&regmux.url(), "lab/app", &digest);
    assert_eq!(by_digest.status, 200, "{}", by_digest.text());
    credit(&mut sent, "hub", "target", by_digest.body.len() as u64);
    let (rows, got) = wait_ledger(&ledger, &sent);
    let mut c = Checks::default();
    c.eq("traffic: the digest served by the target", &got, &sent);
    c.eq("only the tag miss", rows.len(), 1);
    let miss = row(&rows, "lab/app", "1", "manifest", "fallback");
    c.that("the tag miss is resolved", miss.is_some_and(|r| r.resolved_at.is_some()), miss);
    c.eq("resolved_by", miss.and_then(|r| r.resolved_by.as_deref()), Some("target"));
    let hub = route_report(&misses_json(regmux.config_path(), &[]), "hub").clone();
    c.eq("regmux misses: no open miss", hub["open_misses"].as_u64(), Some(0));
    c.finish(|| format!("rows: {rows:#?}\n{}", log_tail(&regmux)));
}

/// Five times over one ledger file: known traffic, then more load; kill -9 under that load at least
/// a second after the known traffic finished. The file must pass `integrity_check`, hold every known
/// request exactly, and every load request answered more than a second before the kill.
#[test]
fn ledger_survives_kill_9_under_load() {
    const ROUNDS: usize = 5;
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[
        ("other", target.addr(), "lab/hit:1"),
        ("other", old.addr(), "lab/fb:1"),
        ("multi-amd64", old.addr(), "lab/fb2:1"),
    ]);
    let ledger = lab.path().join("ledger.db");
    let toml = config_toml(&ledger, &target, &old, HUB_ROUTE);
    let manifest_len = manifest_bytes("other", Format::Oci).len() as u64;
    let fb2_len = manifest_bytes("multi-amd64", Format::Oci).len() as u64;
    let layer = layer_digests("other")[0].clone();
    let layer_len = size_of_blob(&layer);

    // Cumulative expectations over rounds.
    let mut known_hits = 0u64;
    let mut known_fb_manifest = 0i64;
    let mut known_fb_blob = 0i64;
    let mut known_absent: BTreeSet<String> = BTreeSet::new();
    let mut load_absent_started: BTreeSet<String> = BTreeSet::new();
    let mut load_absent_due: BTreeSet<String> = BTreeSet::new();
    let (mut fb2_due, mut fb2_started) = (0i64, 0i64);

    for round in 0..ROUNDS {
        let regmux = Regmux::start(BIN, lab.dir(&format!("regmux-{round}")), &toml);
        let base = regmux.url();

        // Known traffic from four threads, all answered.
        #[derive(Clone)]
        enum Req {
            Hit,
            FbManifest,
            FbBlob,
            Absent(String),
        }
        let mut reqs = Vec::new();
        for i in 0..10 {
            reqs.push(Req::Hit);
            reqs.push(Req::FbManifest);
            reqs.push(Req::Absent(format!("r{round}-k{i}")));
            if i % 2 == 0 {
                reqs.push(Req::FbBlob);
            }
        }
        thread::scope(|s| {
            for part in reqs.chunks(reqs.len().div_ceil(4)) {
                let (base, layer) = (&base, &layer);
                s.spawn(move || {
                    for r in part {
                        let (resp, want) = match r {
                            Req::Hit => (get_manifest(base, "lab/hit", "1"), 200),
                            Req::FbManifest => (get_manifest(base, "lab/fb", "1"), 200),
                            Req::FbBlob => (get_blob(base, "lab/fb", layer), 200),
                            Req::Absent(tag) => (get_manifest(base, "lab/gone", tag), 404),
                        };
                        assert_eq!(resp.status, want, "{}", resp.text());
                        assert!(resp.complete);
                    }
                });
            }
        });
        let known_done = Instant::now();
        known_hits += 10;
        known_fb_manifest += 10;
        known_fb_blob += 5;
        known_absent.extend((0..10).map(|i| format!("r{round}-k{i}")));

        // Load until the kill: unique absent tags and a fallback manifest, three threads.
        let stop = Arc::new(AtomicBool::new(false));
        let loaders: Vec<_> = (0..3)
            .map(|t| {
                let (base, stop) = (base.clone(), stop.clone());
                thread::spawn(move || {
                    // (absent tag or None for lab/fb2, answered at)
                    let mut log: Vec<(Option<String>, Option<Instant>)> = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let tag = (i % 2 == 0).then(|| format!("r{round}-l{t}-{i}"));
                        let url = match &tag {
                            Some(tag) => format!("{base}/v2/lab/load/manifests/{tag}"),
                            None => format!("{base}/v2/lab/fb2/manifests/1"),
                        };
                        let answered = match try_http("GET", &url, &accept_all()) {
                            Ok(r) if r.complete && (r.status == 200 || r.status == 404) => Some(Instant::now()),
                            _ => None,
                        };
                        let failed = answered.is_none();
                        log.push((tag, answered));
                        if failed {
                            break; // regmux is gone
                        }
                        i += 1;
                    }
                    log
                })
            })
            .collect();
        // The durability bound is the condition under test: kill more than a second after the known
        // traffic was answered, while the load runs.
        thread::sleep((known_done + Duration::from_millis(1500)).saturating_duration_since(Instant::now()));
        let killed_at = Instant::now();
        let mut regmux = regmux;
        regmux.send_signal("KILL");
        let status = regmux.wait_exit(Duration::from_secs(10)).expect("regmux dies on SIGKILL");
        assert!(!status.success(), "{status}");
        stop.store(true, Ordering::Relaxed);
        let cutoff = killed_at - Duration::from_secs(1);
        let mut load_due_this_round = 0;
        for l in loaders {
            for (tag, answered) in l.join().expect("load thread") {
                let due = answered.is_some_and(|a| a <= cutoff);
                load_due_this_round += usize::from(due);
                match tag {
                    Some(tag) => {
                        if due {
                            load_absent_due.insert(tag.clone());
                        }
                        load_absent_started.insert(tag);
                    }
                    None => {
                        fb2_started += 1;
                        fb2_due += i64::from(due);
                    }
                }
            }
        }
        assert!(load_due_this_round > 0, "round {round}: the load answered nothing more than a second before the kill");
        eprintln!(
            "[kill -9] round {round}: {load_due_this_round} load requests answered > 1 s before the kill, {} sent so far",
            load_absent_started.len() as i64 + fb2_started
        );

        // The file after the crash, opened as the next start will open it.
        let db = rusqlite::Connection::open(&ledger).expect("open the ledger after kill -9");
        let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
        let rows = miss_rows_in(&db);
        let t = traffic_in(&db);
        drop(db);

        let mut c = Checks::default();
        let r = format!("round {round}");
        c.eq(&format!("{r}: integrity_check"), integrity.as_str(), "ok");
        c.eq(
            &format!("{r}: target traffic (known hits)"),
            t.get(&("hub".into(), "target".into())).copied(),
            Some(Tally { requests: known_hits, bytes: known_hits * manifest_len }),
        );
        c.eq(
            &format!("{r}: lab/fb manifest fallback count"),
            row(&rows, "lab/fb", "1", "manifest", "fallback").map(|x| x.count),
            Some(known_fb_manifest),
        );
        c.eq(
            &format!("{r}: lab/fb blob fallback count"),
            row(&rows, "lab/fb", &layer, "blob", "fallback").map(|x| x.count),
            Some(known_fb_blob),
        );
        let absent_known: BTreeSet<String> = rows
            .iter()
            .filter(|x| x.repository == "lab/gone" && x.outcome == "absent" && x.count == 1)
            .map(|x| x.reference.clone())
            .collect();
        c.eq(&format!("{r}: every known absent request"), &absent_known, &known_absent);
        let load_rows: BTreeSet<String> =
            rows.iter().filter(|x| x.repository == "lab/load").map(|x| x.reference.clone()).collect();
        let lost: Vec<&String> = load_absent_due.difference(&load_rows).collect();
        c.that(&format!("{r}: load requests answered > 1 s before the kill are all there"), lost.is_empty(), &lost);
        let invented: Vec<&String> = load_rows.difference(&load_absent_started).collect();
        c.that(&format!("{r}: no row for a request never sent"), invented.is_empty(), &invented);
        let fb2 = row(&rows, "lab/fb2", "1", "manifest", "fallback").map_or(0, |x| x.count);
        c.that(
            &format!("{r}: lab/fb2 count between answered-before-cutoff and sent"),
            fb2_due <= fb2 && fb2 <= fb2_started,
            (fb2_due, fb2, fb2_started),
        );
        let old_t = t.get(&("hub".into(), "old".into())).copied().unwrap_or_default();
        let known_old = (known_fb_manifest + known_fb_blob) as u64;
        c.that(
            &format!("{r}: old traffic between known + due and known + sent"),
            known_old + fb2_due as u64 <= old_t.requests && old_t.requests <= known_old + fb2_started as u64,
            (known_old, fb2_due, old_t, fb2_started),
        );
        c.eq(
            &format!("{r}: old bytes match its requests"),
            old_t.bytes,
            known_fb_manifest as u64 * manifest_len
                + known_fb_blob as u64 * layer_len
                + (old_t.requests - known_old.min(old_t.requests)) * fb2_len,
        );
        let nothing = t.get(&("hub".into(), String::new())).copied().unwrap_or_default().requests;
        let (lo, hi) = (
            (known_absent.len() + load_absent_due.len()) as u64,
            (known_absent.len() + load_absent_started.len()) as u64,
        );
        c.that(
            &format!("{r}: absent traffic between known + due and known + sent"),
            lo <= nothing && nothing <= hi,
            (lo, nothing, hi),
        );
        let expected_repos = ["lab/fb", "lab/fb2", "lab/gone", "lab/load"];
        let strays: Vec<&MissRow> = rows.iter().filter(|x| !expected_repos.contains(&x.repository.as_str())).collect();
        c.that(&format!("{r}: no unexpected rows"), strays.is_empty(), &strays);
        c.finish(|| log_tail(&regmux));
    }
}

/// `/metrics` counters equal the traffic sent; the latency histogram counts exactly the requests the
/// backends saw from regmux (their access logs); gauges settle.
#[test]
fn metrics_count_the_traffic_sent() {
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[
        ("small", target.addr(), "lab/both:1"),
        ("small", old.addr(), "lab/both:1"),
        ("other", old.addr(), "lab/old-only:1"),
    ]);
    let ledger = lab.path().join("ledger.db");
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, HUB_ROUTE));
    let admin = regmux.admin_addr();
    let base = regmux.url();
    let mut sent = Traffic::new();
    let mut client_requests = 0u64;

    let ping = http("GET", &format!("{base}/v2/"), &[]);
    assert_eq!(ping.status, 200);
    client_requests += 1;
    pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent); // target: 4 fetches
    pull(&base, "lab/old-only", "1", "other", "hub", "old", &mut sent); // target 3 (404), old 3
    client_requests += 7;
    let layer0 = layer_digests("small")[0].clone();
    let head = http("HEAD", &format!("{base}/v2/lab/both/blobs/{layer0}"), &[]);
    assert_eq!(head.status, 200);
    client_requests += 1; // target: 1 fetch
    let absent = get_manifest(&base, "lab/nothing", "nope");
    assert_eq!(absent.status, 404);
    client_requests += 1; // target 1, old 1
    let (target_fetches, old_fetches) = (4 + 3 + 1 + 1, 3 + 1);

    // Counters are updated when a response body is done: wait until every request is counted.
    let samples = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = scrape(&admin);
            let done = metric_sum(&s, "regmux_requests_total") >= client_requests as f64
                && metric(&s, "regmux_streams_in_flight", &[]) == Some(0.0);
            if done || Instant::now() >= deadline {
                break s;
            }
            thread::sleep(Duration::from_millis(25));
        }
    };
    let mut c = Checks::default();
    let req = |backend: &str, kind: &str, method: &str, status: &str| {
        metric(
            &samples,
            "regmux_requests_total",
            &[("route", "hub"), ("backend", backend), ("kind", kind), ("method", method), ("status", status)],
        )
    };
    c.eq(
        "requests_total: every client request, once",
        metric_sum(&samples, "regmux_requests_total"),
        client_requests as f64,
    );
    c.eq("requests_total{hub,target,manifest,GET,200}", req("target", "manifest", "GET", "200"), Some(1.0));
    c.eq("requests_total{hub,target,blob,GET,200}", req("target", "blob", "GET", "200"), Some(3.0));
    c.eq("requests_total{hub,target,blob,HEAD,200}", req("target", "blob", "HEAD", "200"), Some(1.0));
    c.eq("requests_total{hub,old,manifest,GET,200}", req("old", "manifest", "GET", "200"), Some(1.0));
    c.eq("requests_total{hub,old,blob,GET,200}", req("old", "blob", "GET", "200"), Some(2.0));
    c.eq("requests_total{hub,\"\",manifest,GET,404}", req("", "manifest", "GET", "404"), Some(1.0));
    let bytes = |backend: &str| metric(&samples, "regmux_bytes_total", &[("route", "hub"), ("backend", backend)]);
    c.eq("bytes_total{hub,target}", bytes("target"), Some(sent[&("hub".into(), "target".into())].bytes as f64));
    c.eq("bytes_total{hub,old}", bytes("old"), Some(sent[&("hub".into(), "old".into())].bytes as f64));
    c.eq("bytes_total{hub,target}: the pulled image's size", bytes("target"), Some(image_bytes("small") as f64));
    c.eq(
        "fallbacks_total{hub,target→old}",
        metric(&samples, "regmux_fallbacks_total", &[("route", "hub"), ("from", "target"), ("to", "old")]),
        Some(3.0),
    );
    c.eq("fallbacks_total: nothing else", metric_sum(&samples, "regmux_fallbacks_total"), 3.0);
    c.eq("digest_mismatches_total: none", metric_sum(&samples, "regmux_digest_mismatches_total"), 0.0);
    c.eq("backend_up{target}", metric(&samples, "regmux_backend_up", &[("backend", "target")]), Some(1.0));
    c.eq("backend_up{old}", metric(&samples, "regmux_backend_up", &[("backend", "old")]), Some(1.0));
    c.eq("ledger_dropped_total", metric(&samples, "regmux_ledger_dropped_total", &[]), Some(0.0));
    for result in ["warmed", "failed", "dropped", "claimed_elsewhere"] {
        c.eq(
            &format!("warms_total{{{result}}}"),
            metric(&samples, "regmux_warms_total", &[("result", result)]),
            Some(0.0),
        );
    }
    // Counts that only grow are counters (TYPE lines name them without `_total`).
    let exposition = http("GET", &format!("http://{admin}/metrics"), &[]).text();
    for name in ["regmux_ledger_dropped", "regmux_warms", "regmux_fallbacks", "regmux_requests", "regmux_bytes"] {
        c.that(
            &format!("{name} is a counter"),
            exposition.lines().any(|l| l == format!("# TYPE {name} counter")),
            exposition.lines().filter(|l| l.starts_with("# TYPE")).collect::<Vec<_>>(),
        );
    }
    c.eq("streams_in_flight", metric(&samples, "regmux_streams_in_flight", &[]), Some(0.0));
    let hist = |suffix: &str, backend: &str| {
        metric(&samples, &format!("regmux_backend_response_seconds_{suffix}"), &[("backend", backend)])
    };
    c.eq(
        "backend_response_seconds_count{target}: one per backend request",
        hist("count", "target"),
        Some(target_fetches as f64),
    );
    c.eq(
        "backend_response_seconds_count{old}: one per backend request",
        hist("count", "old"),
        Some(old_fetches as f64),
    );
    c.eq(
        "backend_response_seconds_bucket{target,+Inf} = count",
        metric(&samples, "regmux_backend_response_seconds_bucket", &[("backend", "target"), ("le", "+Inf")]),
        hist("count", "target"),
    );
    c.that(
        "backend_response_seconds_sum{target} > 0",
        hist("sum", "target").is_some_and(|s| s > 0.0),
        hist("sum", "target"),
    );
    // The registries' own access logs agree (they are written after each response: poll).
    let seen = |reg: &Registry, want: usize| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = regmux_requests_seen_by(reg);
            if n >= want || Instant::now() >= deadline {
                return n;
            }
            thread::sleep(Duration::from_millis(25));
        }
    };
    c.eq("target's access log: requests from regmux", seen(&target, target_fetches), target_fetches);
    c.eq("old's access log: requests from regmux", seen(&old, old_fetches), old_fetches);
    // The queue drains.
    let depth = {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let d = metric(&scrape(&admin), "regmux_ledger_queue_depth", &[]);
            if d == Some(0.0) || Instant::now() >= deadline {
                break d;
            }
            thread::sleep(Duration::from_millis(25));
        }
    };
    c.eq("ledger_queue_depth drains to 0", depth, Some(0.0));
    c.finish(|| {
        let raw = http("GET", &format!("http://{admin}/metrics"), &[]).text();
        format!("/metrics:\n{raw}\n{}", log_tail(&regmux))
    });
}

/// `/healthz` answers; `/readyz` is 200 while every route has a backend up, 503 when a route's only
/// backend stops (noticed by the background probe), 200 again when it is back.
#[test]
fn readiness_follows_a_backend_that_stops_and_returns() {
    let lab = Lab::new();
    let (target, mut old) = start_registries(&lab);
    let ledger = lab.path().join("ledger.db");
    let solo = "[[routes]]\nname = \"solo\"\nregistries = [\"quay.io\"]\nbackends = [\"old\"]\n";
    let regmux =
        Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, &format!("{HUB_ROUTE}\n{solo}")));
    let admin = regmux.admin_addr();

    let health = http("GET", &format!("http://{admin}/healthz"), &[]);
    assert_eq!(health.status, 200, "{}", health.text());
    let (status, ready) = readyz(&admin);
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(names(&route_readiness(&ready, "hub")["backends_up"]), ["target", "old"], "{ready}");
    assert_eq!(names(&route_readiness(&ready, "solo")["backends_up"]), ["old"], "{ready}");
    assert_eq!(ready["ledger"], "ok", "{ready}");

    old.stop();
    let ready = wait_for("/readyz to answer 503 after the old mirror stopped", Duration::from_secs(8), || {
        let (status, body) = readyz(&admin);
        (status == 503).then_some(body)
    });
    let mut c = Checks::default();
    c.eq("ready", &ready["ready"], &serde_json::json!(false));
    let solo_r = route_readiness(&ready, "solo");
    c.eq("solo: not ready", &solo_r["ready"], &serde_json::json!(false));
    c.eq("solo: old down", names(&solo_r["backends_down"]), vec!["old".to_string()]);
    let hub_r = route_readiness(&ready, "hub");
    c.eq("hub: still ready", &hub_r["ready"], &serde_json::json!(true));
    c.eq("hub: target up", names(&hub_r["backends_up"]), vec!["target".to_string()]);
    c.eq("hub: old down", names(&hub_r["backends_down"]), vec!["old".to_string()]);
    let s = scrape(&admin);
    c.eq("backend_up{old} while stopped", metric(&s, "regmux_backend_up", &[("backend", "old")]), Some(0.0));
    c.eq("backend_up{target} meanwhile", metric(&s, "regmux_backend_up", &[("backend", "target")]), Some(1.0));
    c.eq("/healthz while not ready", http("GET", &format!("http://{admin}/healthz"), &[]).status, 200);

    old.restart();
    let ready = wait_for("/readyz to answer 200 after the old mirror restarted", Duration::from_secs(8), || {
        let (status, body) = readyz(&admin);
        (status == 200).then_some(body)
    });
    c.eq("ready again", &ready["ready"], &serde_json::json!(true));
    c.eq("solo: old up again", names(&route_readiness(&ready, "solo")["backends_up"]), vec!["old".to_string()]);
    c.eq(
        "backend_up{old} after restart",
        metric(&scrape(&admin), "regmux_backend_up", &[("backend", "old")]),
        Some(1.0),
    );
    c.finish(|| log_tail(&regmux));
}

/// A blob whose bytes from the target do not match its digest was not served by the target: the
/// ledger records `error` (the target failed: bad bytes), not a target hit, and the miss stays open
/// when the old mirror then serves it.
#[test]
fn bad_bytes_from_the_target_are_recorded_as_an_error() {
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[("small", target.addr(), "lab/both:1"), ("small", old.addr(), "lab/both:1")]);
    let layer = layer_digests("small")[1].clone();
    corrupt_blob(&target.storage_dir(), &layer);
    let ledger = lab.path().join("ledger.db");
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, HUB_ROUTE));
    let admin = regmux.admin_addr();
    let base = regmux.url();

    let bad = get_blob(&base, "lab/both", &layer);
    assert!(
        !bad.complete || bad.status != 200,
        "a corrupt blob must not be delivered whole: {} bytes, complete",
        bad.body.len()
    );
    let retry = get_blob(&base, "lab/both", &layer);
    assert_eq!(retry.status, 200);
    assert!(retry.complete);
    assert_eq!(retry.body_digest(), layer, "the retry is served whole by the old mirror");

    let (rows, got_traffic) = wait_ledger_requests(&ledger, 2);
    let mut c = Checks::default();
    c.eq("traffic: two requests recorded", total_requests(&got_traffic), 2);
    let err = row(&rows, "lab/both", &layer, "blob", "error");
    c.that("an `error` miss for the blob the target served corrupt", err.is_some(), &rows);
    if let Some(e) = err {
        c.eq("error row: digest", e.digest.as_deref(), Some(layer.as_str()));
        c.eq("error row: still open", e.resolved_at, None);
    }
    c.that(
        "the target is not credited with serving the corrupt blob",
        !got_traffic.contains_key(&("hub".to_string(), "target".to_string())),
        &got_traffic,
    );
    let open: Vec<&MissRow> = rows.iter().filter(|r| r.reference == layer && r.resolved_at.is_none()).collect();
    c.that("the blob is an open miss after the old mirror served it", !open.is_empty(), &rows);
    let s = scrape(&admin);
    c.eq(
        "digest_mismatches_total{target}",
        metric(&s, "regmux_digest_mismatches_total", &[("backend", "target")]),
        Some(1.0),
    );
    c.finish(|| log_tail(&regmux));
}

/// Uploads `bytes` to `registry_url` as a blob of `repo` (monolithic: POST, then PUT with the body);
/// returns its digest.
fn upload_blob(registry_url: &str, repo: &str, bytes: &[u8]) -> String {
    use sha2::Digest as _;
    use std::io::{Read, Write};
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let start = http("POST", &format!("{registry_url}/v2/{repo}/blobs/uploads/"), &[("Content-Length", "0")]);
    assert_eq!(start.status, 202, "start an upload to {registry_url}/{repo}: {}", start.text());
    let location = start.header("location").expect("upload Location").to_string();
    let path = match location.strip_prefix("http://") {
        Some(rest) => rest[rest.find('/').expect("a path in Location")..].to_string(),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let authority = registry_url.strip_prefix("http://").expect("http:// registry");
    let mut conn = std::net::TcpStream::connect(authority).expect("connect to the registry");
    conn.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
    write!(
        conn,
        "PUT {path}{sep}digest={digest} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    )
    .expect("send the PUT");
    conn.write_all(bytes).expect("send the blob");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read the PUT's answer");
    assert!(answer.starts_with("HTTP/1.1 201"), "finish the upload of {digest}: {answer}");
    digest
}

/// `regmux_streams_in_flight` is 1 while a client holds a large blob's body half read, and 0 once it
/// has read it all.
#[test]
fn streams_in_flight_counts_a_body_being_sent() {
    use std::io::{Read, Write};
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    // Far more than the socket buffers between the registry, regmux and the client can hold.
    let big = random_bytes(77, 48 << 20);
    let digest = upload_blob(&target.url(), "lab/big", &big);
    let ledger = lab.path().join("ledger.db");
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, HUB_ROUTE));
    let admin = regmux.admin_addr();
    let in_flight = || metric(&scrape(&admin), "regmux_streams_in_flight", &[]);
    let mut c = Checks::default();
    c.eq("streams_in_flight before", in_flight(), Some(0.0));

    let mut conn = std::net::TcpStream::connect(regmux.addr()).expect("connect to regmux");
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    write!(conn, "GET /v2/lab/big/blobs/{digest} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", regmux.addr())
        .expect("send the GET");
    // The headers and the first chunk of the body, then the client pauses.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let header_end = loop {
        let n = conn.read(&mut buf).expect("read the response");
        assert!(n > 0, "regmux closed before the headers: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() > i + 4 {
                break i + 4;
            }
        }
    };
    let head = String::from_utf8_lossy(&got[..header_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {}", big.len())), "a sized body: {head}");
    let during = wait_metric(&admin, "regmux_streams_in_flight", &[], 1.0);
    thread::sleep(Duration::from_millis(500));
    let still = in_flight();
    c.eq("streams_in_flight while the body is half read", during, Some(1.0));
    c.eq("streams_in_flight half a second later, the client still pausing", still, Some(1.0));

    conn.read_to_end(&mut got).expect("read the rest of the body");
    let body = &got[header_end..];
    c.eq("the whole blob arrived", body.len(), big.len());
    c.that("the blob's bytes", body == big.as_slice(), "differ");
    c.eq(
        "streams_in_flight after the body was read",
        wait_metric(&admin, "regmux_streams_in_flight", &[], 0.0),
        Some(0.0),
    );
    c.finish(|| log_tail(&regmux));
}

/// The ledger file locked by another process (`BEGIN EXCLUSIVE`) for longer than the writer waits:
/// requests are still answered at once, `/readyz` answers 503 with `ledger: write errors`, then 200
/// once the lock is gone, and every request answered meanwhile is in the ledger afterwards.
#[test]
fn a_locked_ledger_makes_readyz_unready_and_loses_no_record() {
    let lab = Lab::new();
    let (target, old) = start_registries(&lab);
    push_all(&[("small", target.addr(), "lab/both:1"), ("other", old.addr(), "lab/old-only:1")]);
    let ledger = lab.path().join("ledger.db");
    let regmux = Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, HUB_ROUTE));
    let (admin, base) = (regmux.admin_addr(), regmux.url());
    let mut sent = Traffic::new();
    pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent);
    wait_ledger(&ledger, &sent);
    let (status, ready) = readyz(&admin);
    assert_eq!((status, ready["ledger"].as_str()), (200, Some("ok")), "{ready}");

    let lock = rusqlite::Connection::open(&ledger).expect("open the ledger read-write");
    lock.busy_timeout(Duration::from_secs(10)).expect("busy_timeout");
    lock.execute_batch("BEGIN EXCLUSIVE").expect("lock the ledger");
    let locked_at = Instant::now();
    let mut c = Checks::default();
    // Requests while the ledger is locked: answered as usual, none waits for the ledger.
    let burst = Instant::now();
    pull(&base, "lab/old-only", "1", "other", "hub", "old", &mut sent);
    pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent);
    let absent = get_manifest(&base, "lab/nothing", "locked");
    assert_eq!(absent.status, 404, "{}", absent.text());
    credit(&mut sent, "hub", "", 0);
    c.that(
        "requests are answered while the ledger is locked",
        burst.elapsed() < Duration::from_secs(3),
        burst.elapsed(),
    );

    let unready = wait_for("/readyz to answer 503 while the ledger is locked", Duration::from_secs(15), || {
        let (status, body) = readyz(&admin);
        (status == 503).then_some(body)
    });
    c.eq("readyz: ledger", unready["ledger"].as_str(), Some("write errors"));
    c.eq("readyz: ready", &unready["ready"], &serde_json::json!(false));
    c.eq("ledger_writable while locked", metric(&scrape(&admin), "regmux_ledger_writable", &[]), Some(0.0));
    // More requests while the writer retries.
    let again = get_manifest(&base, "lab/old-only", "1");
    assert_eq!(again.status, 200, "{}", again.text());
    credit(&mut sent, "hub", "old", again.body.len() as u64);
    c.eq("nothing written while locked", total_requests(&traffic(&ledger)), 4);
    // Longer than the writer's busy wait (5 s) plus a retry.
    thread::sleep(Duration::from_secs(7).saturating_sub(locked_at.elapsed()));
    c.eq("still 503 until the lock is released", readyz(&admin).0, 503);
    lock.execute_batch("ROLLBACK").expect("release the ledger");
    drop(lock);

    let ready = wait_for("/readyz to answer 200 once the ledger is unlocked", Duration::from_secs(15), || {
        let (status, body) = readyz(&admin);
        (status == 200).then_some(body)
    });
    c.eq("readyz: ledger ok again", ready["ledger"].as_str(), Some("ok"));
    c.eq("ledger_writable again", metric(&scrape(&admin), "regmux_ledger_writable", &[]), Some(1.0));
    let (rows, got) = wait_ledger(&ledger, &sent);
    c.eq("every request answered during the lock is in the ledger", &got, &sent);
    c.that(
        "the absent miss from during the lock",
        row(&rows, "lab/nothing", "locked", "manifest", "absent").is_some(),
        &rows,
    );
    c.eq(
        "the fallback manifest from during the lock, twice",
        row(&rows, "lab/old-only", "1", "manifest", "fallback").map(|r| r.count),
        Some(2),
    );
    c.eq("dropped: none", metric(&scrape(&admin), "regmux_ledger_dropped_total", &[]), Some(0.0));
    c.finish(|| log_tail(&regmux));
}

// ---------------------------------------------------------------------------------------------------
// /ui in a real browser

const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium with a throwaway profile and nothing that phones home; `extra` picks the output.
fn chromium(profile: &Path, extra: &[&str], url: &str) -> Output {
    chromium_for(profile, 5000, extra, url)
}

/// [`chromium`] letting the page run for `budget_ms` of virtual time (scripts and timers run at once;
/// the clock stands still while a request is pending) before the output is taken.
fn chromium_for(profile: &Path, budget_ms: u64, extra: &[&str], url: &str) -> Output {
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--virtual-time-budget={budget_ms}"))
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    run(&mut cmd, Duration::from_secs(60))
}

/// A TCP relay in front of the admin listener that lets the page and its first `/ui/data.json`
/// through and holds every later `/ui/data.json` request until [`Gate::open`]: what the page shows
/// after that can only come from a refresh it made by itself.
struct Gate {
    addr: String,
    data_requests: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Gate {
    fn start(upstream: &str) -> Gate {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the gate");
        listener.set_nonblocking(true).expect("nonblocking gate");
        let addr = listener.local_addr().expect("gate address").to_string();
        let data_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (open, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (n, o, st, upstream) = (data_requests.clone(), open.clone(), stop.clone(), upstream.to_string());
        let accept = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let (mut from_server, mut to_client) =
                    (server.try_clone().expect("clone"), client.try_clone().expect("clone"));
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(std::net::Shutdown::Write);
                });
                let (mut from_client, mut to_server, n, o) = (client, server, n.clone(), o.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let k = match from_client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => k,
                        };
                        if buf[..k].windows(22).any(|w| w == b"GET /ui/data.json HTTP")
                            && n.fetch_add(1, Ordering::SeqCst) >= 1
                        {
                            let deadline = Instant::now() + Duration::from_secs(60);
                            while !o.load(Ordering::SeqCst) && Instant::now() < deadline {
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                        if to_server.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Gate { addr, data_requests, open, stop, accept: Some(accept) }
    }

    fn data_requests(&self) -> usize {
        self.data_requests.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Every `src`/`href`-like attribute in the tree that points off the page's own origin.
fn external_refs(node: &dom::Node, out: &mut Vec<String>) {
    for (k, v) in &node.attrs {
        let v = v.trim().to_ascii_lowercase();
        let url_attr = matches!(k.as_str(), "src" | "href" | "xlink:href" | "action" | "poster" | "srcset" | "data");
        if url_attr && (v.starts_with("http:") || v.starts_with("https:") || v.starts_with("//")) {
            out.push(format!("<{} {k}={v:?}>", node.tag));
        }
    }
    for c in &node.children {
        external_refs(c, out);
    }
}

/// The shares, open misses, per-hour plot and backend states of the `/ui` page as Chromium rendered
/// them; the page loads nothing from elsewhere; and it refreshes itself with new traffic.
///
/// Chromium is required: a machine without it fails this test unless `REGMUX_SKIP_BROWSER=1`.
#[test]
fn ui_page_renders_shares_misses_and_backend_state_in_chromium() {
    if !Path::new(CHROMIUM).exists() {
        if std::env::var("REGMUX_SKIP_BROWSER").is_ok_and(|v| v == "1") {
            eprintln!(
                "\n\n!!!!!!!! SKIPPED ui_page_renders_shares_misses_and_backend_state_in_chromium: {CHROMIUM} is \
                 absent and REGMUX_SKIP_BROWSER=1 !!!!!!!!\n\n"
            );
            return;
        }
        panic!("{CHROMIUM} is absent: apt-get install -y chromium (or set REGMUX_SKIP_BROWSER=1 to skip this test)");
    }
    let lab = Lab::new();
    let (target, mut old) = start_registries(&lab);
    push_all(&[("small", target.addr(), "lab/both:1"), ("other", old.addr(), "lab/old-only:1")]);
    let ledger = lab.path().join("ledger.db");
    let quay = "[[routes]]\nname = \"quay\"\nregistries = [\"quay.io\"]\nbackends = [\"target\", \"old\"]\n";
    let regmux =
        Regmux::start(BIN, lab.dir("regmux"), &config_toml(&ledger, &target, &old, &format!("{HUB_ROUTE}\n{quay}")));
    let admin = regmux.admin_addr();
    let base = regmux.url();
    let mut sent = Traffic::new();
    // hub: 4 hits, 3 fallbacks.
    pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent);
    pull(&base, "lab/old-only", "1", "other", "hub", "old", &mut sent);
    // quay: 1 hit, 1 absent.
    let q = get_manifest(&base, "quay.io/lab/both", "1");
    assert_eq!(q.status, 200, "{}", q.text());
    credit(&mut sent, "quay", "target", q.body.len() as u64);
    let ghost = get_manifest(&base, "quay.io/lab/ghost", "9");
    assert_eq!(ghost.status, 404);
    credit(&mut sent, "quay", "", 0);
    let (rows, _) = wait_ledger(&ledger, &sent);
    assert_eq!(rows.len(), 4, "three fallbacks on hub, one absent on quay: {rows:#?}");

    // One backend down, as /readyz sees it.
    old.stop();
    wait_for("/readyz to list old as down", Duration::from_secs(8), || {
        let (_, r) = readyz(&admin);
        names(&route_readiness(&r, "hub")["backends_down"]).contains(&"old".to_string()).then_some(())
    });

    let route_total = |sent: &Traffic, route: &str| {
        sent.iter()
            .filter(|((r, _), _)| r == route)
            .fold(Tally::default(), |a, (_, t)| Tally { requests: a.requests + t.requests, bytes: a.bytes + t.bytes })
    };
    let on_target =
        |sent: &Traffic, route: &str| sent.get(&(route.to_string(), "target".to_string())).copied().unwrap_or_default();
    let other_config = config_digest("other");
    let other_layer = layer_digests("other")[0].clone();
    let expectations = [
        (
            "hub",
            vec![
                format!("lab/old-only:1"),
                format!("lab/old-only@{other_config}"),
                format!("lab/old-only@{other_layer}"),
            ],
        ),
        ("quay", vec!["lab/ghost:9".to_string()]),
    ];

    // The page as users open it (`/ui`, the address regmux logs) and with a trailing slash: both are
    // served, both must show the data.
    let mut c = Checks::default();
    let profile = lab.dir("chromium-profile");
    let mut doms = Vec::new();
    // The plot has one point per hour that had traffic (one, or two if the test straddled an hour).
    let traffic_hours = |route: &str| -> usize {
        open_ledger(&ledger)
            .query_row("SELECT count(DISTINCT hour) FROM traffic WHERE route = ?1", [route], |r| r.get::<_, i64>(0))
            .expect("count traffic hours") as usize
    };
    // The page as served: nothing in it names another origin (it must work offline).
    let raw = http("GET", &format!("http://{admin}/ui"), &[]);
    assert_eq!(raw.status, 200);
    let raw = raw.text();
    for needle in ["http://", "https://", "url(", "@import", "src=", "href="] {
        c.that(&format!("the page source has no {needle:?}"), !raw.contains(needle), needle);
    }
    for path in ["/ui", "/ui/"] {
        let url = format!("http://{admin}{path}");
        let out = chromium(&profile, &["--dump-dom"], &url);
        assert!(out.status.success(), "chromium --dump-dom {url}: {}", String::from_utf8_lossy(&out.stderr));
        let html = String::from_utf8_lossy(&out.stdout).into_owned();
        let doc = dom::parse(&html);
        let failures_before = c.failed();
        let status = doc.find(&|n| n.attr("id") == Some("status")).map(|n| n.text()).unwrap_or_default();
        c.that(&format!("{path}: the page loaded its data (#status)"), status.starts_with("ledger "), &status);
        let mut external = Vec::new();
        external_refs(&doc, &mut external);
        c.eq(&format!("{path}: rendered elements referring to other origins"), external, Vec::<String>::new());
        for (route, misses) in &expectations {
            let Some(section) =
                doc.find(&|n| n.tag == "section" && n.has_class("route") && n.attr("data-route") == Some(route))
            else {
                c.that(&format!("{path}: a section.route[data-route={route}]"), false, "missing");
                continue;
            };
            let (all, tgt) = (route_total(&sent, route), on_target(&sent, route));
            let want_share = share(tgt.requests, all.requests);
            let share_el = section.find(&|n| n.has_class("share"));
            let got_share = share_el.and_then(|n| n.attr("data-share")).and_then(|s| s.parse::<f64>().ok());
            c.that(
                &format!("{path} {route}: data-share = {want_share}"),
                got_share.is_some_and(|g| (g - want_share).abs() < 0.051),
                got_share,
            );
            c.eq(&format!("{path} {route}: share text"), share_el.map(|n| n.text()), Some(format!("{want_share:.1}%")));
            let text = section.text();
            let byte_share = share(tgt.bytes, all.bytes);
            c.that(
                &format!("{path} {route}: says {byte_share:.1}% of bytes"),
                text.contains(&format!("{byte_share:.1}% of bytes")),
                &text,
            );
            c.that(
                &format!("{path} {route}: says {} of {} requests", tgt.requests, all.requests),
                text.contains(&format!("{} of {} requests", tgt.requests, all.requests)),
                &text,
            );
            c.eq(
                &format!("{path} {route}: .open-misses"),
                section.find(&|n| n.has_class("open-misses")).map(|n| n.text()),
                Some(misses.len().to_string()),
            );
            let plot = section.find(&|n| n.tag == "svg" && n.has_class("plot"));
            c.that(&format!("{path} {route}: an svg.plot"), plot.is_some(), "missing");
            if let Some(plot) = plot {
                let hours = traffic_hours(route);
                let points = plot.find_all(&|n| n.tag == "circle").len();
                c.eq(&format!("{path} {route}: one point per traffic hour"), points, hours);
                let line = plot.find(&|n| n.tag == "polyline").and_then(|n| n.attr("points"));
                c.eq(
                    &format!("{path} {route}: the polyline's points"),
                    line.map(|p| p.split_whitespace().count()),
                    Some(hours),
                );
            }
            let rows: Vec<String> =
                section.find_all(&|n| n.tag == "tr" && n.has_class("miss")).iter().map(|n| n.text()).collect();
            c.eq(&format!("{path} {route}: tr.miss rows"), rows.len(), misses.len());
            for m in misses {
                c.that(
                    &format!("{path} {route}: a tr.miss shows {m}"),
                    rows.iter().any(|r| r.contains(m.as_str())),
                    &rows,
                );
            }
            for (backend, class) in [("target", "up"), ("old", "down")] {
                let span = section.find(&|n| n.tag == "span" && n.attr("data-backend") == Some(backend));
                c.that(
                    &format!("{path} {route}: backend {backend} shown {class}"),
                    span.is_some_and(|s| s.has_class(class)),
                    span.map(|s| (s.attrs.clone(), s.text())),
                );
            }
        }
        if c.failed() > failures_before {
            doms.push(format!("rendered DOM of {path}:\n{html}"));
        }
    }

    // A screenshot for people (and for the report).
    let png = lab.path().join("ui.png");
    let url = format!("http://{admin}/ui");
    let shot = chromium(&profile, &[&format!("--screenshot={}", png.display()), "--window-size=1200,900"], &url);
    c.that("chromium --screenshot exits 0", shot.status.success(), String::from_utf8_lossy(&shot.stderr));
    let bytes = std::fs::read(&png).unwrap_or_default();
    c.that(
        "the screenshot is a non-empty PNG",
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        bytes.len(),
    );
    if let Some(copy) = std::env::var_os("REGMUX_UI_SCREENSHOT") {
        let _ = std::fs::copy(&png, PathBuf::from(copy));
    }

    // The page refreshes itself: loaded once (through a gate that holds every data request after the
    // first), more traffic is sent while the page waits, then the held refresh goes through. Virtual
    // time stands still while a request is pending, so a budget of two refresh intervals lets the
    // page refresh at least once more after the gate opens.
    let interval: u64 = raw
        .split_once("setInterval(refresh,")
        .and_then(|(_, rest)| rest.split(')').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the page refreshes with setInterval(refresh, <ms>)");
    let gate = Gate::start(&admin);
    let page = format!("http://{}/ui", gate.addr);
    let refreshed = thread::scope(|s| {
        let profile = lab.dir("chromium-refresh");
        let browser = s.spawn(move || chromium_for(&profile, 2 * interval + 2000, &["--dump-dom"], &page));
        wait_for("the page's first refresh to reach the gate", Duration::from_secs(30), || {
            (gate.data_requests() >= 2).then_some(())
        });
        pull(&base, "lab/both", "1", "small", "hub", "target", &mut sent);
        wait_ledger(&ledger, &sent);
        gate.open();
        browser.join().expect("chromium thread")
    });
    assert!(refreshed.status.success(), "chromium (refresh): {}", String::from_utf8_lossy(&refreshed.stderr));
    let html = String::from_utf8_lossy(&refreshed.stdout).into_owned();
    let doc = dom::parse(&html);
    let failures_before = c.failed();
    c.that("the page asked for its data again by itself", gate.data_requests() >= 2, gate.data_requests());
    let (all, tgt) = (route_total(&sent, "hub"), on_target(&sent, "hub"));
    let hub = doc.find(&|n| n.tag == "section" && n.attr("data-route") == Some("hub"));
    let text = hub.map(|n| n.text()).unwrap_or_default();
    c.that(
        &format!("refreshed hub: says {} of {} requests", tgt.requests, all.requests),
        text.contains(&format!("{} of {} requests", tgt.requests, all.requests)),
        &text,
    );
    let want_share = share(tgt.requests, all.requests);
    c.eq(
        "refreshed hub: share text",
        hub.and_then(|n| n.find(&|n| n.has_class("share"))).map(|n| n.text()),
        Some(format!("{want_share:.1}%")),
    );
    if c.failed() > failures_before {
        doms.push(format!("rendered DOM after the refresh:\n{html}"));
    }
    drop(gate);
    c.finish(|| format!("{}\n{}", doms.join("\n"), log_tail(&regmux)));
}

/// Just enough of an HTML tree for a DOM that Chromium serialized: elements, attributes, text.
mod dom {
    #[derive(Debug, Default, Clone)]
    pub struct Node {
        /// Lowercase tag; empty for a text node.
        pub tag: String,
        pub attrs: Vec<(String, String)>,
        pub children: Vec<Node>,
        /// The text of a text node (entities decoded).
        pub content: String,
    }

    const VOID: [&str; 14] =
        ["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr", "param"];

    impl Node {
        pub fn attr(&self, name: &str) -> Option<&str> {
            self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }

        pub fn has_class(&self, class: &str) -> bool {
            self.attr("class").is_some_and(|c| c.split_whitespace().any(|x| x == class))
        }

        /// All text below this node, concatenated.
        pub fn text(&self) -> String {
            let mut s = self.content.clone();
            for c in &self.children {
                s.push_str(&c.text());
            }
            s
        }

        /// The first element (depth first, this one included) matching `pred`.
        pub fn find(&self, pred: &dyn Fn(&Node) -> bool) -> Option<&Node> {
            if !self.tag.is_empty() && pred(self) {
                return Some(self);
            }
            self.children.iter().find_map(|c| c.find(pred))
        }

        pub fn find_all<'a>(&'a self, pred: &dyn Fn(&Node) -> bool) -> Vec<&'a Node> {
            let mut out = Vec::new();
            self.collect(pred, &mut out);
            out
        }

        fn collect<'a>(&'a self, pred: &dyn Fn(&Node) -> bool, out: &mut Vec<&'a Node>) {
            if !self.tag.is_empty() && pred(self) {
                out.push(self);
            }
            for c in &self.children {
                c.collect(pred, out);
            }
        }
    }

    pub fn decode(s: &str) -> String {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&nbsp;", "\u{a0}")
            .replace("&amp;", "&")
    }

    /// The end of a start tag (`>` outside quotes), as an index into `s`.
    fn tag_end(s: &str) -> usize {
        let mut quote = None;
        for (i, c) in s.char_indices() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '>') => return i,
                _ => {}
            }
        }
        s.len()
    }

    fn parse_attrs(s: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            let name_end = rest.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(rest.len());
            let name = rest[..name_end].to_ascii_lowercase();
            rest = rest[name_end..].trim_start();
            let mut value = String::new();
            if let Some(after) = rest.strip_prefix('=') {
                let after = after.trim_start();
                if let Some(q) = after.chars().next().filter(|c| *c == '"' || *c == '\'') {
                    let body = &after[1..];
                    let end = body.find(q).unwrap_or(body.len());
                    value = decode(&body[..end]);
                    rest = body.get(end + 1..).unwrap_or("").trim_start();
                } else {
                    let end = after.find(char::is_whitespace).unwrap_or(after.len());
                    value = decode(&after[..end]);
                    rest = after[end..].trim_start();
                }
            }
            if !name.is_empty() && name != "/" {
                out.push((name, value));
            }
        }
        out
    }

    pub fn parse(html: &str) -> Node {
        let mut stack = vec![Node { tag: "#document".into(), ..Node::default() }];
        let mut rest = html;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("<!--") {
                rest = after.split_once("-->").map_or("", |(_, r)| r);
            } else if rest.starts_with("<!") || rest.starts_with("<?") {
                rest = rest.split_once('>').map_or("", |(_, r)| r);
            } else if let Some(after) = rest.strip_prefix("</") {
                let (name, r) = after.split_once('>').unwrap_or((after, ""));
                let name = name.trim().to_ascii_lowercase();
                rest = r;
                if let Some(pos) = stack.iter().rposition(|n| n.tag == name).filter(|p| *p > 0) {
                    while stack.len() > pos {
                        let n = stack.pop().expect("non-empty stack");
                        stack.last_mut().expect("parent").children.push(n);
                    }
                }
            } else if rest.starts_with('<') && rest[1..].starts_with(|c: char| c.is_ascii_alphabetic()) {
                let end = tag_end(&rest[1..]) + 1;
                let inner = &rest[1..end];
                rest = rest.get(end + 1..).unwrap_or("");
                let self_closing = inner.ends_with('/');
                let inner = inner.trim_end_matches('/');
                let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
                let tag = inner[..name_end].to_ascii_lowercase();
                let mut node = Node { tag: tag.clone(), attrs: parse_attrs(&inner[name_end..]), ..Node::default() };
                if tag == "script" || tag == "style" {
                    let close = format!("</{tag}");
                    let end = rest.to_ascii_lowercase().find(&close).unwrap_or(rest.len());
                    node.children.push(Node { content: rest[..end].to_string(), ..Node::default() });
                    rest = rest[end..].split_once('>').map_or("", |(_, r)| r);
                    stack.last_mut().expect("parent").children.push(node);
                } else if self_closing || VOID.contains(&tag.as_str()) {
                    stack.last_mut().expect("parent").children.push(node);
                } else {
                    stack.push(node);
                }
            } else {
                let end = rest[1..].find('<').map_or(rest.len(), |i| i + 1);
                let text = Node { content: decode(&rest[..end]), ..Node::default() };
                stack.last_mut().expect("parent").children.push(text);
                rest = &rest[end..];
            }
        }
        while stack.len() > 1 {
            let n = stack.pop().expect("non-empty stack");
            stack.last_mut().expect("parent").children.push(n);
        }
        stack.pop().expect("document")
    }
}
