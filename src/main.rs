//! The `regmux` command: argument parsing, logging setup, and load → validate → bind → run.
//! Library code never exits the process; only this file decides exit codes (64 for a bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use regmux::app::App;
use regmux::config::Config;
use regmux::ledger::Recorder;
use regmux::server;

/// Exit code for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Where the ledger lives when the configuration has no `[ledger] path`.
const DEFAULT_LEDGER: &str = "/var/lib/regmux/ledger.db";

#[derive(Parser)]
#[command(
    name = "regmux",
    version,
    about = "A registry pull proxy in front of several registries, with a migration ledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry pull API.
    Serve {
        /// Configuration file; without it the built-in default (public registries) is used.
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding `[server] listen`.
        #[arg(long, env = "REGMUX_LISTEN")]
        listen: Option<String>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "REGMUX_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Validate a configuration, report every problem, and print the resolved routes.
    Check {
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Report what each route's migration target still lacks, and the share of traffic it serves.
    Misses {
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// The window: `7d`, `24h`, `30m`.
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// At most this many misses per route.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// List what a registry really holds (not available in this version).
    Inventory,
    /// Bring images into the migration target (not available in this version).
    Migrate,
    /// Print what Docker, Podman or containerd needs to pull through regmux, for every route.
    ClientConfig {
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long = "for", value_enum)]
        client: ClientKind,
        /// How clients reach regmux, e.g. https://mirror.example:5000 (default: from [server] listen).
        #[arg(long)]
        endpoint: Option<String>,
        /// Write the files under this folder (DIR/etc/...) instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ClientKind {
    Docker,
    Podman,
    Containerd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One process-wide TLS provider for both the server side and reqwest's backends.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Serve { config, listen, log_format } => {
            init_tracing(log_format);
            let loaded = match load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("regmux: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match serve(loaded, listen, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("regmux: {e:#}");
                    ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
                }
            }
        }
        Command::Check { config } => check(config.as_deref()),
        Command::Misses { config, route, since, format, limit } => {
            match misses(config.as_deref(), route.as_deref(), &since, format, limit) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("regmux: {e:#}");
                    ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
                }
            }
        }
        Command::ClientConfig { config, client, endpoint, out } => {
            match client_config(config.as_deref(), client, endpoint, out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("regmux: {e:#}");
                    ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
                }
            }
        }
        Command::Inventory | Command::Migrate => {
            eprintln!("regmux: this subcommand is not available in this version yet");
            ExitCode::from(2)
        }
    }
}

fn load(path: Option<&Path>) -> Result<Config, regmux::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::builtin()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigProblem(String);

fn check(path: Option<&Path>) -> ExitCode {
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

fn misses(
    path: Option<&Path>,
    route: Option<&str>,
    since: &str,
    format: Format,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    use regmux::ledger::{report, store::Store};
    let config = load(path).map_err(|e| ConfigProblem(e.to_string()))?;
    let window =
        parse_window(since).ok_or_else(|| ConfigProblem(format!("--since {since:?}: expected like 7d, 24h or 30m")))?;
    let db = config.ledger.path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LEDGER));
    let store = Store::open_read_only(&db).with_context(|| format!("cannot open the ledger {}", db.display()))?;
    let since_ts = regmux::ledger::now_unix().saturating_sub(window);
    let mut reports = Vec::new();
    for r in &config.routes {
        if route.is_some_and(|want| want != r.name) {
            continue;
        }
        reports.push(report::route_report(&store, &r.name, r.target().unwrap_or_default(), since_ts, limit)?);
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

fn client_config(
    path: Option<&Path>,
    client: ClientKind,
    endpoint: Option<String>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use regmux::clientconfig::{render, Client};
    let config = load(path).map_err(|e| ConfigProblem(e.to_string()))?;
    let endpoint = endpoint.unwrap_or_else(|| {
        let scheme = if config.server.tls_cert.is_some() { "https" } else { "http" };
        let port = config.server.listen.rsplit_once(':').map_or("5000", |(_, p)| p);
        format!("{scheme}://localhost:{port}")
    });
    let client = match client {
        ClientKind::Docker => Client::Docker,
        ClientKind::Podman => Client::Podman,
        ClientKind::Containerd => Client::Containerd,
    };
    for f in render(&config, client, &endpoint) {
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
fn parse_window(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "d" => n * 86_400,
        "h" => n * 3600,
        "m" => n * 60,
        "s" => n,
        _ => return None,
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn serve(mut config: Config, listen: Option<String>, path: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(l) = &listen {
        config.server.listen = l.clone();
        config.validate().map_err(|p| ConfigProblem(p.join("; ")))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    let recorder = open_ledger(&config)?;
    let result = runtime.block_on(async {
        let app = Arc::new(App::new(config.clone(), recorder.clone()).map_err(|e| ConfigProblem(e.to_string()))?);
        let admin = tokio::net::TcpListener::bind(&config.admin.listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.admin.listen))?;
        tracing::info!(addr = %admin.local_addr()?, "admin listening: /metrics /healthz /readyz /ui");
        tokio::spawn(regmux::admin::run(admin, app.clone()));
        tokio::spawn(app.clone().health_loop());
        let listener = tokio::net::TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(server::load_tls(cert, key).map_err(|e| ConfigProblem(e.to_string()))?),
            _ => None,
        };
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, routes = config.routes.len(), backends = config.backends.len(), "listening");
        tokio::spawn(reload_on_hangup(app.clone(), path, listen));
        server::run(listener, app, tls, server::Limits::default(), stop_signal()).await;
        Ok::<_, anyhow::Error>(())
    });
    // Every acknowledged ledger event is written before the process exits.
    recorder.shutdown();
    if recorder.enabled() {
        tracing::info!(written = recorder.stats.written.load(std::sync::atomic::Ordering::Relaxed), "ledger flushed");
    }
    result
}

/// The SQLite ledger of `[ledger] path`. Without a `[ledger]` section the default path is used when it
/// can be created; otherwise regmux serves without a ledger and says so.
fn open_ledger(config: &Config) -> anyhow::Result<Recorder> {
    if config.ledger.url.is_some() {
        return Err(
            ConfigProblem("ledger.url (PostgreSQL) is not supported by this version; use ledger.path".into()).into()
        );
    }
    match &config.ledger.path {
        Some(p) => Ok(Recorder::open(p).map_err(|e| ConfigProblem(e.to_string()))?),
        None => match Recorder::open(Path::new(DEFAULT_LEDGER)) {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!("no [ledger] configured and the default {DEFAULT_LEDGER} cannot be used ({e}); serving without a ledger");
                Ok(Recorder::disabled())
            }
        },
    }
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// SIGHUP: read the configuration again; apply it only if it is valid, else keep the running one.
async fn reload_on_hangup(app: Arc<App>, path: Option<PathBuf>, listen: Option<String>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::info!("SIGHUP: running the built-in configuration; nothing to reload");
            continue;
        };
        let result = Config::load(path).map_err(|e| e.to_string()).and_then(|mut c| {
            if let Some(l) = &listen {
                c.server.listen = l.clone();
            }
            app.reload(c).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => tracing::info!(path = %path.display(), "SIGHUP: configuration reloaded"),
            Err(e) => {
                tracing::error!(path = %path.display(), "SIGHUP: configuration rejected, keeping the running one: {e}")
            }
        }
    }
}
