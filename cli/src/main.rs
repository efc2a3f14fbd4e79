//! `otherix`: the operator CLI, a pure gRPC client of otherix-api.
//!
//! This first cut covers nodes and join tokens. The endpoint and the token
//! each resolve from a flag, then the environment (`OTHERIX_SERVER`,
//! `OTHERIX_API_TOKEN`); with neither the CLI refuses rather than guess.
//! Output: `table` (lists), `text` (single objects), `json` (the API object
//! with proto field names, as the REST surface renders it).

#![allow(clippy::print_stdout, clippy::print_stderr)] // A CLI prints.

mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use otherix_errors::ApiError;
use otherix_proto::v1::node_service_client::NodeServiceClient;
use otherix_proto::v1::{
    CordonNodeRequest, CreateJoinTokenRequest, DeleteNodeRequest, GetNodeRequest, ListJoinTokenConsumptionsRequest,
    ListJoinTokensRequest, ListNodesRequest, ReadmitNodeRequest, RevokeJoinTokenRequest, UncordonNodeRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The Otherix CLI.
#[derive(Debug, Parser)]
#[command(name = "otherix", version)]
struct Cli {
    /// Control-plane URL, e.g. http://localhost:8080 (env OTHERIX_SERVER).
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// API token or access token (env OTHERIX_API_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// PEM file of the CA that signed an https endpoint's certificate.
    #[arg(long, global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true)]
    output: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hypervisor nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

/// Pagination flags of list commands (AIP-158 page_size / page_token).
#[derive(Debug, clap::Args)]
struct Page {
    /// At most this many items (the server's default is 100, its maximum 1000).
    #[arg(long, default_value_t = 0)]
    limit: i32,
    /// Continue from this cursor (printed on stderr when more items follow).
    #[arg(long, default_value = "")]
    cursor: String,
}

/// Tells the operator how to get the next page, off stdout so scripts that
/// read the table are not disturbed.
fn next_page_hint(token: &str) {
    if !token.is_empty() {
        eprintln!("more results: --cursor {token}");
    }
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List nodes: NAME ARCHITECTURE STATUS CORDONED AGE.
    List {
        /// Only nodes with this status (pending, ready, unreachable, gone).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Show one node.
    Get { name: String },
    /// Keep new VMs off a node.
    Cordon { name: String },
    /// Allow new VMs on a node again.
    Uncordon { name: String },
    /// Bring a gone node back as pending.
    Readmit { name: String },
    /// Delete a node and revoke its certificate.
    Delete { name: String },
    /// Join tokens.
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Mint a join token (its plaintext is shown once).
    Create {
        /// Lifetime: 1m to 24h, e.g. 10m, 1h, 3600s.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Joins allowed; 0 means unlimited.
        #[arg(long, default_value_t = 0)]
        max_uses: i32,
        /// Bind the token to one node name (single use).
        #[arg(long)]
        node_name: Option<String>,
    },
    /// List usable join tokens.
    List {
        /// Include expired, exhausted and revoked tokens.
        #[arg(long)]
        include_expired: bool,
        #[command(flatten)]
        page: Page,
    },
    /// Revoke a join token.
    Revoke { id: String },
    /// Who redeemed a join token.
    Consumptions { id: String },
}

/// A CLI failure, printed as the seed documents.
enum Failure {
    /// The API refused: `api_error: <code>: <message>`.
    Api(ApiError),
    /// The CLI could not do what was asked.
    Usage(String),
    /// The transport failed: `connection_refused`, `request_timeout`, `request_failed`.
    Transport(&'static str, String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        // tonic reports connection failures as Unavailable without Otherix details.
        if s.code() == tonic::Code::Unavailable && s.details().is_empty() {
            let kind = if s.message().contains("refused") { "connection_refused" } else { "request_failed" };
            return Failure::Transport(kind, s.message().to_owned());
        }
        if s.code() == tonic::Code::DeadlineExceeded && s.details().is_empty() {
            return Failure::Transport("request_timeout", s.message().to_owned());
        }
        Failure::Api(ApiError::from_status(&s))
    }
}

/// Parses `10m`, `1h`, `90s` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let bad = || Failure::Usage(format!("invalid duration {s:?}: use e.g. 90s, 10m, 1h"));
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some(c) if c.is_ascii_digit() => (s, 1),
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    Ok(Duration::from_secs(n.checked_mul(mult).ok_or_else(bad)?))
}

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

async fn connect(cli: &Cli) -> Result<InterceptedService<Channel, Bearer>, Failure> {
    let endpoint = cli
        .endpoint
        .clone()
        .or_else(|| std::env::var("OTHERIX_SERVER").ok().filter(|s| !s.is_empty()))
        .ok_or_else(|| Failure::Usage("no endpoint configured: pass --endpoint or set OTHERIX_SERVER".into()))?;
    let token = cli
        .token
        .clone()
        .or_else(|| std::env::var("OTHERIX_API_TOKEN").ok().filter(|s| !s.is_empty()))
        .ok_or_else(|| Failure::Usage("no token configured: pass --token or set OTHERIX_API_TOKEN".into()))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| Failure::Usage("the token has characters a header cannot carry".into()))?;
    let mut ep = Endpoint::from_shared(endpoint.clone())
        .map_err(|_| Failure::Usage(format!("invalid endpoint {endpoint:?}")))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60));
    if endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Failure::Usage(format!("{}: {e}", ca.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).map_err(|e| Failure::Usage(e.to_string()))?;
    }
    let channel = ep.connect().await.map_err(|e| {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        let kind = if text.contains("refused") { "connection_refused" } else { "request_failed" };
        Failure::Transport(kind, text)
    })?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let Command::Node { command } = &cli.command;
    let mut nodes = NodeServiceClient::new(connect(&cli).await?);
    let out = output::Printer::new(cli.output);
    match command {
        NodeCommand::List { status, page } => {
            let r = nodes
                .list_nodes(ListNodesRequest {
                    status: status.clone().unwrap_or_default(),
                    page_size: page.limit,
                    page_token: page.cursor.clone(),
                })
                .await?
                .into_inner();
            out.node_list(&r);
            next_page_hint(&r.next_page_token);
        }
        NodeCommand::Get { name } => {
            out.node(&nodes.get_node(GetNodeRequest { name: name.clone() }).await?.into_inner())
        }
        NodeCommand::Cordon { name } => {
            let n = nodes
                .cordon_node(CordonNodeRequest { name: name.clone(), request_id: String::new(), ..Default::default() })
                .await?
                .into_inner();
            out.done(&n, "otherix.v1.Node", &format!("node {name} cordoned"));
        }
        NodeCommand::Uncordon { name } => {
            let n = nodes
                .uncordon_node(UncordonNodeRequest {
                    name: name.clone(),
                    request_id: String::new(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.done(&n, "otherix.v1.Node", &format!("node {name} uncordoned"));
        }
        NodeCommand::Readmit { name } => {
            let n = nodes
                .readmit_node(ReadmitNodeRequest {
                    name: name.clone(),
                    request_id: String::new(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.done(&n, "otherix.v1.Node", &format!("node {name} readmitted (pending)"));
        }
        NodeCommand::Delete { name } => {
            let r = nodes
                .delete_node(DeleteNodeRequest { name: name.clone(), request_id: String::new(), ..Default::default() })
                .await?
                .into_inner();
            out.done(&r, "otherix.v1.DeleteNodeResponse", &format!("node {name} deleted"));
        }
        NodeCommand::JoinToken { command } => match command {
            JoinTokenCommand::Create { ttl, max_uses, node_name } => {
                let ttl = parse_duration(ttl)?;
                let r = nodes
                    .create_join_token(CreateJoinTokenRequest {
                        ttl_seconds: ttl.as_secs() as i64,
                        max_uses: *max_uses,
                        intended_node_name: node_name.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                out.join_token_created(&r);
            }
            JoinTokenCommand::List { include_expired, page } => {
                let r = nodes
                    .list_join_tokens(ListJoinTokensRequest {
                        include_expired: *include_expired,
                        page_size: page.limit,
                        page_token: page.cursor.clone(),
                    })
                    .await?
                    .into_inner();
                out.join_token_list(&r);
            }
            JoinTokenCommand::Revoke { id } => {
                let t = nodes
                    .revoke_join_token(RevokeJoinTokenRequest { id: id.clone(), request_id: String::new() })
                    .await?
                    .into_inner();
                out.done(&t, "otherix.v1.JoinToken", &format!("join token {id} revoked"));
            }
            JoinTokenCommand::Consumptions { id } => {
                let r = nodes
                    .list_join_token_consumptions(ListJoinTokenConsumptionsRequest {
                        id: id.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                out.consumptions(&r);
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("request_failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Api(e)) => {
            eprintln!("api_error: {}: {}", e.code.as_str(), e.message);
            ExitCode::FAILURE
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Transport(kind, m)) => {
            eprintln!("{kind}: {m}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").ok(), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("120").ok(), Some(Duration::from_secs(120)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }
}
