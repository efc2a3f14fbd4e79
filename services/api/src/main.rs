//! `otherix-api`: the Otherix control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use otherix_api::{ApiServer, Config, config::LogFormat};

/// The Otherix control plane.
#[derive(Debug, Parser)]
#[command(name = "otherix-api", version)]
struct Args {
    /// YAML config file; `OTHERIX_*` environment variables override its keys.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref(), std::env::vars()).context("invalid configuration")?;
    if args.check_config {
        eprintln!("config ok");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    rt.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let format = match config.logger.format {
        LogFormat::Text => otherix_telemetry::LogFormat::Text,
        LogFormat::Json => otherix_telemetry::LogFormat::Json,
    };
    let telemetry = otherix_telemetry::init(&otherix_telemetry::TelemetryConfig::from_env(
        "otherix-api",
        &config.logger.level,
        format,
    ))
    .context("cannot set up logging")?;
    // Every TLS user (server, etcd, OTLP) shares the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let bootstrap_admin = otherix_api::identity::bootstrap::BootstrapAdmin::from_env(|k| std::env::var(k).ok())
        .map_err(|m| anyhow::anyhow!(m))
        .context("invalid bootstrap admin")?;
    let options = otherix_api::StartOptions { bootstrap_admin };
    // The listener answers /healthz and a 503 /readyz while start-up waits
    // for the store; a signal during that wait ends the process.
    let server = tokio::select! {
        started = ApiServer::start_with(config, options) => started.context("otherix-api failed to start")?,
        () = shutdown_signal() => {
            tracing::info!("interrupted during start-up");
            return Ok(());
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    // Flushing waits on the exporter, which runs on this runtime.
    let _ = tokio::task::spawn_blocking(move || drop(telemetry)).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
