//! `otherix-agent`: runs VMs on one KVM/QEMU host for the control plane.
//!
//! - `bootstrap`: enrols the node (pinned CA, join token, CSR) and writes the cert material
//!   and an agent config that `serve --config` runs with as it is.
//! - `serve`: loads the cert material (bootstrapping first when there is none and a join
//!   token is configured), serves the VM API on the mTLS listener and reports to the control
//!   plane over the heartbeat stream.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use otherix_agent::bootstrap::{BootstrapFlags, bootstrap_config, write_agent_config};
use otherix_agent::config::{AgentConfig, LogConfig, LogFormat};
use otherix_agent::node::{RuntimeFacts, RuntimePools, accelerator_name};
use otherix_agent::server;
use otherix_agent::service::AgentService;
use otherix_agent_enrolment::{
    BootstrapOptions, BootstrapOutcome, FactsConfig, HeartbeatClient, HeartbeatConfig, HostFactsProvider, Material,
    bootstrap, load_material,
};
use otherix_telemetry::{LogOutput, TelemetryConfig, TelemetryGuard};
use otherix_vm_runtime::Runtime;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{Instrument as _, error, info, info_span, warn};

/// How long open connections may take to finish after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "otherix-agent", version, about = "Runs VMs on this host for the Otherix control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the agent API and report to the control plane.
    Serve {
        /// The agent's YAML config file.
        #[arg(long, env = "OTHERIX_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Enrol this node with the control plane and write its cert material and agent config.
    Bootstrap(Box<BootstrapArgs>),
}

/// `otherix-agent bootstrap` flags; each input may also come from the environment
/// (`OTHERIX_BOOTSTRAP__<KEY>`) or from an existing config at `--config-path`.
#[derive(Debug, Args)]
struct BootstrapArgs {
    /// The control plane's agent listener, https://host:8443.
    #[arg(long)]
    cp_url: Option<String>,
    /// The join token itself (prefer --token-path: command lines are visible to other users).
    #[arg(long, group = "token_source")]
    token: Option<String>,
    /// A file holding the join token.
    #[arg(long, group = "token_source")]
    token_path: Option<PathBuf>,
    /// The name of an environment variable holding the join token.
    #[arg(long, group = "token_source")]
    token_env: Option<String>,
    /// The cluster CA fingerprint to pin, sha256:<hex> (as `join-tokens` prints it).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Where the control plane reaches this agent, host:port (default: host name and the
    /// port of --listen).
    #[arg(long)]
    advertised_endpoint: Option<String>,
    /// Where agent.key, agent.crt and ca.crt go (default: <state-dir>/certs).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// The agent config to write (only when absent, unless --force); read first when it
    /// exists.
    #[arg(long, default_value = "/etc/otherix/agent.yaml")]
    config_path: PathBuf,
    /// The agent's state dir, written to the config (default /var/lib/otherix).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where declared pools go, written to the config (default: <state-dir>/pools).
    #[arg(long)]
    pool_root: Option<PathBuf>,
    /// The mTLS listen address, written to the config (default 0.0.0.0:9443).
    #[arg(long)]
    listen: Option<String>,
    /// Join again even when cert material exists, and rewrite the config.
    #[arg(long)]
    force: bool,
}

impl From<BootstrapArgs> for BootstrapFlags {
    fn from(a: BootstrapArgs) -> Self {
        BootstrapFlags {
            cp_url: a.cp_url,
            token: a.token,
            token_path: a.token_path,
            token_env: a.token_env,
            ca_fingerprint: a.ca_fingerprint,
            node_name: a.node_name,
            advertised_endpoint: a.advertised_endpoint,
            cert_dir: a.cert_dir,
            state_dir: a.state_dir,
            pool_root: a.pool_root,
            listen: a.listen,
        }
    }
}

