//! The cutover report behind `regmux misses` and the admin page: per route, the share of requests and
//! bytes its migration target served in a window (cutover readiness), by hour, and the open misses
//! ranked by how often they were asked for.

use rusqlite::params;
use serde::Serialize;

use super::store::Store;

#[derive(Debug, Serialize)]
pub struct RouteReport {
    pub route: String,
    pub target: String,
    pub since: u64,
    pub requests: u64,
    pub target_requests: u64,
    pub bytes: u64,
    pub target_bytes: u64,
    /// Percent of requests the target served (100 when there was no traffic).
    pub target_request_share: f64,
    pub target_byte_share: f64,
    pub backends: Vec<BackendTraffic>,
    pub hours: Vec<HourShare>,
    pub open_misses: u64,
    pub misses: Vec<Miss>,
}

#[derive(Debug, Serialize)]
pub struct BackendTraffic {
    /// Empty: nothing served the request.
    pub backend: String,
    pub requests: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct HourShare {
    pub hour: u64,
    pub requests: u64,
    pub target_requests: u64,
    pub target_request_share: f64,
}

#[derive(Debug, Serialize)]
pub struct Miss {
    pub repository: String,
    pub reference: String,
    pub kind: String,
    pub outcome: String,
    pub digest: Option<String>,
    pub served_by: Option<String>,
    pub count: u64,
    pub first_seen: u64,
    pub last_seen: u64,
}

pub(crate) fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (part as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

impl RouteReport {
    /// A report from what the store read: the totals and shares are computed here, the same for
    /// every store.
    pub(crate) fn new(
        route: &str,
        target: &str,
        since: u64,
        backends: Vec<BackendTraffic>,
        hours: Vec<HourShare>,
        open_misses: u64,
        misses: Vec<Miss>,
    ) -> RouteReport {
        let requests = backends.iter().map(|b| b.requests).sum();
        let bytes = backends.iter().map(|b| b.bytes).sum();
        let target_requests = backends.iter().filter(|b| b.backend == target).map(|b| b.requests).sum();
        let target_bytes = backends.iter().filter(|b| b.backend == target).map(|b| b.bytes).sum();
        RouteReport {
            route: route.to_owned(),
            target: target.to_owned(),
            since,
            requests,
            target_requests,
            bytes,
            target_bytes,
            target_request_share: share(target_requests, requests),
            target_byte_share: share(target_bytes, bytes),
            backends,
            hours,
            open_misses,
            misses,
        }
    }
}

/// The report of one route since `since` (unix seconds), with at most `limit` misses.
pub fn route_report(
    store: &Store,
    route: &str,
    target: &str,
    since: u64,
    limit: usize,
) -> rusqlite::Result<RouteReport> {
    let c = store.conn();
    let since_hour = (since / 3600 * 3600) as i64;
    let mut backends = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT backend, sum(requests), sum(bytes) FROM traffic WHERE route = ?1 AND hour >= ?2
         GROUP BY backend ORDER BY sum(requests) DESC, backend",
    )?;
    let rows = st.query_map(params![route, since_hour], |r| {
        Ok(BackendTraffic {
            backend: r.get(0)?,
            requests: r.get::<_, i64>(1)? as u64,
            bytes: r.get::<_, i64>(2)? as u64,
        })
    })?;
    for row in rows {
        backends.push(row?);
    }
    let mut hours = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT hour, sum(requests), sum(CASE WHEN backend = ?3 THEN requests ELSE 0 END)
         FROM traffic WHERE route = ?1 AND hour >= ?2 GROUP BY hour ORDER BY hour",
    )?;
    let rows = st.query_map(params![route, since_hour, target], |r| {
        let (hour, req, tr): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok(HourShare {
            hour: hour as u64,
            requests: req as u64,
            target_requests: tr as u64,
            target_request_share: share(tr as u64, req as u64),
        })
    })?;
    for row in rows {
        hours.push(row?);
    }

