//! `otherix-agent`: runs VMs on one KVM/QEMU host for the control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use otherix_agent::config::{AgentConfig, LogFormat};
use otherix_agent::server;
use otherix_agent::service::AgentService;
use otherix_vm_runtime::Runtime;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "otherix-agent", version, about = "Runs VMs on this host for the Otherix control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the agent API.
    Serve {
        /// The agent's YAML config file.
        #[arg(long, env = "OTHERIX_AGENT_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(cfg: &AgentConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log.level.clone().unwrap_or_else(|| "info".into())));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            // Everything the agent and its QEMUs create (records, sockets,
            // seeds, disks, logs) is for the agent alone.
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            let cfg = AgentConfig::load(&config)?;
            init_logging(&cfg);
            let rt = Runtime::open(cfg.runtime.clone()).await.context("open the VM runtime")?;
            info!(accelerator = ?rt.accelerator(), "agent runtime ready");
            let listener = server::bind_unix(&cfg.server.unix_socket)?;
            let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                // VMs keep running: QEMU lives in its own session.
                info!("shutting down the agent; VMs keep running");
            };
            server::serve_unix(AgentService::new(rt), listener, shutdown).await
        }
    }
}