/// Logging and tracing through `otherix-telemetry`, as otherix-api does: text or JSON lines
/// (on stderr, coloured only on a terminal), `RUST_LOG` over `log.level`, and OTLP span
/// export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Keep the guard: it flushes spans.
fn init_logging(log: &LogConfig) -> anyhow::Result<TelemetryGuard> {
    let format = match log.format {
        LogFormat::Json => otherix_telemetry::LogFormat::Json,
        LogFormat::Text => otherix_telemetry::LogFormat::Text,
    };
    let level = log.level.clone().unwrap_or_else(|| "info".into());
    let cfg = TelemetryConfig::from_env("otherix-agent", &level, format);
    otherix_telemetry::init_with_output(&cfg, LogOutput::Stderr).context("set up logging")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("otherix-agent: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::Bootstrap(args) => run_bootstrap(*args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging may not be set up yet (a config error); say it on stderr either way.
            if tracing::dispatcher::has_been_set() {
                error!("{e:#}");
            } else {
                eprintln!("otherix-agent: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the join protocol; logs the outcome's line of the seed's troubleshooting table.
async fn enrol(cfg: &AgentConfig, force: bool) -> anyhow::Result<BootstrapOutcome> {
    let b = &cfg.bootstrap;
    let missing = |key: &str| {
        anyhow::anyhow!(
            "bootstrap: bootstrap.{key} is not set (flag, config or OTHERIX_BOOTSTRAP__{})",
            key.to_ascii_uppercase()
        )
    };
    let cp_url = b.cp_url.clone().ok_or_else(|| missing("cp_url"))?;
    let token = b.token_source()?.ok_or_else(|| {
        anyhow::anyhow!(
            "bootstrap: no join token: pass --token-path, --token-env or --token (or OTHERIX_BOOTSTRAP__TOKEN_PATH)"
        )
    })?;
    let fingerprint = b.ca_fingerprint.clone().ok_or_else(|| missing("ca_fingerprint"))?;
    let node_name = b.node_name.clone().ok_or_else(|| missing("node_name"))?;
    let endpoint = b.advertised_endpoint.clone().ok_or_else(|| missing("advertised_endpoint"))?;
    let mut opts = BootstrapOptions::new(cp_url, token, fingerprint, node_name.clone(), endpoint, cfg.cert_dir());
    opts.force = force;
    let outcome = bootstrap(&opts)
        .instrument(info_span!("bootstrap", node = %node_name))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    match &outcome {
        BootstrapOutcome::Bootstrapped { node_id, material, ca_fingerprint } => info!(
            node = %material.node_name,
            %node_id,
            %ca_fingerprint,
            cert_dir = %cfg.cert_dir().display(),
            "agent: bootstrap complete"
        ),
        BootstrapOutcome::AlreadyBootstrapped { paths } => {
            info!(cert = %paths.cert.display(), "agent: using existing cert material")
        }
    }
    Ok(outcome)
}

async fn run_bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let force = args.force;
    let config_path = args.config_path.clone();
    let (cfg, tree) = bootstrap_config(&config_path, std::env::vars(), &args.into())?;
    let _telemetry = init_logging(&cfg.log)?;
    enrol(&cfg, force).await?;
    tokio::task::spawn_blocking(move || write_agent_config(&config_path, &tree, force))
        .await
        .context("write the agent config")??;
    Ok(())
}

/// [`load_material`] (file reads) on the blocking pool.
async fn load_material_async(dir: &std::path::Path) -> anyhow::Result<Option<Material>> {
    let dir = dir.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || load_material(&dir)).await.context("read the cert material")??)
}

/// The cert material for `serve`: loaded, or bootstrapped first when there is none and a
/// join token is configured. Partial material is fatal.
async fn material(cfg: &AgentConfig) -> anyhow::Result<Material> {
    let dir = cfg.cert_dir();
    if let Some(m) = load_material_async(&dir).await? {
        info!(node = %m.node_name, cert = %m.paths.cert.display(), "agent: using existing cert material");
        return Ok(m);
    }
    if cfg.bootstrap.token_source()?.is_none() {
        anyhow::bail!(
            "no cert material in {}: run `otherix-agent bootstrap` or configure a join token (bootstrap.token_path)",
            dir.display()
        );
    }
    info!(cert_dir = %dir.display(), "no cert material yet; bootstrapping first");
    enrol(cfg, false).await?;
    load_material_async(&dir).await?.with_context(|| format!("no cert material in {} after bootstrap", dir.display()))
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    // Everything the agent and its QEMUs create (records, sockets, seeds, disks, logs) is
    // for the agent alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cfg = AgentConfig::load(&config)?;
    let _telemetry = init_logging(&cfg.log)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // Background loops (heartbeat, task pruning) under one supervisor: named,
    // restarted with backoff if they fail, stopped with the agent.
    let supervisor = otherix_supervisor::Supervisor::new();
    let loops = supervisor.token();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // VMs keep running: QEMU lives in its own session.
        info!("shutting down the agent; VMs keep running");
        let _ = stop_tx.send(true);
        loops.cancel();
    });

    let material = match &cfg.bootstrap.cp_url {
        Some(_) => Some(material(&cfg).await?),
        None => {
            warn!("bootstrap.cp_url is not set: standalone mode, serving only the local socket, no heartbeat");
            None
        }
    };
    let rt = Runtime::open(cfg.runtime.clone()).await.context("open the VM runtime")?;
    info!(accelerator = accelerator_name(rt.accelerator()), "agent runtime ready");
    let mut service = AgentService::new(rt.clone());
    {
        let rt = rt.clone();
        supervisor.spawn("task-pruning", move |cancel| {
            let rt = rt.clone();
            async move {
                rt.run_pruning(cancel.cancelled_owned()).await;
                Ok(())
            }
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut mtls = None;
    if let (Some(m), Some(cp_url)) = (&material, &cfg.bootstrap.cp_url) {
        if let Some(n) = cfg.bootstrap.node_name.as_deref().filter(|n| *n != m.node_name) {
            warn!(configured = n, certificate = %m.node_name, "bootstrap.node_name differs from the certificate; the certificate's name is used");
        }
        let tls = m.server_tls_config().context("the agent's TLS server config")?;
        let listener = server::bind_tcp(cfg.server.listen_addr()?).await?;
        mtls = Some((listener, tls));

        let pools = Arc::new(RuntimePools::new(rt.clone(), cfg.pool_root()));
        let mut facts_cfg = FactsConfig::new(&cfg.runtime.state_dir);
        facts_cfg.capacity = cfg.capacity.clone();
        facts_cfg.qemu_binary = Some(cfg.runtime.qemu.binary.clone());
        let host = HostFactsProvider::new(facts_cfg, env!("CARGO_PKG_VERSION"), None);
        let facts = Arc::new(RuntimeFacts::new(host, rt.clone(), &pools));
        let heartbeat = HeartbeatClient::new(cp_url, m, facts, pools)?.with_config(HeartbeatConfig {
            interval: Duration::from_secs(u64::from(cfg.heartbeat.interval_seconds)),
            ..HeartbeatConfig::default()
        })?;
        // A finished VM task changes what the next report says: report at once.
        service = service.with_change_notify(heartbeat.trigger());
        supervisor.spawn("heartbeat", move |cancel| {
            let heartbeat = heartbeat.clone();
            async move {
                heartbeat.run(cancel.cancelled_owned()).await;
                Ok(())
            }
        });
    }
    if let Some((listener, tls)) = mtls {
        tasks.spawn(server::serve_mtls(service.clone(), listener, tls, stopped()));
    }
    if let Some(path) = &cfg.server.unix_socket {
        let listener = server::bind_unix(path).await?;
        tasks.spawn(server::serve_unix(service.clone(), listener, stopped()));
    }
    // After a stop signal, open streams (consoles, followed logs) get a grace period.
    let grace = async {
        stopped().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::pin!(grace);
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                None => break,
                Some(r) => {
                    if let Err(e) = r.context("agent task panicked").and_then(|r| r) {
                        // One listener failing takes the agent down (systemd restarts it).
                        tasks.abort_all();
                        return Err(e);
                    }
                }
            },
            () = &mut grace => {
                warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
                tasks.abort_all();
                break;
            }
        }
    }
    supervisor.shutdown(SHUTDOWN_GRACE).await;
    info!("agent stopped");
    Ok(())
}