    let open_misses: i64 = c.query_row(
        "SELECT count(*) FROM misses WHERE route = ?1 AND resolved_at IS NULL AND last_seen >= ?2",
        params![route, since as i64],
        |r| r.get(0),
    )?;
    let mut misses = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT repository, reference, kind, outcome, digest, served_by, count, first_seen, last_seen
         FROM misses WHERE route = ?1 AND resolved_at IS NULL AND last_seen >= ?2
         ORDER BY count DESC, last_seen DESC LIMIT ?3",
    )?;
    let rows = st.query_map(params![route, since as i64, limit as i64], |r| {
        Ok(Miss {
            repository: r.get(0)?,
            reference: r.get(1)?,
            kind: r.get(2)?,
            outcome: r.get(3)?,
            digest: r.get(4)?,
            served_by: r.get(5)?,
            count: r.get::<_, i64>(6)? as u64,
            first_seen: r.get::<_, i64>(7)? as u64,
            last_seen: r.get::<_, i64>(8)? as u64,
        })
    })?;
    for row in rows {
        misses.push(row?);
    }
    Ok(RouteReport::new(route, target, since, backends, hours, open_misses as u64, misses))
}

/// Human-readable rendering of reports.
pub fn render_table(reports: &[RouteReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "route {}  target {}: {:.1}% of requests ({} of {}), {:.1}% of bytes ({} of {}); {} open misses",
            r.route,
            r.target,
            r.target_request_share,
            r.target_requests,
            r.requests,
            r.target_byte_share,
            human_bytes(r.target_bytes),
            human_bytes(r.bytes),
            r.open_misses
        );
        for b in &r.backends {
            let name = if b.backend.is_empty() { "(nothing served)" } else { &b.backend };
            let _ = writeln!(out, "  {name:<24} {:>10} requests {:>12}", b.requests, human_bytes(b.bytes));
        }
        if !r.misses.is_empty() {
            let _ = writeln!(
                out,
                "  {:>6}  {:<9} {:<8} {:<16} {:<19}  {:<60} DIGEST",
                "COUNT", "OUTCOME", "KIND", "SERVED BY", "LAST SEEN (UTC)", "IMAGE"
            );
            for m in &r.misses {
                let image = if m.reference.contains(':') {
                    format!("{}@{}", m.repository, m.reference)
                } else {
                    format!("{}:{}", m.repository, m.reference)
                };
                let _ = writeln!(
                    out,
                    "  {:>6}  {:<9} {:<8} {:<16} {:<19}  {:<60} {}",
                    m.count,
                    m.outcome,
                    m.kind,
                    m.served_by.as_deref().unwrap_or("-"),
                    utc(m.last_seen),
                    image,
                    m.digest.as_deref().unwrap_or("-")
                );
            }
        }
    }
    out
}

