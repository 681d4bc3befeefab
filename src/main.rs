//! The `regmux` command: argument parsing, logging setup, and load → validate → bind → run.
//! Library code never exits the process; only this file decides exit codes (64 for a bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use regmux::app::App;
use regmux::config::Config;

mod cli;
use regmux::ledger::Recorder;
use regmux::server;

/// Exit code for a configuration that cannot be used (EX_USAGE).
pub(crate) const EXIT_CONFIG: u8 = 64;
/// Where the ledger lives when the configuration has no `[ledger] path`.
pub(crate) const DEFAULT_LEDGER: &str = "/var/lib/regmux/ledger.db";

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
    /// List what a registry really holds, image by image (`repo:tag@digest` per line, or JSON).
    Inventory {
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
        /// The backend (from the configuration) to list.
        #[arg(long)]
        backend: String,
        /// Read the backend's distribution storage folder instead of its API (read-only; downloads nothing).
        #[arg(long)]
        storage: Option<PathBuf>,
        /// Only repositories matching this glob (`library/*`).
        #[arg(long)]
        repo: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Bring images into a route's target by digest: warm a Harbor proxy cache, or copy.
    Migrate {
        #[arg(long, env = "REGMUX_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        route: String,
        /// Everything the ledger records as still missing from the target.
        #[arg(long, conflicts_with = "from", required_unless_present = "from")]
        from_ledger: bool,
        /// An inventory: `regmux inventory` output (text lines or JSON).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The backend to fill (default: the route's target).
        #[arg(long)]
        to: Option<String>,
        /// warm (GET through a proxy cache) or copy (push); default: warm for kind = "harbor", else copy.
        #[arg(long, value_enum)]
        mode: Option<MigrateMode>,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Say what would move, move nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
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
pub(crate) enum ClientKind {
    Docker,
    Podman,
    Containerd,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum MigrateMode {
    Warm,
    Copy,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    #[value(alias = "text")]
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
        Command::Check { config } => cli::check(config.as_deref()),
        Command::Misses { config, route, since, format, limit } => {
            match cli::misses(config.as_deref(), route.as_deref(), &since, format, limit) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("regmux: {e:#}");
                    ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
                }
            }
        }
        Command::ClientConfig { config, client, endpoint, out } => {
            match cli::client_config(config.as_deref(), client, endpoint, out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("regmux: {e:#}");
                    ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
                }
            }
        }
        Command::Inventory { config, backend, storage, repo, format, concurrency } => {
            exit(cli::inventory(config.as_deref(), &backend, storage.as_deref(), repo.as_deref(), format, concurrency))
        }
        Command::Migrate { config, route, from_ledger, from, to, mode, concurrency, dry_run, format } => {
            let source =
                if from_ledger { cli::Source::Ledger } else { cli::Source::Inventory(from.unwrap_or_default()) };
            exit(cli::migrate(config.as_deref(), &route, source, to.as_deref(), mode, concurrency, dry_run, format))
        }
    }
}

/// The exit code of a CLI command: 64 for configuration problems, 1 for other errors.
fn exit(r: anyhow::Result<ExitCode>) -> ExitCode {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("regmux: {e:#}");
            ExitCode::from(if e.is::<ConfigProblem>() { EXIT_CONFIG } else { 1 })
        }
    }
}

pub(crate) fn load(path: Option<&Path>) -> Result<Config, regmux::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::builtin()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConfigProblem(String);

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
        tokio::spawn(app.warmer.clone().run(app.recorder.clone()));
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
        server::run(listener, app, tls, server::Limits::from_config(&config.server), stop_signal()).await;
        Ok::<_, anyhow::Error>(())
    });
    // Every acknowledged ledger event is written before the process exits.
    recorder.shutdown();
    if recorder.enabled() {
        tracing::info!(written = recorder.stats.written.load(std::sync::atomic::Ordering::Relaxed), "ledger flushed");
    }
    result
}

/// The ledger of `[ledger] path` (SQLite) or `[ledger] url` (PostgreSQL). Without either, the default
/// SQLite path is used when it can be created; otherwise regmux serves without a ledger and says so.
fn open_ledger(config: &Config) -> anyhow::Result<Recorder> {
    use regmux::ledger::Location;
    match Location::from_config(&config.ledger).map_err(ConfigProblem)? {
        Some(location) => {
            let recorder = Recorder::open(&location).map_err(|e| ConfigProblem(e.to_string()))?;
            tracing::info!(ledger = %location.describe(), "ledger open");
            Ok(recorder)
        }
        None => match Recorder::open(&Location::Sqlite(PathBuf::from(DEFAULT_LEDGER))) {
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
