//! Several regmux replicas on one PostgreSQL ledger (`[ledger] url`), against a real throwaway
//! PostgreSQL cluster ([`Postgres`]) and real registries:
//!
//! - the report (`regmux misses`) aggregates what every replica served and missed, and
//!   `migrate --from-ledger` works on the shared ledger;
//! - background warming is deduplicated fleet-wide: one warm per object however many replicas missed it;
//! - the database going away and coming back loses no pull and no ledger record;
//! - replicas started together on an empty database all create-or-find the schema and come up.

mod support;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_regmux");

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------------
// Setup

/// `[server]`, `[admin]` (both on ephemeral loopback ports) and a PostgreSQL `[ledger]`: the URL without
/// the password, the password in a file (with a trailing newline, as `echo` writes it).
fn pg_header(lab: &Lab, pg: &Postgres) -> String {
    let password_file = lab.write("ledger-password", format!("{}\n", pg.password()));
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [ledger]\nurl = \"{url}\"\npassword_file = \"{pw}\"\n",
        url = pg.url(),
        pw = password_file.display()
    )
}

/// Backends `target` and `old`, and route `hub` (Docker Hub, default) with `route` lines added.
fn fleet_config(header: &str, target: &Registry, old: &Registry, route: &str) -> String {
    format!(
        "{header}\n[backends.target]\nurl = \"{target}\"\n[backends.old]\nurl = \"{old}\"\n\
         [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\ndefault = true\n{route}\n",
        target = target.url(),
        old = old.url()
    )
}

/// Starts `n` replicas of one configuration side by side, each in `lab/replica-<i>`. A barrier makes
/// every thread spawn its regmux at the same moment; each then waits for its own `listening` line.
fn start_replicas(lab: &Lab, n: usize, config: &str) -> Vec<Regmux> {
    let dirs: Vec<_> = (0..n).map(|i| lab.dir(&format!("replica-{i}"))).collect();
    let barrier = Barrier::new(n);
    thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|d| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    Regmux::start(BIN, d, config)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("start a regmux replica")).collect()
    })
}

/// A PostgreSQL cluster and registries started side by side (each takes a second or two).
fn start_pg_and<T: Send>(lab: &Lab, others: impl FnOnce() -> T + Send) -> (Postgres, T) {
    let pg_dir = lab.dir("pg");
    thread::scope(|s| {
        let pg = s.spawn(move || Postgres::start(pg_dir));
        let rest = others();
        (pg.join().expect("start postgres"), rest)
    })
}

/// PostgreSQL, a target registry and an old mirror (both empty), started side by side.
fn start_pg_target_old(lab: &Lab) -> (Postgres, Registry, Registry) {
    let (pg, (target, old)) = start_pg_and(lab, || {
        thread::scope(|s| {
            let t = s.spawn(|| Registry::start(lab.dir("target"), RegistryOpts::plain()));
            let o = s.spawn(|| Registry::start(lab.dir("old"), RegistryOpts::plain()));
            (t.join().expect("target registry"), o.join().expect("old registry"))
        })
    });
    (pg, target, old)
}

// ---------------------------------------------------------------------------------------------------
// The CLI and the report

