//! The subcommands other than `serve`: `check`, `misses`, `client-config`, `inventory`, `migrate`.
//! CLI glue: it loads the configuration, calls the library, and prints; errors are `anyhow`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::{load, ClientKind, ConfigProblem, Format, DEFAULT_LEDGER, EXIT_CONFIG};
use regmux::app::App;
use regmux::config::Config;
use regmux::ledger::Recorder;

pub fn check(path: Option<&Path>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regmux: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = App::new(config.clone(), Recorder::disabled()) {
        eprintln!("regmux: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("configuration OK: {}", path.map_or("built-in default".into(), |p| p.display().to_string()));
    println!("listen {}  admin {}", config.server.listen, config.admin.listen);
    for r in &config.routes {
        let mut claims = Vec::new();
        if !r.registries.is_empty() {
            claims.push(format!("registries {}", r.registries.join(", ")));
        }
        if !r.hosts.is_empty() {
            claims.push(format!("hosts {}", r.hosts.join(", ")));
        }
        if r.default {
            claims.push("default".into());
        }
        println!("route {:?}: {}", r.name, claims.join("; "));
        for (i, b) in r.backends.iter().enumerate() {
            let bc = &config.backends[b];
            let prefix = bc.prefix.as_deref().map(|p| format!("/{p}")).unwrap_or_default();
            let target = if r.target() == Some(b.as_str()) { "  (migration target)" } else { "" };
            println!("  {}. {b}: {}{prefix}{target}", i + 1, bc.url);
        }
    }
    ExitCode::SUCCESS
}

pub fn misses(
    path: Option<&Path>,
    route: Option<&str>,
    since: &str,
    format: Format,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    use regmux::ledger::report;
    let config = load(path).map_err(|e| ConfigProblem(e.to_string()))?;
    let window =
        parse_window(since).ok_or_else(|| ConfigProblem(format!("--since {since:?}: expected like 7d, 24h or 30m")))?;
    let (location, ledger) = ledger_of(&config)?;
    let since_ts = regmux::ledger::now_unix().saturating_sub(window);
    let rt = runtime()?;
    let mut reports = Vec::new();
    for r in &config.routes {
        if route.is_some_and(|want| want != r.name) {
            continue;
        }
        let report = rt.block_on(ledger.route_report(&r.name, r.target().unwrap_or_default(), since_ts, limit));
        reports.push(report.map_err(anyhow::Error::msg).with_context(|| format!("cannot read the ledger {location}"))?);
    }
    if let Some(want) = route {
        if reports.is_empty() {
            return Err(ConfigProblem(format!("no route named {want:?} in the configuration")).into());
        }
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
        Format::Table => print!("{}", report::render_table(&reports)),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn client_config(
    path: Option<&Path>,
    client: ClientKind,
    endpoint: Option<String>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use regmux::clientconfig::{generate, Client};
    let client = match client {
        ClientKind::Docker => Client::Docker,
        ClientKind::Podman => Client::Podman,
        ClientKind::Containerd => Client::Containerd,
    };
    // Routes and host names only: the files the configuration names (password_file, …) need not be
    // readable, and an endpoint with a path is refused (see regmux::clientconfig).
    let files = generate(path, client, endpoint.as_deref()).map_err(|e| ConfigProblem(e.to_string()))?;
    for f in files {
        match &out {
            Some(dir) => {
                let target = dir.join(f.path.trim_start_matches('/'));
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
                }
                std::fs::write(&target, &f.text).with_context(|| format!("write {}", target.display()))?;
                println!("wrote {}", target.display());
            }
            None => print!("# ---- {} ----\n{}\n", f.path, f.text),
        }
    }
    Ok(())
}

/// `7d`, `24h`, `30m`, `90s` → seconds.
pub fn parse_window(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let unit_secs = match unit {
        "d" => 86_400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    n.checked_mul(unit_secs)
}

/// The configured ledger (or the default SQLite file) and its description.
fn ledger_of(config: &Config) -> anyhow::Result<(String, regmux::ledger::Ledger)> {
    use regmux::ledger::{Ledger, Location};
    let location = Location::from_config(&config.ledger)
        .map_err(ConfigProblem)?
        .unwrap_or_else(|| Location::Sqlite(PathBuf::from(DEFAULT_LEDGER)));
    let ledger = Ledger::open(&location).map_err(ConfigProblem)?;
    Ok((location.describe(), ledger))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")
}

fn backend(config: &Config, name: &str) -> anyhow::Result<Arc<regmux::backend::Backend>> {
    let cfg = config.backends.get(name).ok_or_else(|| ConfigProblem(format!("no backend named {name:?}")))?;
    let metrics = Arc::new(regmux::metrics::Metrics::new());
    Ok(Arc::new(regmux::backend::Backend::new(name, cfg, metrics).map_err(|e| ConfigProblem(e.to_string()))?))
}

pub fn inventory(
    path: Option<&Path>,
    backend_name: &str,
    storage: Option<&Path>,
    repo: Option<&str>,
    format: Format,
    concurrency: usize,
) -> anyhow::Result<ExitCode> {
    use regmux::migrate::{inventory, Completeness};
    let config = load(path).map_err(|e| ConfigProblem(e.to_string()))?;
    let b = backend(&config, backend_name)?;
    let source = match storage {
        Some(dir) => inventory::Source::storage(dir, b)?,
        None => inventory::Source::api(b),
    };
    let images = runtime()?.block_on(inventory::inventory(&source, repo, concurrency))?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&images)?),
        Format::Table => {
            for i in &images {
                println!("{}:{}@{}", i.repository, i.tag, i.digest);
            }
        }
    }
    let count = |s| images.iter().filter(|i| i.status == s).count();
    eprintln!(
        "{} images: {} complete, {} partial, {} manifest-only",
        images.len(),
        count(Completeness::Complete),
        count(Completeness::Partial),
        count(Completeness::ManifestOnly)
    );
    for i in images.iter().filter(|i| i.status != Completeness::Complete) {
        eprintln!("  {:?} {}:{}@{} lacks {}", i.status, i.repository, i.tag, i.digest, i.missing.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Images done out of all, and the bytes moved so far, read from the running counter (which grows per
/// chunk as blobs stream) and redrawn on a steady tick, so a large layer shows progress while it moves.
/// Only on a terminal: hidden when stderr is a file or a pipe.
fn progress_bar(images: u64, moved: Arc<std::sync::atomic::AtomicU64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(images);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images  {moved} moved  {msg:.dim}",
    )
    .map(|s| {
        s.with_key("moved", move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let n = moved.load(std::sync::atomic::Ordering::Relaxed);
            let _ = w.write_str(&regmux::ledger::report::human_bytes(n));
        })
    })
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

pub enum Source {
    Ledger,
    Inventory(PathBuf),
}

#[allow(clippy::too_many_arguments)]
pub fn migrate(
    path: Option<&Path>,
    route: &str,
    source: Source,
    to: Option<&str>,
    mode: Option<crate::MigrateMode>,
    concurrency: usize,
    dry_run: bool,
    format: Format,
) -> anyhow::Result<ExitCode> {
    use regmux::config::BackendKind;
    use regmux::migrate::transfer::{items_from_inventory, items_from_ledger, Migration, Mode};
    let config = load(path).map_err(|e| ConfigProblem(e.to_string()))?;
    let rc = config
        .routes
        .iter()
        .find(|r| r.name == route)
        .ok_or_else(|| ConfigProblem(format!("no route named {route:?}")))?;
    let dest_name = to.or(rc.target()).unwrap_or_default().to_owned();
    let dest = backend(&config, &dest_name)?;
    let sources =
        rc.backends.iter().filter(|b| **b != dest_name).map(|b| backend(&config, b)).collect::<Result<Vec<_>, _>>()?;
    let mode = match mode {
        Some(crate::MigrateMode::Warm) => Mode::Warm,
        Some(crate::MigrateMode::Copy) => Mode::Copy,
        None if dest.kind == BackendKind::Harbor => Mode::Warm,
        None => Mode::Copy,
    };
    if mode == Mode::Copy && sources.is_empty() {
        return Err(ConfigProblem(format!("route {route:?} has no backend to copy from besides {dest_name}")).into());
    }
    let (location, ledger) = ledger_of(&config)?;
    // A SQLite ledger that does not exist has nothing to resolve, and is not created here.
    let ledger_exists = match &ledger {
        regmux::ledger::Ledger::Sqlite(p) => p.exists(),
        regmux::ledger::Ledger::Postgres(_) => true,
    };
    let rt = runtime()?;
    let items = match &source {
        Source::Ledger => {
            let misses = rt
                .block_on(ledger.open_misses(route))
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("read the ledger {location}"))?;
            items_from_ledger(misses)
        }
        Source::Inventory(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
            items_from_inventory(&text).map_err(anyhow::Error::msg)?
        }
    };
    let migration = Migration::new(mode, dest, sources, dry_run);
    let bar = progress_bar(items.len() as u64, migration.bytes.clone());
    let summary = rt.block_on(migration.run(items, concurrency, &|item| {
        bar.set_message(item.label());
        bar.inc(1);
    }));
    bar.finish_and_clear();
    if !dry_run && !summary.digests.is_empty() && ledger_exists {
        let digests: Vec<String> = summary.digests.iter().cloned().collect();
        match rt.block_on(ledger.resolve_digests(route, &digests, "migrate")) {
            Ok(n) => eprintln!("ledger: {n} misses marked resolved"),
            Err(e) => eprintln!("ledger: could not mark misses resolved: {e}"),
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let verb = if dry_run { "would move" } else { "moved" };
        for e in &summary.moved {
            println!("{verb:<10} {}  ({})", e.image, regmux::ledger::report::human_bytes(e.bytes));
        }
        for e in &summary.already {
            println!("{:<10} {}", "already", e.image);
        }
        for e in &summary.stale_tags {
            println!("{:<10} {}", "stale-tag", e.reason.as_deref().unwrap_or(""));
        }
        for e in &summary.failed {
            println!("{:<10} {}: {}", "failed", e.image, e.reason.as_deref().unwrap_or(""));
        }
        println!(
            "{} {verb}, {} already there, {} failed, {} stale tags",
            summary.moved.len(),
            summary.already.len(),
            summary.failed.len(),
            summary.stale_tags.len()
        );
    }
    Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::parse_window;

    #[test]
    fn windows() {
        assert_eq!(parse_window("7d"), Some(604_800));
        assert_eq!(parse_window("12h"), Some(43_200));
        assert_eq!(parse_window("30m"), Some(1_800));
        assert_eq!(parse_window("45s"), Some(45));
        for bad in ["", "7", "d", "7w", "-1d", "1.5h", "99999999999999999999d", "999999999999999999d"] {
            assert_eq!(parse_window(bad), None, "{bad:?}");
        }
    }
}
