//! The `kafka-sidecar` binary: parses the command line and runs the app.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kafka_sidecar::config::{redact, Config, LogFormat};
use kafka_sidecar::redrive::DlqCommand;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: the hot path allocates per record (tasks, request
/// futures, header maps), and glibc's malloc/free were ~16 % of the process; jemalloc cut the
/// CPU per record by ~15 % for ~4 MiB more peak RSS (BENCHMARKS.md, "Profile (issue 10)").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "kafka-sidecar",
    version,
    about = "Kafka consumer sidecar: delivers records to your app over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and deliver until SIGTERM/SIGINT.
    Run {
        /// TOML config file; `KAFKA_SIDECAR_<SECTION>__<KEY>` env vars override it.
        #[arg(long, env = "KAFKA_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config and print the effective config with secrets redacted.
    CheckConfig {
        #[arg(long, env = "KAFKA_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Inspect the dead-letter topic, or replay dead letters once the app is fixed.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Run { config } | Command::CheckConfig { config } => config.as_deref(),
        Command::Dlq { command } => command.config(),
    };
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprint!("kafka-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    // From here on every message the process writes is scrubbed of the config's secrets.
    redact::install(&cfg);
    match cli.command {
        Command::CheckConfig { .. } => {
            print!("{}", cfg.redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Run { .. } => run(cfg),
        Command::Dlq { command } => {
            init_tool_logging();
            kafka_sidecar::redrive::run(&cfg, &command)
        }
    }
}

fn run(cfg: Config) -> ExitCode {
    init_logging(&cfg);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "kafka-sidecar: failed to start the runtime: {}",
                redact::scrub(&e.to_string())
            );
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        kafka_sidecar::app::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = redact::scrub(&format!("{e:#}")).into_owned();
            tracing::error!("{message}");
            eprintln!("kafka-sidecar: {message}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("signal received; shutting down gracefully (send again to exit at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal; exiting now");
            std::process::exit(130);
        }
    }
}

/// The `dlq` tools log warnings and errors only (`RUST_LOG` overrides), as text on stderr.
fn init_tool_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(redact::StderrWriter)
        .init();
}

/// Logs to stderr, scrubbed of secrets. JSON lines written inside a delivery carry its
/// `trace_id` and `span_id` (see `telemetry::logs`); text lines show them in the span prefix.
fn init_logging(cfg: &Config) {
    use kafka_sidecar::telemetry::logs::{JsonWithTraceIds, TraceIdLayer};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log.format {
        LogFormat::Json => registry
            .with(TraceIdLayer)
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(JsonWithTraceIds::new(tracing_subscriber::fmt::format().json()))
                    .with_writer(redact::StderrWriter),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(redact::StderrWriter),
            )
            .init(),
    }
}