/// `2026-11-29 02:13:00` from unix seconds (UTC; no time-zone database needed).
pub fn utc(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Event, Outcome};
    use super::*;

    fn ev(route: &str, reference: &str, served_by: Option<&str>, bytes: u64, miss: Option<Outcome>) -> Event {
        Event {
            at: 7200 + 10,
            route: route.into(),
            repository: "library/alpine".into(),
            reference: reference.into(),
            kind: "blob",
            digest: Some(reference.into()),
            served_by: served_by.map(Into::into),
            bytes,
            miss,
            target_asked: true,
            warmed: false,
        }
    }

    #[test]
    fn verified_resolutions_hold_against_misses_that_did_not_ask_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.db")).unwrap();
        let shadow = |at: u64, asked: bool| Event {
            at,
            target_asked: asked,
            ..ev("hub", "sha256:b", Some("old"), 100, Some(Outcome::Fallback))
        };
        let warmed = |at: u64| Event { at, warmed: true, miss: None, ..ev("hub", "sha256:b", Some("t"), 0, None) };
        s.apply(&[shadow(100, false), warmed(101)]).unwrap();
        assert_eq!(route_report(&s, "hub", "t", 0, 10).unwrap().open_misses, 0);
        // The old mirror served it again without the target being asked: the warm still stands.
        s.apply(&[shadow(200, false)]).unwrap();
        assert_eq!(route_report(&s, "hub", "t", 0, 10).unwrap().open_misses, 0);
        // A miss committed late (from before the warm) does not reopen it either, asked or not.
        s.apply(&[shadow(100, true)]).unwrap();
        assert_eq!(route_report(&s, "hub", "t", 0, 10).unwrap().open_misses, 0);
        // The target was asked after the warm and lacked it: open again.
        s.apply(&[shadow(300, true)]).unwrap();
        assert_eq!(route_report(&s, "hub", "t", 0, 10).unwrap().open_misses, 1);
        // A resolution older than the last miss does not close it.
        s.apply(&[Event { at: 250, ..ev("hub", "sha256:b", Some("t"), 100, None) }]).unwrap();
        assert_eq!(route_report(&s, "hub", "t", 0, 10).unwrap().open_misses, 1);
    }

    /// `--since`: traffic and misses older than the window are left out, those inside it counted.
    #[test]
    fn since_leaves_out_older_traffic_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.db")).unwrap();
        let now = super::super::now_unix();
        let (old, new) = (now - 3 * 3600, now);
        s.apply(&[
            Event { at: old, ..ev("hub", "sha256:old-hit", Some("harbor"), 1000, None) },
            Event { at: old, ..ev("hub", "sha256:old-miss", Some("mirror"), 500, Some(Outcome::Fallback)) },
            Event { at: new, ..ev("hub", "sha256:new-hit", Some("harbor"), 30, None) },
            Event { at: new, ..ev("hub", "sha256:new-miss", None, 0, Some(Outcome::Absent)) },
        ])
        .unwrap();

        let r = route_report(&s, "hub", "harbor", now - 3600, 10).unwrap();
        assert_eq!((r.requests, r.target_requests, r.bytes, r.target_bytes), (2, 1, 30, 30), "{r:#?}");
        assert_eq!(r.target_request_share, 50.0);
        assert_eq!(r.target_byte_share, 100.0);
        let backends: Vec<_> = r.backends.iter().map(|b| (b.backend.as_str(), b.requests, b.bytes)).collect();
        assert_eq!(backends, [("", 1, 0), ("harbor", 1, 30)], "the old mirror's old traffic is out");
        assert_eq!(r.hours.len(), 1, "{:#?}", r.hours);
        assert_eq!(r.hours[0].hour, new / 3600 * 3600);
        assert_eq!(r.open_misses, 1);
        let misses: Vec<_> = r.misses.iter().map(|m| m.reference.as_str()).collect();
        assert_eq!(misses, ["sha256:new-miss"], "the old miss is out");

        // The whole history: both hours and both misses.
        let all = route_report(&s, "hub", "harbor", now - 4 * 3600, 10).unwrap();
        assert_eq!((all.requests, all.bytes, all.open_misses, all.hours.len()), (4, 1530, 2, 2), "{all:#?}");
    }

    /// Per-hour traffic: one row per hour with its requests and the target's share of them.
    #[test]
    fn traffic_by_hour() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.db")).unwrap();
        let (h1, h2) = (10 * 3600, 12 * 3600);
        let at = |at: u64, served_by: Option<&str>, miss: Option<Outcome>| Event {
            at,
            ..ev("hub", &format!("sha256:{at}"), served_by, 10, miss)
        };
        s.apply(&[
            // Hour 10: 1 of 4 from the target.
            at(h1 + 5, Some("harbor"), None),
            at(h1 + 60, Some("mirror"), Some(Outcome::Fallback)),
            at(h1 + 61, Some("mirror"), Some(Outcome::Fallback)),
            at(h1 + 3599, None, Some(Outcome::Absent)),
            // Hour 12: 2 of 2. Another route's traffic in the same hour does not count.
            at(h2, Some("harbor"), None),
            at(h2 + 1800, Some("harbor"), None),
            Event { at: h2 + 10, ..ev("quay", "sha256:q", Some("mirror"), 10, Some(Outcome::Fallback)) },
        ])
        .unwrap();
        let r = route_report(&s, "hub", "harbor", 0, 10).unwrap();
        let hours: Vec<_> =
            r.hours.iter().map(|h| (h.hour, h.requests, h.target_requests, h.target_request_share)).collect();
        assert_eq!(hours, [(h1, 4, 1, 25.0), (h2, 2, 2, 100.0)]);
        assert_eq!((r.requests, r.target_requests, r.target_request_share), (6, 3, 50.0));
    }

    /// A manifest missed by tag closes when the target serves the same manifest by digest; one
    /// with another digest, another repository or another route stays open.
    #[test]
    fn a_tag_miss_closes_when_the_target_serves_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.db")).unwrap();
        let manifest = |repo: &str, reference: &str, digest: &str, served_by: Option<&str>, at: u64| Event {
            at,
            repository: repo.into(),
            kind: "manifest",
            digest: Some(digest.into()),
            miss: if served_by == Some("harbor") { None } else { Some(Outcome::Fallback) },
            ..ev("hub", reference, served_by, 100, None)
        };
        s.apply(&[
            manifest("app", "1", "sha256:m1", Some("mirror"), 100),
            manifest("app", "2", "sha256:m2", Some("mirror"), 100),
            manifest("other", "1", "sha256:m1", Some("mirror"), 100),
            Event { route: "quay".into(), ..manifest("app", "1", "sha256:m1", Some("mirror"), 100) },
        ])
        .unwrap();
        assert_eq!(route_report(&s, "hub", "harbor", 0, 10).unwrap().open_misses, 3);

        s.apply(&[manifest("app", "sha256:m1", "sha256:m1", Some("harbor"), 200)]).unwrap();
        let r = route_report(&s, "hub", "harbor", 0, 10).unwrap();
        let mut open: Vec<_> = r.misses.iter().map(|m| (m.repository.as_str(), m.reference.as_str())).collect();
        open.sort();
        assert_eq!(open, [("app", "2"), ("other", "1")], "app:1 closed, the rest open: {r:#?}");
        assert_eq!(route_report(&s, "quay", "harbor", 0, 10).unwrap().open_misses, 1, "another route");
        let by: String = s
            .conn()
            .query_row(
                "SELECT resolved_by FROM misses WHERE route = 'hub' AND repository = 'app' AND reference = '1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(by, "target");
        // A resolution older than the miss does not close it.
        s.apply(&[manifest("app", "2", "sha256:m2", Some("mirror"), 300)]).unwrap();
        s.apply(&[manifest("app", "sha256:m2", "sha256:m2", Some("harbor"), 250)]).unwrap();
        assert_eq!(route_report(&s, "hub", "harbor", 0, 10).unwrap().open_misses, 2);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_919_580), "2026-11-29 02:33:00");
    }

    #[test]
    fn readiness_and_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("l.db")).unwrap();
        s.apply(&[
            ev("hub", "sha256:a", Some("harbor"), 300, None),
            ev("hub", "sha256:b", Some("old"), 100, Some(Outcome::Fallback)),
            ev("hub", "sha256:b", Some("old"), 100, Some(Outcome::Fallback)),
            ev("hub", "sha256:c", None, 0, Some(Outcome::Absent)),
        ])
        .unwrap();
        let r = route_report(&s, "hub", "harbor", 0, 10).unwrap();
        assert_eq!((r.requests, r.target_requests, r.bytes, r.target_bytes), (4, 1, 500, 300));
        assert_eq!(r.target_request_share, 25.0);
        assert_eq!(r.target_byte_share, 60.0);
        assert_eq!(r.open_misses, 2);
        assert_eq!(r.misses[0].reference, "sha256:b");
        assert_eq!(r.misses[0].count, 2);
        assert_eq!(r.hours.len(), 1);
        // The target now serves b: that miss closes.
        s.apply(&[ev("hub", "sha256:b", Some("harbor"), 100, None)]).unwrap();
        let r = route_report(&s, "hub", "harbor", 0, 10).unwrap();
        assert_eq!(r.open_misses, 1);
        assert_eq!(r.misses[0].reference, "sha256:c");
        assert!(render_table(&[r]).contains("sha256:c"));
    }
}