fn regmux_cli(args: &[&str]) -> Output {
    run(Command::new(BIN).args(args), Duration::from_secs(120))
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: stdout {}\nstderr {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// `regmux misses --config CFG --format json`, the report for route `hub`.
fn hub_report(config: &Path) -> Value {
    let out = regmux_cli(&["misses", "--config", config.to_str().expect("utf-8"), "--format", "json"]);
    assert!(out.status.success(), "regmux misses: {}", String::from_utf8_lossy(&out.stderr));
    let reports = json_of(&out);
    reports
        .as_array()
        .and_then(|a| a.iter().find(|r| r["route"] == "hub"))
        .cloned()
        .unwrap_or_else(|| panic!("no report for route hub: {reports:#}"))
}

fn report_requests(report: &Value) -> u64 {
    report["requests"].as_u64().unwrap_or_else(|| panic!("requests in {report:#}"))
}

/// Polls the report until its request count reaches `want`; returns the report then (its count may be
/// higher: the caller asserts equality).
fn wait_report_requests(config: &Path, want: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = hub_report(config);
        if report_requests(&last) >= want {
            return last;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?}: the report has {} of {want} requests: {last:#}",
                report_requests(&last)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `backend → (requests, bytes)` from a route report.
fn report_backends(report: &Value) -> BTreeMap<String, Tally> {
    report["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["backend"].as_str().unwrap_or("?").to_owned(),
                        Tally {
                            requests: b["requests"].as_u64().unwrap_or(0),
                            bytes: b["bytes"].as_u64().unwrap_or(0),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(repository, reference, kind, outcome) → count` of the misses a route report lists.
fn report_misses(report: &Value) -> BTreeMap<(String, String, String, String), u64> {
    let s = |m: &Value, k: &str| m[k].as_str().unwrap_or("").to_owned();
    report["misses"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        (s(m, "repository"), s(m, "reference"), s(m, "kind"), s(m, "outcome")),
                        m["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    requests: u64,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.requests += 1;
        self.bytes += bytes;
    }
}

fn accept_all() -> Vec<(&'static str, &'static str)> {
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].into_iter().map(|t| ("Accept", t)).collect()
}

fn blob_size(digest: &str) -> u64 {
    images().blob(digest).len() as u64
}

/// GETs `image` (pushed as OCI) through `base` as `repo:tag`: the manifest, then every blob, each
/// checked byte for byte; credits each request to `sent`.
fn pull_raw(base: &str, repo: &str, tag: &str, image: &str, sent: &mut Tally) {
    let m = http("GET", &format!("{base}/v2/{repo}/manifests/{tag}"), &accept_all());
    assert_eq!(m.status, 200, "GET manifest {repo}:{tag} via {base}: {}", m.text());
    assert_eq!(m.body, manifest_bytes(image, Format::Oci), "manifest {repo}:{tag}");
    sent.add(m.body.len() as u64);
    for d in blob_digests(image) {
        get_blob_ok(base, repo, &d);
        sent.add(blob_size(&d));
    }
}

fn get_blob_ok(base: &str, repo: &str, digest: &str) {
    let b = http("GET", &format!("{base}/v2/{repo}/blobs/{digest}"), &[]);
    assert_eq!(b.status, 200, "GET blob {repo}@{digest} via {base}: {}", b.text());
    assert!(b.complete && b.body_digest() == digest, "blob {digest} via {base} whole and right");
}

/// `skopeo copy` of `docker.io/<image_ref>` with regmux as the docker.io mirror (path prefix).
fn skopeo_pull(lab: &Lab, rx: &Regmux, name: &str, image_ref: &str) {
    let dir = lab.dir(&format!("skopeo-{name}"));
    let conf = write_registries_conf(&dir, "docker.io", &format!("{}/docker.io", rx.addr()));
    let out = skopeo_copy_via_mirror(&conf, &format!("docker.io/{image_ref}"), &dir.join("pulled"));
    assert!(
        out.status.success(),
        "skopeo pull of {image_ref} via {}: {}",
        rx.addr(),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------------
// What a replica logged

/// One `request` line of a regmux log.
#[derive(Debug, Clone)]
struct LoggedReq {
    route: String,
    kind: String,
    served_by: String,
    status: u16,
    bytes: u64,
}

/// The value of `key=` in a text-format log line (up to the next space, quotes trimmed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    Some(line[start..].split(' ').next().unwrap_or("").trim_matches('"'))
}

/// Every `request` line regmux logged (one per finished request).
fn logged_requests(rx: &Regmux) -> Vec<LoggedReq> {
    rx.logs()
        .lines()
        .filter(|l| l.contains(" request ") && l.contains(" route="))
        .map(|l| {
            let f = |k: &str| field(l, k).unwrap_or_else(|| panic!("no {k}= in request log line {l:?}")).to_owned();
            LoggedReq {
                route: f("route"),
                kind: f("kind"),
                served_by: f("served_by"),
                status: f("status").parse().unwrap_or_else(|e| panic!("status in {l:?}: {e}")),
                bytes: f("bytes").parse().unwrap_or_else(|e| panic!("bytes in {l:?}: {e}")),
            }
        })
        .collect()
}

/// What the ledger should hold for route `route`, from replicas' logs: content requests (manifests and
/// blobs) per serving backend. Panics on a content request that was not served (none of these tests
/// causes one, and the ledger would count it under backend "").
fn ledger_traffic_logged(replicas: &[Regmux], route: &str) -> BTreeMap<String, Tally> {
    let mut t: BTreeMap<String, Tally> = BTreeMap::new();
    for rx in replicas {
        for r in logged_requests(rx).iter().filter(|r| r.route == route && (r.kind == "manifest" || r.kind == "blob")) {
            assert!(
                r.status == 200 && !r.served_by.is_empty(),
                "a content request was not served: {r:?}\n{}",
                rx.logs()
            );
            t.entry(r.served_by.clone()).or_default().add(r.bytes);
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------------
// The admin listener

fn readyz(admin: &str) -> (u16, Value) {
    let r = http("GET", &format!("http://{admin}/readyz"), &[]);
    (r.status, r.json())
}

/// The value of an unlabelled sample `name` on `/metrics`.
fn metric(admin: &str, name: &str) -> Option<f64> {
    let r = http("GET", &format!("http://{admin}/metrics"), &[]);
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    r.text().lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

fn logs_of(replicas: &[Regmux]) -> String {
    replicas
        .iter()
        .enumerate()
        .map(|(i, rx)| {
            let logs = rx.logs();
            let lines: Vec<&str> = logs.lines().collect();
            format!("replica {i} log (last lines):\n{}", lines[lines.len().saturating_sub(25)..].join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

// ===================================================================================================
// Tests

/// The harness itself: a cluster that answers, accepts the application role over TCP with its
/// password, goes away on `stop` and comes back with its data on `restart`.
#[test]
fn postgres_harness_starts_stops_and_restarts() {
    let lab = Lab::new();
    let mut pg = Postgres::start(lab.dir("pg"));
    assert_eq!(pg.psql("select 1"), "1");
    let owner = "select pg_get_userbyid(datdba) from pg_database where datname = current_database()";
    assert_eq!(pg.psql(owner), "regmux", "database regmux, owned by role regmux");
    pg.psql("create table kept (n int); insert into kept values (42)");

    // The application's way in: TCP, role regmux, password (scram).
    let as_app = |pg: &Postgres, password: &str| {
        run(
            Command::new("psql")
                .arg(pg.url())
                .args(["-X", "-At", "-c", "select current_user"])
                .env("PGPASSWORD", password),
            Duration::from_secs(30),
        )
    };
    let ok = as_app(&pg, pg.password());
    assert!(ok.status.success(), "psql as regmux over TCP: {}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "regmux");
    assert!(!as_app(&pg, "wrong").status.success(), "TCP needs the right password");

    let port = pg.port();
    pg.stop();
    let down =
        run(Command::new("pg_isready").args(["-h", "127.0.0.1", "-p", &port.to_string()]), Duration::from_secs(10));
    assert!(!down.status.success(), "nothing answers after stop");

    pg.restart();
    assert_eq!(pg.port(), port, "same port after restart");
    assert_eq!(pg.psql("select 1"), "1");
    assert_eq!(pg.psql("select n from kept"), "42", "same data after restart");
}

/// Three replicas, one ledger: the report counts every request of every replica (per backend, in
/// requests and bytes), each miss counts the pulls of all replicas, and `migrate --from-ledger` on the
/// shared ledger brings the missed image to the target and closes the misses.
#[test]
fn three_replicas_share_one_ledger() {
    let lab = Lab::new();
    let (pg, target, old) = start_pg_target_old(&lab);
    thread::scope(|s| {
        // alpine: only the old mirror has it (every pull is a fallback); both: the target has it too.
        s.spawn(|| push("small", &format!("{}/library/alpine:3.19", old.addr()), Format::V2s2));
        s.spawn(|| push("other", &format!("{}/library/both:1", old.addr()), Format::Oci));
        s.spawn(|| push("other", &format!("{}/library/both:1", target.addr()), Format::Oci));
    });
    let config =
        fleet_config(&pg_header(&lab, &pg), &target, &old, "backends = [\"target\", \"old\"]\ntarget = \"target\"");
    let replicas = start_replicas(&lab, 3, &config);

    // Every replica: a real client pulls alpine (fallback), raw GETs pull both:1 (the target serves it)
    // and fetch alpine's first layer once more.
    let layer0 = layer_digests("small")[0].clone();
    let mut sent_target = Tally::default();
    thread::scope(|s| {
        let handles: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, rx)| {
                let (lab, layer0) = (&lab, &layer0);
                s.spawn(move || {
                    skopeo_pull(lab, rx, &format!("alpine-{i}"), "library/alpine:3.19");
                    let mut t = Tally::default();
                    pull_raw(&rx.url(), "library/both", "1", "other", &mut t);
                    get_blob_ok(&rx.url(), "library/alpine", layer0);
                    t
                })
            })
            .collect();
        for h in handles {
            let t = h.join().expect("pulls through a replica");
            sent_target.requests += t.requests;
            sent_target.bytes += t.bytes;
        }
    });

    // What the replicas say they served, summed; and what that must be, from the images alone.
    let logged = ledger_traffic_logged(&replicas, "hub");
    let alpine_bytes = manifest_bytes("small", Format::V2s2).len() as u64
        + blob_digests("small").iter().map(|d| blob_size(d)).sum::<u64>();
    let want_old = Tally {
        requests: 3 * (1 + blob_digests("small").len() as u64 + 1),
        bytes: 3 * (alpine_bytes + blob_size(&layer0)),
    };
    let want: BTreeMap<String, Tally> = [("old".to_owned(), want_old), ("target".to_owned(), sent_target)].into();
    let total: u64 = logged.values().map(|t| t.requests).sum();

    let cfg = replicas[0].config_path().to_owned();
    let report = wait_report_requests(&cfg, total, Duration::from_secs(10));
    let mut c = Checks::default();
    c.eq("content requests the replicas logged, per backend (vs. what the pulls fetch)", &logged, &want);
    c.eq("report: traffic per backend = the sum over the replicas' logs", report_backends(&report), logged.clone());
    c.eq("report: requests", report["requests"].as_u64(), Some(total));
    c.eq("report: bytes", report["bytes"].as_u64(), Some(logged.values().map(|t| t.bytes).sum()));
    c.eq("report: target_requests", report["target_requests"].as_u64(), Some(sent_target.requests));
    c.eq("report: target", report["target"].as_str(), Some("target"));

    // The misses: alpine's manifest (by tag) and each blob, counted over all three replicas.
    let key = |reference: &str, kind: &str| {
        ("library/alpine".to_owned(), reference.to_owned(), kind.to_owned(), "fallback".to_owned())
    };
    let mut want_misses = BTreeMap::new();
    want_misses.insert(key("3.19", "manifest"), 3);
    for d in blob_digests("small") {
        want_misses.insert(key(&d, "blob"), if d == layer0 { 6 } else { 3 });
    }
    c.eq(
        "report: open_misses (alpine's manifest and blobs)",
        report["open_misses"].as_u64(),
        Some(want_misses.len() as u64),
    );
    c.eq("report: misses with their counts over all replicas", report_misses(&report), want_misses);
    // Each replica's admin page shows the fleet's figures, not its own share.
    for (i, rx) in replicas.iter().enumerate() {
        let page = http("GET", &format!("http://{}/ui/data.json", rx.admin_addr()), &[]);
        let data: Value = serde_json::from_slice(&page.body).expect("/ui/data.json is JSON");
        let hub = data["routes"].as_array().and_then(|r| r.iter().find(|r| r["name"] == "hub")).cloned();
        let ui = hub.map(|h| (h["report"]["requests"].as_u64(), h["report"]["open_misses"].as_u64()));
        c.eq(&format!("replica {i}: /ui/data.json requests and open misses"), ui, Some((Some(total), Some(4))));
    }
    c.finish(|| logs_of(&replicas));

    // migrate on the shared ledger: the image moves, the misses close.
    let out = regmux_cli(&[
        "migrate",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--route",
        "hub",
        "--from-ledger",
        "--mode",
        "copy",
    ]);
    assert!(
        out.status.success(),
        "migrate --from-ledger: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = http("GET", &format!("{}/v2/library/alpine/manifests/3.19", target.url()), &accept_all());
    assert_eq!(m.status, 200, "alpine on the target after migrate: {}", m.text());
    assert_eq!(m.body_digest(), manifest_digest("small", Format::V2s2));
    for d in blob_digests("small") {
        let b = http("GET", &format!("{}/v2/library/alpine/blobs/{d}", target.url()), &[]);
        assert!(b.status == 200 && b.body_digest() == d, "{d} on the target after migrate");
    }
    let after = hub_report(&cfg);
    assert_eq!(after["open_misses"].as_u64(), Some(0), "migrate resolved the shared misses: {after:#}");
}

/// Shadow phase on three replicas: old mirror first, `warm = true`, the target a pull-through cache of
/// the old mirror. The same image pulled through all three at once is warmed once per object: the target
/// sees exactly one GET from regmux for each digest, and the misses close.
#[test]
fn warming_happens_once_per_object_across_replicas() {
    let lab = Lab::new();
    let (pg, old) = start_pg_and(&lab, || Registry::start(lab.dir("old"), RegistryOpts::plain()));
    // Alpine for the pulls; one distinct image per replica whose config blob is that replica's sentinel.
    let sentinels = ["other", "multi-amd64", "multi-arm64"];
    thread::scope(|s| {
        s.spawn(|| push("small", &format!("{}/library/alpine:3.19", old.addr()), Format::V2s2));
        for (i, img) in sentinels.iter().enumerate() {
            let old = &old;
            s.spawn(move || push(img, &format!("{}/sentinel/r{i}:1", old.addr()), Format::Oci));
        }
    });
    let target = Registry::start(lab.dir("target"), RegistryOpts::plain().proxy(&old.url()));
    let config = fleet_config(
        &pg_header(&lab, &pg),
        &target,
        &old,
        "backends = [\"old\", \"target\"]\ntarget = \"target\"\nwarm = true",
    );
    let replicas = start_replicas(&lab, 3, &config);

    let wanted: Vec<String> =
        blob_digests("small").into_iter().chain([manifest_digest("small", Format::V2s2)]).collect();
    let sentinel_digests: Vec<String> = sentinels.iter().map(|i| config_digest(i)).collect();
    for s in &sentinel_digests {
        assert!(!wanted.contains(s), "sentinel {s} is not part of alpine");
    }
    assert_eq!(
        sentinel_digests.iter().collect::<std::collections::BTreeSet<_>>().len(),
        sentinel_digests.len(),
        "distinct sentinels"
    );

    // All three replicas pull the same image at the same time.
    let barrier = Barrier::new(replicas.len());
    thread::scope(|s| {
        for (i, rx) in replicas.iter().enumerate() {
            let (lab, barrier) = (&lab, &barrier);
            s.spawn(move || {
                barrier.wait();
                skopeo_pull(lab, rx, &format!("alpine-{i}"), "library/alpine:3.19");
            });
        }
    });
    // Then each replica misses its own sentinel: warmed after what that replica queued before it, so once
    // every sentinel is in the target, every replica has dealt with its alpine warms.
    for (i, rx) in replicas.iter().enumerate() {
        get_blob_ok(&rx.url(), &format!("sentinel/r{i}"), &sentinel_digests[i]);
    }

    let all: Vec<&String> = wanted.iter().chain(&sentinel_digests).collect();
    wait_for("the target to have fetched every object and sentinel", Duration::from_secs(20), || {
        all.iter().all(|d| regmux_gets(&target, d).contains(&200)).then_some(())
    });
    let cfg = replicas[0].config_path().to_owned();
    let mut last = Value::Null;
    let resolved = wait_for_opt(Duration::from_secs(10), || {
        last = hub_report(&cfg);
        (last["open_misses"].as_u64() == Some(0)).then_some(())
    });

    let mut c = Checks::default();
    for d in &all {
        c.eq(&format!("GETs from regmux for {d} on the target (statuses)"), regmux_gets(&target, d), vec![200]);
    }
    c.that("the misses are resolved by warming (open_misses 0 on the shared ledger)", resolved.is_some(), &last);
    let logged = ledger_traffic_logged(&replicas, "hub");
    let report = hub_report(&cfg);
    c.eq("report: traffic per backend = the sum over the replicas' logs", report_backends(&report), logged);
    c.finish(|| format!("{}\n\ntarget access log:\n{}", logs_of(&replicas), target.access_log()));
}

/// Statuses of the `GET`s regmux (its user agent) made on `reg` for a path ending in `digest`.
fn regmux_gets(reg: &Registry, digest: &str) -> Vec<u16> {
    reg.access_log()
        .lines()
        .filter(|l| l.contains("\"regmux/"))
        .filter_map(|l| {
            let (_, rest) = l.split_once('"')?;
            let (request, rest) = rest.split_once('"')?;
            let mut req = request.split_whitespace();
            let (method, path) = (req.next()?, req.next()?);
            let status = rest.split_whitespace().next()?.parse().ok()?;
            (method == "GET" && path.ends_with(digest)).then_some(status)
        })
        .collect()
}

/// [`wait_for`] that returns `None` on timeout instead of panicking (so the caller can report more).
fn wait_for_opt<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Pulls keep succeeding while PostgreSQL is down (`/readyz` stays 200 and ready, its ledger says
/// "unavailable"); once it is back, every request of the whole run is in the ledger exactly once and
/// nothing was dropped.
#[test]
fn database_outage_loses_no_pull_and_no_record() {
    let lab = Lab::new();
    let (mut pg, target) = start_pg_and(&lab, || Registry::start(lab.dir("target"), RegistryOpts::plain()));
    push("small", &format!("{}/library/img:1", target.addr()), Format::Oci);
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    let config = fleet_config(&pg_header(&lab, &pg), &target, &old, "backends = [\"target\"]");
    let rx = Regmux::start(BIN, lab.dir("regmux"), &config);
    let admin = rx.admin_addr();
    let cfg = rx.config_path().to_owned();

    // The load: a manifest and a blob, over and over, each checked.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (sent, stop, failures, base) = (sent.clone(), stop.clone(), failures.clone(), rx.url());
        let manifest = manifest_bytes("small", Format::Oci);
        let layer = config_digest("small"); // small: the load is about requests, not bytes
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match try_http("GET", &format!("{base}/v2/library/img/manifests/1"), &accept_all()) {
                    Ok(r) if r.status == 200 && r.body == manifest => {}
                    Ok(r) => failures.lock().unwrap().push(format!("manifest: {} {}", r.status, r.text())),
                    Err(e) => failures.lock().unwrap().push(format!("manifest: {e}")),
                }
                sent.fetch_add(1, Ordering::SeqCst);
                match try_http("GET", &format!("{base}/v2/library/img/blobs/{layer}"), &[]) {
                    Ok(r) if r.status == 200 && r.complete && r.body_digest() == layer => {}
                    Ok(r) => failures.lock().unwrap().push(format!("blob: {} complete={}", r.status, r.complete)),
                    Err(e) => failures.lock().unwrap().push(format!("blob: {e}")),
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let failed = |what: &str| {
        let f = failures.lock().unwrap();
        assert!(f.is_empty(), "{what}: {} request(s) failed, first: {:?}\n{}", f.len(), f.first(), rx.logs());
    };

    // The ledger works, then the database goes away mid-load.
    wait_report_requests(&cfg, 20, Duration::from_secs(10));
    pg.stop();
    let stopped_at = (Instant::now(), sent.load(Ordering::SeqCst));
    let mut seen = Vec::new();
    wait_for("/readyz to say the ledger is unavailable", Duration::from_secs(10), || {
        let (status, body) = readyz(&admin);
        assert!(status == 200 && body["ready"] == true, "ready while the database is down: {status} {body}");
        let ledger = body["ledger"].as_str().unwrap_or("").to_owned();
        seen.push(ledger.clone());
        ledger.starts_with("unavailable").then_some(body)
    });
    let depth = metric(&admin, "regmux_ledger_queue_depth");
    assert!(depth.is_some_and(|d| d > 0.0), "events wait in the queue while the database is down: {depth:?}");
    // Keep pulling through several flush intervals of the outage.
    wait_for("more pulls during the outage", Duration::from_secs(20), || {
        (stopped_at.0.elapsed() >= Duration::from_secs(2) && sent.load(Ordering::SeqCst) >= stopped_at.1 + 200)
            .then_some(())
    });
    let (status, body) = readyz(&admin);
    assert!(status == 200 && body["ready"] == true, "still ready: {status} {body}");
    failed("during the outage");

    pg.restart();
    // Pulls go on across the return of the database, then stop.
    let back_at = sent.load(Ordering::SeqCst);
    wait_for("pulls after the database is back", Duration::from_secs(10), || {
        (sent.load(Ordering::SeqCst) >= back_at + 50).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    failed("over the whole run");
    let total = sent.load(Ordering::SeqCst);

    let report = wait_report_requests(&cfg, total, Duration::from_secs(20));
    let mut c = Checks::default();
    c.eq("report: requests = every request sent, exactly once", report_requests(&report), total);
    c.eq("report: all served by the target", report["target_requests"].as_u64(), Some(total));
    c.eq("regmux_ledger_dropped_total", metric(&admin, "regmux_ledger_dropped_total"), Some(0.0));
    let drained = wait_for_opt(Duration::from_secs(5), || {
        (metric(&admin, "regmux_ledger_queue_depth") == Some(0.0)).then_some(())
    });
    c.that("regmux_ledger_queue_depth drains to 0", drained.is_some(), metric(&admin, "regmux_ledger_queue_depth"));
    let ok = wait_for_opt(Duration::from_secs(5), || (readyz(&admin).1["ledger"] == "ok").then_some(()));
    c.that("/readyz ledger back to ok", ok.is_some(), readyz(&admin));
    c.finish(|| format!("sent {total}; /readyz ledger values seen: {seen:?}\n{}", logs_of(std::slice::from_ref(&rx))));
}

/// Four replicas started at the same moment on an empty database: every one comes up, serves, and
/// writes its records; the schema exists once.
#[test]
fn replicas_started_together_on_an_empty_database_all_come_up() {
    let lab = Lab::new();
    let (pg, target, old) = start_pg_target_old(&lab);
    assert_eq!(
        pg.psql("select count(*) from pg_tables where schemaname not in ('pg_catalog', 'information_schema')"),
        "0",
        "the database starts empty"
    );
    push("other", &format!("{}/library/img:1", target.addr()), Format::Oci);
    let config = fleet_config(&pg_header(&lab, &pg), &target, &old, "backends = [\"target\"]");
    let replicas = start_replicas(&lab, 4, &config);

    let mut sent = Tally::default();
    for rx in &replicas {
        pull_raw(&rx.url(), "library/img", "1", "other", &mut sent);
    }
    let cfg = replicas[0].config_path().to_owned();
    let report = wait_report_requests(&cfg, sent.requests, Duration::from_secs(10));

    let mut c = Checks::default();
    c.eq("report: requests of all four replicas", report_requests(&report), sent.requests);
    c.eq("report: bytes of all four replicas", report["bytes"].as_u64(), Some(sent.bytes));
    c.eq(
        "report: traffic per backend = the sum over the replicas' logs",
        report_backends(&report),
        ledger_traffic_logged(&replicas, "hub"),
    );
    for (i, rx) in replicas.iter().enumerate() {
        let admin = rx.admin_addr();
        let (status, body) = readyz(&admin);
        c.that(
            &format!("replica {i}: /readyz 200, ready, ledger ok"),
            status == 200 && body["ready"] == true && body["ledger"] == "ok",
            (status, body),
        );
    }
    c.eq(
        "tables misses, traffic, warm_claims: each exactly once in the database",
        pg.psql(
            "select string_agg(schemaname || '.' || tablename, ',' order by tablename) from pg_tables \
             where tablename in ('misses', 'traffic', 'warm_claims')",
        ),
        "public.misses,public.traffic,public.warm_claims".to_owned(),
    );
    c.finish(|| logs_of(&replicas));
}

/// `[ledger] url = "…?sslmode=require"` with `ca_file`: the ledger reaches a PostgreSQL that refuses
/// connections without TLS, verifying its certificate, with the password from `PGPASSWORD`; a second
/// replica without the CA cannot write (and says why) yet serves, with its password from `PGPASSFILE`.
#[test]
fn tls_to_the_database_and_passwords_from_the_environment() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let lab = Lab::new();
    let (mut pg, target) = start_pg_and(&lab, || Registry::start(lab.dir("target"), RegistryOpts::plain()));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.distinguished_name.push(DnType::CommonName, "regmux fleet test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("self-sign CA");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &*ca).expect("sign server certificate");
    pg.require_tls(&cert.pem(), &key.serialize_pem());
    let ca_file = lab.write("ca.pem", ca.pem());
    push("other", &format!("{}/library/img:1", target.addr()), Format::Oci);

    let config = |ca: Option<&Path>| {
        let ca = ca.map(|p| format!("ca_file = \"{}\"\n", p.display())).unwrap_or_default();
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [ledger]\nurl = \"{url}?sslmode=require\"\n{ca}\
             [backends.target]\nurl = \"{t}\"\n\
             [[routes]]\nname = \"hub\"\nregistries = [\"docker.io\"]\ndefault = true\nbackends = [\"target\"]\n",
            url = pg.url(),
            t = target.url()
        )
    };
    // Replica A: verifies with the CA; password from PGPASSWORD.
    let dir_a = lab.dir("a");
    let cfg_a = lab.write("a/regmux.toml", config(Some(&ca_file)));
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(&cfg_a).env("PGPASSWORD", pg.password()).env_remove("PGPASSFILE");
    let a = Regmux::spawn(cmd, &cfg_a);
    // Replica B: no CA (the system roots do not know it); password from a libpq password file.
    let passfile = lab.write("pgpass", format!("127.0.0.1:{}:regmux:regmux:{}\n", pg.port(), pg.password()));
    let cfg_b = lab.write("b/regmux.toml", config(None));
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(&cfg_b).env("PGPASSFILE", &passfile).env_remove("PGPASSWORD");
    let b = Regmux::spawn(cmd, &cfg_b);
    let _ = dir_a;

    let mut sent_a = Tally::default();
    pull_raw(&a.url(), "library/img", "1", "other", &mut sent_a);
    let mut sent_b = Tally::default();
    pull_raw(&b.url(), "library/img", "1", "other", &mut sent_b);

    let mut c = Checks::default();
    // The report, read by the CLI over TLS with the CA and PGPASSWORD, holds A's traffic.
    let report = wait_for("replica A's records in the ledger", Duration::from_secs(10), || {
        let out = run(
            Command::new(BIN)
                .args(["misses", "--config"])
                .arg(&cfg_a)
                .args(["--format", "json"])
                .env("PGPASSWORD", pg.password()),
            Duration::from_secs(60),
        );
        let reports = json_of(&out);
        let hub = reports.as_array()?.iter().find(|r| r["route"] == "hub")?.clone();
        (hub["requests"].as_u64() >= Some(sent_a.requests)).then_some(hub)
    });
    c.eq("report over TLS: A's requests", report_requests(&report), sent_a.requests);
    c.eq("report over TLS: A's bytes", report["bytes"].as_u64(), Some(sent_a.bytes));
    let (status, body) = readyz(&a.admin_addr());
    c.that("A: /readyz 200 with ledger ok", status == 200 && body["ledger"] == "ok", (status, &body));
    // B cannot verify the server: it keeps serving, holds its records and says why.
    let (status, body) = wait_for("B's /readyz to show the ledger unavailable", Duration::from_secs(10), || {
        let (status, body) = readyz(&b.admin_addr());
        body["ledger"].as_str().is_some_and(|l| l.starts_with("unavailable")).then_some((status, body))
    });
    c.that("B: /readyz stays 200 and ready", status == 200 && body["ready"] == true, (status, &body));
    c.that("B: its pulls succeeded", sent_b.requests > 0, sent_b.requests);
    c.that(
        "B: the log names the certificate problem",
        b.logs().to_lowercase().contains("certificate"),
        b.logs().lines().filter(|l| l.contains("ledger")).collect::<Vec<_>>(),
    );
    // Without TLS the server refuses regmux outright.
    let plain = config(Some(&ca_file)).replace("?sslmode=require", "?sslmode=disable");
    let cfg_plain = lab.write("plain/regmux.toml", plain);
    let out = run(
        Command::new(BIN).args(["misses", "--config"]).arg(&cfg_plain).env("PGPASSWORD", pg.password()),
        Duration::from_secs(60),
    );
    c.that(
        "sslmode=disable: refused by the server (hostnossl reject)",
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no encryption"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    c.finish(|| logs_of(&[a, b]));
}

/// A slow database (the `traffic` table locked for 4 s by another session, so the writer's batch
/// waits) slows no pull: every request answers well inside that time, records wait in the queue, and
/// all of them are in the ledger once the lock is gone.
#[test]
fn a_slow_database_slows_no_pull() {
    let lab = Lab::new();
    let (pg, target) = start_pg_and(&lab, || Registry::start(lab.dir("target"), RegistryOpts::plain()));
    push("small", &format!("{}/library/img:1", target.addr()), Format::Oci);
    let old = Registry::start(lab.dir("old"), RegistryOpts::plain());
    let config = fleet_config(&pg_header(&lab, &pg), &target, &old, "backends = [\"target\"]");
    let rx = Regmux::start(BIN, lab.dir("regmux"), &config);
    let (admin, cfg, base) = (rx.admin_addr(), rx.config_path().to_owned(), rx.url());
    let layer = config_digest("small");
    let get = |sent: &mut u64| {
        let started = Instant::now();
        let r = http("GET", &format!("{base}/v2/library/img/blobs/{layer}"), &[]);
        assert!(r.status == 200 && r.body_digest() == layer, "pull: {} {}", r.status, r.text());
        *sent += 1;
        started.elapsed()
    };
    let mut sent = 0;
    get(&mut sent);
    wait_report_requests(&cfg, sent, Duration::from_secs(10));

    let lock_for = Duration::from_secs(4);
    let slowest = thread::scope(|s| {
        // One session takes the lock, holds it for `lock_for`, and commits.
        let pg = &pg;
        let holder = s.spawn(move || {
            pg.psql(&format!(
                "BEGIN; LOCK TABLE traffic IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({}); COMMIT;",
                lock_for.as_secs()
            ))
        });
        wait_for("the lock on traffic to be held", Duration::from_secs(5), || {
            (pg.psql(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                      WHERE c.relname = 'traffic' AND l.mode = 'AccessExclusiveLock' AND l.granted",
            ) == "1")
                .then_some(())
        });
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        while started.elapsed() < lock_for - Duration::from_secs(1) {
            slowest = slowest.max(get(&mut sent));
        }
        let depth = metric(&admin, "regmux_ledger_queue_depth");
        assert!(depth.is_some_and(|d| d > 0.0), "records wait while the database is slow: {depth:?}");
        holder.join().expect("lock holder");
        slowest
    });
    let report = wait_report_requests(&cfg, sent, Duration::from_secs(20));
    let mut c = Checks::default();
    c.that(
        "no pull waited for the database (slowest under 1 s while it was locked 4 s)",
        slowest < Duration::from_secs(1),
        slowest,
    );
    c.eq("report: every request, once", report_requests(&report), sent);
    c.eq("regmux_ledger_dropped_total", metric(&admin, "regmux_ledger_dropped_total"), Some(0.0));
    c.finish(|| rx.logs());
}
