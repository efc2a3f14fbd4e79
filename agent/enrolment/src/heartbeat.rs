//! The heartbeat: a bidirectional mTLS stream to the control plane. The agent reports at
//! once, then every interval and whenever its facts change; each answer carries the node's
//! declared pools, which go to a [`DeclaredPoolsSink`].

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use otherix_errors::ApiError;
use otherix_proto::google::rpc;
use otherix_proto::otherix::agent::v1::heartbeat_service_client::HeartbeatServiceClient;
use otherix_proto::otherix::agent::v1::{DeclaredPool, HeartbeatRequest, HeartbeatResponse};
use prost::Message as _;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::bootstrap::{Material, is_transport_status, status_text};
use crate::error::{BootstrapError, chain, identity_refusal};
use crate::facts::{FactsConfig, HostFacts};
use crate::pools::DirPools;
use crate::transport::{CpUrl, parse_cp_url, pinned_endpoint};

/// Produces the agent's report. Called on a blocking thread (it may read files).
pub trait FactsProvider: Send + Sync + 'static {
    /// The full report: version, architecture, capabilities, resources and pools.
    fn report(&self) -> HeartbeatRequest;
}

/// Receives the pools the control plane declares for this node (the full set, from every
/// answer). The agent creates what is missing and includes the pools' status in the next
/// report (through its [`FactsProvider`]). Called on a blocking thread.
pub trait DeclaredPoolsSink: Send + Sync + 'static {
    /// The declared pools; an empty path means "under the agent's pool root".
    fn declared_pools(&self, pools: Vec<DeclaredPool>);
}

impl<F: Fn() -> HeartbeatRequest + Send + Sync + 'static> FactsProvider for F {
    fn report(&self) -> HeartbeatRequest {
        self()
    }
}

impl<F: Fn(Vec<DeclaredPool>) + Send + Sync + 'static> DeclaredPoolsSink for F {
    fn declared_pools(&self, pools: Vec<DeclaredPool>) {
        self(pools)
    }
}

/// The standard provider: [`HostFacts::gather`] plus the pools of a [`DirPools`].
#[derive(Debug)]
pub struct HostFactsProvider {
    config: FactsConfig,
    agent_version: String,
    pools: Option<Arc<DirPools>>,
}

impl HostFactsProvider {
    /// Reports the host per `config`, as `agent_version`, with the pools of `pools`.
    pub fn new(config: FactsConfig, agent_version: impl Into<String>, pools: Option<Arc<DirPools>>) -> Self {
        HostFactsProvider { config, agent_version: agent_version.into(), pools }
    }
}

impl FactsProvider for HostFactsProvider {
    fn report(&self) -> HeartbeatRequest {
        let f = HostFacts::gather(&self.config);
        HeartbeatRequest {
            agent_version: self.agent_version.clone(),
            architecture: f.architecture.clone(),
            capabilities: Some(f.capabilities()),
            resources: Some(f.resources()),
            pools: self.pools.as_ref().map(|p| p.statuses()).unwrap_or_default(),
        }
    }
}

/// Timing of the heartbeat (`heartbeat.*` in the agent config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Report interval until the control plane says otherwise (`heartbeat.interval_seconds`,
    /// default 30 s). The control plane's `heartbeat_interval_seconds` wins when non-zero.
    pub interval: Duration,
    /// How often the facts are re-read to detect a change (default 5 s).
    pub change_check_interval: Duration,
    /// First reconnect delay (default 1 s); doubles per failure.
    pub backoff_initial: Duration,
    /// Largest reconnect delay (default 30 s); also the delay after `node_gone` (waiting for
    /// an operator to readmit the node).
    pub backoff_max: Duration,
    /// Delay after the control plane refused this node's certificate (deleted node, revoked
    /// or replaced certificate; default 5 min): only a new bootstrap helps, so the agent
    /// checks back rarely instead of retrying hot.
    pub refused_retry: Duration,
    /// TCP connect plus TLS handshake limit (default 10 s).
    pub connect_timeout: Duration,
    /// Reconnect when no answer came for this many intervals (default 3, at least 10 s).
    pub stale_after_intervals: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(30),
            change_check_interval: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            refused_retry: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            stale_after_intervals: 3,
        }
    }
}

/// Why a heartbeat session ended.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The connection (TCP, TLS) failed.
    #[error("connect {cp}: {cause}")]
    Connect {
        /// The control plane URL.
        cp: String,
        /// The cause.
        cause: String,
    },
    /// The server presented a cluster certificate that is not the control plane's (a node's,
    /// for instance): nothing was sent to it.
    #[error("the server at {cp} is {identity}; nothing was sent to it")]
    NotControlPlane {
        /// The control plane URL.
        cp: String,
        /// What the certificate was instead.
        identity: otherix_pki::IdentityError,
    },
    /// The control plane refused this node (deleted node, revoked cert, gone node):
    /// permanent until an operator acts.
    #[error("refused by the control plane: {reason}: {message}")]
    Refused {
        /// The ErrorInfo reason (`node_deleted`, `cert_revoked`, `unauthenticated`,
        /// `node_gone`).
        reason: String,
        /// The message.
        message: String,
    },
    /// The stream failed (transport error or another status).
    #[error("stream: {0}")]
    Stream(String),
    /// The control plane ended the stream.
    #[error("the control plane closed the stream")]
    Closed,
    /// No answer for too long.
    #[error("no answer from the control plane for {0:?}")]
    Stale(Duration),
}

impl HeartbeatError {
    /// Whether retrying soon is pointless (an operator must act first).
    pub fn is_permanent(&self) -> bool {
        matches!(self, HeartbeatError::Refused { .. })
    }

    /// Whether this node's certificate is no longer accepted at all (the node was deleted,
    /// or its certificate revoked or replaced): only bootstrapping again helps.
    pub fn is_certificate_refused(&self) -> bool {
        matches!(self, HeartbeatError::Refused { reason, .. } if reason != "node_gone")
    }

    /// What an operator has to do about a permanent refusal.
    pub fn advice(&self) -> &'static str {
        match self {
            HeartbeatError::Refused { reason, .. } if reason == "node_gone" => {
                "the node is marked gone; an operator must readmit it (otherix node readmit <name>)"
            }
            HeartbeatError::Refused { reason, .. } if reason == "node_deleted" => {
                "the node was deleted from the cluster and its certificate is no longer accepted; \
                 bootstrap again (otherix-agent bootstrap --force) with a fresh join token"
            }
            HeartbeatError::Refused { .. } => {
                "the control plane no longer accepts this node's certificate (node deleted, certificate revoked \
                 or replaced); bootstrap again (otherix-agent bootstrap --force) with a fresh join token"
            }
            _ => "",
        }
    }
}

/// The `google.rpc.ErrorInfo.reason` of a status, if it carries one.
fn error_reason(status: &tonic::Status) -> Option<String> {
    let decoded = rpc::Status::decode(status.details()).ok()?;
    decoded
        .details
        .iter()
        .find(|a| a.type_url.ends_with("/google.rpc.ErrorInfo"))
        .and_then(|a| rpc::ErrorInfo::decode(a.value.as_slice()).ok().map(|i| i.reason))
}

fn classify(status: &tonic::Status) -> HeartbeatError {
    let reason = error_reason(status);
    let permanent = match reason.as_deref() {
        Some("node_gone") => true,
        Some("node_deleted" | "cert_revoked" | "unauthenticated") | None => {
            status.code() == tonic::Code::Unauthenticated
        }
        Some(_) => false,
    };
    if permanent {
        // The control plane puts the precise cause (`cert_revoked`) in the details.
        let detail = ApiError::from_status(status).details.get("reason").and_then(|v| v.as_str().map(str::to_string));
        HeartbeatError::Refused {
            reason: detail.or(reason).unwrap_or_else(|| "unauthenticated".into()),
            message: status.message().to_string(),
        }
    } else if is_transport_status(status) {
        HeartbeatError::Stream(status_text(status))
    } else {
        HeartbeatError::Stream(format!("{} ({})", status_text(status), reason.unwrap_or_default()))
    }
}

/// Exponential backoff with equal jitter: the delay is in `[d/2, d]`, `d` doubling from the
/// initial delay up to the max.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

fn random_fraction() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, next: initial }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The delay at the max (for permanent refusals), jittered.
    pub(crate) fn max_delay(&self) -> Duration {
        jitter(self.max)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.max);
        self.next = (d * 2).min(self.max);
        jitter(d)
    }
}

fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(random_fraction() / 2.0)
}

/// What a report's change detection compares: everything but the fast-moving numbers.
fn significant(r: &HeartbeatRequest) -> HeartbeatRequest {
    let mut s = r.clone();
    s.resources = None;
    for p in &mut s.pools {
        if let Some(pool) = &mut p.pool {
            pool.capacity_bytes = 0;
            pool.free_bytes = 0;
            pool.vm_disk_bytes = 0;
            pool.scanned_at = None;
            pool.downloads.clear();
        }
    }
    s
}

enum SessionEnd {
    Shutdown,
    Failed { err: HeartbeatError, acknowledged: bool },
}

/// The heartbeat client. Build it with [`HeartbeatClient::new`], then `run` it until
/// shutdown. Clones share the trigger, so a supervisor can restart a clone.
#[derive(Clone)]
pub struct HeartbeatClient {
    cp: CpUrl,
    material: Material,
    endpoint: Endpoint,
    node_name: String,
    facts: Arc<dyn FactsProvider>,
    sink: Arc<dyn DeclaredPoolsSink>,
    config: HeartbeatConfig,
    trigger: Arc<Notify>,
}

impl std::fmt::Debug for HeartbeatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatClient")
            .field("cp", &self.cp)
            .field("node_name", &self.node_name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HeartbeatClient {
    /// A client for the agent listener at `cp_url`, authenticating with `material` (the
    /// server must present a certificate of `material.ca_pem` naming the URL's host).
    pub fn new(
        cp_url: &str,
        material: &Material,
        facts: Arc<dyn FactsProvider>,
        sink: Arc<dyn DeclaredPoolsSink>,
    ) -> Result<Self, BootstrapError> {
        let config = HeartbeatConfig::default();
        let cp = parse_cp_url(cp_url)?;
        let endpoint = Self::endpoint(&cp, material, &config)?;
        Ok(HeartbeatClient {
            cp,
            material: material.clone(),
            endpoint,
            node_name: material.node_name.clone(),
            facts,
            sink,
            config,
            trigger: Arc::new(Notify::new()),
        })
    }

    fn endpoint(cp: &CpUrl, m: &Material, config: &HeartbeatConfig) -> Result<Endpoint, BootstrapError> {
        Ok(pinned_endpoint(cp, &m.ca_pem, Some((&m.cert_pem, &m.key_pem)), config.connect_timeout)
            .map_err(|e| BootstrapError::Config(format!("heartbeat TLS: {}", chain(&e))))?
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true))
    }

    /// Replaces the timing (defaults: [`HeartbeatConfig::default`]).
    pub fn with_config(mut self, config: HeartbeatConfig) -> Result<Self, BootstrapError> {
        self.endpoint = Self::endpoint(&self.cp, &self.material, &config)?;
        self.config = config;
        Ok(self)
    }

    /// A handle that makes the client report now (`notify_one()`), e.g. after a VM started.
    pub fn trigger(&self) -> Arc<Notify> {
        self.trigger.clone()
    }

    /// Runs until `shutdown` resolves: connects, reports, reconnects with backoff. Permanent
    /// refusals are logged at ERROR with what to do; `node_gone` is retried at the max
    /// backoff, a refused certificate (deleted node) only every `refused_retry`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = pin!(shutdown);
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut interval = self.config.interval;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let span = info_span!("heartbeat_connection", attempt, cp = %self.cp, node = %self.node_name);
            let started = Instant::now();
            let end = self.session(&mut interval, shutdown.as_mut()).instrument(span.clone()).await;
            let delay = match end {
                SessionEnd::Shutdown => {
                    span.in_scope(|| info!("heartbeat stopped"));
                    return;
                }
                SessionEnd::Failed { err, acknowledged } => {
                    // A session that worked for a while starts the backoff over; one that
                    // flaps right after its first answer keeps growing it.
                    if acknowledged && started.elapsed() >= self.config.backoff_max {
                        backoff.reset();
                    }
                    if err.is_permanent() {
                        let delay = if err.is_certificate_refused() {
                            jitter(self.config.refused_retry)
                        } else {
                            backoff.max_delay()
                        };
                        let advice = err.advice();
                        span.in_scope(|| error!(error = %err, retry_in = ?delay, "heartbeat refused: {advice}"));
                        delay
                    } else if matches!(err, HeartbeatError::NotControlPlane { .. }) {
                        // A misrouted URL or an impostor: loud, but it may be fixed without us.
                        let delay = backoff.next_delay();
                        span.in_scope(|| error!(error = %err, retry_in = ?delay, "heartbeat connection refused: not the control plane"));
                        delay
                    } else {
                        let delay = backoff.next_delay();
                        span.in_scope(|| warn!(error = %err, retry_in = ?delay, "heartbeat connection failed"));
                        delay
                    }
                }
            };
            tokio::select! {
                () = sleep(delay) => {}
                () = shutdown.as_mut() => {
                    info!("heartbeat stopped");
                    return;
                }
            }
        }
    }

    async fn report(&self) -> HeartbeatRequest {
        let facts = self.facts.clone();
        match tokio::task::spawn_blocking(move || facts.report()).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "gathering the heartbeat report failed");
                HeartbeatRequest::default()
            }
        }
    }

    async fn session(
        &self,
        interval: &mut Duration,
        mut shutdown: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> SessionEnd {
        let failed = |err, acknowledged| SessionEnd::Failed { err, acknowledged };
        let channel = tokio::select! {
            c = self.endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => {
                    let err = match identity_refusal(&e) {
                        Some(identity) => HeartbeatError::NotControlPlane { cp: self.cp.to_string(), identity },
                        None => HeartbeatError::Connect { cp: self.cp.to_string(), cause: chain(&e) },
                    };
                    return failed(err, false);
                }
            },
            () = shutdown.as_mut() => return SessionEnd::Shutdown,
        };
        let (tx, rx) = mpsc::channel::<HeartbeatRequest>(4);
        let mut seq: u64 = 0;
        let mut last_sent = self.report().await;
        let send = |seq: u64, reason: &'static str, r: HeartbeatRequest| {
            let span = info_span!("heartbeat_report", seq, reason);
            span.in_scope(|| match tx.try_send(r) {
                Ok(()) => debug!("heartbeat report queued"),
                Err(e) => warn!(error = %e, "heartbeat report dropped: the stream is not draining"),
            });
        };
        seq += 1;
        send(seq, "connect", last_sent.clone());
        let mut client = HeartbeatServiceClient::new(channel);
        let open_limit = (*interval * self.config.stale_after_intervals).max(Duration::from_secs(10));
        let mut inbound = tokio::select! {
            r = tokio::time::timeout(open_limit, client.heartbeat(ReceiverStream::new(rx))) => match r {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => return failed(classify(&s), false),
                Err(_) => return failed(HeartbeatError::Stale(open_limit), false),
            },
            () = shutdown.as_mut() => return SessionEnd::Shutdown,
        };
        let mut acknowledged = false;
        let mut next_report = Instant::now() + *interval;
        let mut last_answer = Instant::now();
        let mut check = tokio::time::interval(self.config.change_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        loop {
            let stale_limit = (*interval * self.config.stale_after_intervals).max(Duration::from_secs(10));
            let mut check_now = false;
            tokio::select! {
                () = shutdown.as_mut() => return SessionEnd::Shutdown,
                m = inbound.message() => match m {
                    Ok(Some(resp)) => {
                        last_answer = Instant::now();
                        if !acknowledged {
                            info!("heartbeat stream established");
                            acknowledged = true;
                        }
                        if let Some(new) = self.handle_response(resp, interval).await {
                            next_report = next_report.min(Instant::now() + new);
                        }
                        // Declared pools may have changed what the next report says.
                        check_now = true;
                    }
                    Ok(None) => return failed(HeartbeatError::Closed, acknowledged),
                    Err(s) => return failed(classify(&s), acknowledged),
                },
                () = sleep_until(next_report) => {
                    last_sent = self.report().await;
                    seq += 1;
                    send(seq, "interval", last_sent.clone());
                    next_report = Instant::now() + *interval;
                }
                () = self.trigger.notified() => {
                    last_sent = self.report().await;
                    seq += 1;
                    send(seq, "trigger", last_sent.clone());
                    next_report = Instant::now() + *interval;
                }
                _ = check.tick() => check_now = true,
                () = sleep_until(last_answer + stale_limit) => {
                    return failed(HeartbeatError::Stale(stale_limit), acknowledged);
                }
            }
            if check_now {
                let r = self.report().await;
                if significant(&r) != significant(&last_sent) {
                    last_sent = r;
                    seq += 1;
                    send(seq, "change", last_sent.clone());
                    next_report = Instant::now() + *interval;
                }
            }
        }
    }

    /// Applies an answer: the interval (returned when it changed) and the declared pools.
    async fn handle_response(&self, resp: HeartbeatResponse, interval: &mut Duration) -> Option<Duration> {
        debug!(pools = resp.declared_pools.len(), "heartbeat acknowledged");
        let sink = self.sink.clone();
        let pools = resp.declared_pools;
        if let Err(e) = tokio::task::spawn_blocking(move || sink.declared_pools(pools)).await {
            error!(error = %e, "applying the declared pools failed");
        }
        let secs = resp.heartbeat_interval_seconds;
        if secs == 0 {
            return None;
        }
        let new = Duration::from_secs(u64::from(secs).clamp(1, 3600));
        if new != *interval {
            info!(interval = ?new, "heartbeat interval set by the control plane");
            *interval = new;
            return Some(new);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otherix_errors::ErrorCode;

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut bases = vec![];
        for _ in 0..8 {
            let d = b.next_delay();
            bases.push(d);
        }
        let expected = [1u64, 2, 4, 8, 16, 30, 30, 30];
        for (d, e) in bases.iter().zip(expected) {
            let e = Duration::from_secs(e);
            assert!(*d >= e / 2 && *d <= e, "{d:?} vs {e:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
        let m = b.max_delay();
        assert!(m >= Duration::from_secs(15) && m <= Duration::from_secs(30));
    }

    #[test]
    fn refusals_are_classified() {
        let revoked = ApiError::new(ErrorCode::Unauthenticated, "certificate revoked").to_status();
        assert!(classify(&revoked).is_permanent());
        // The control plane's shape: code unauthenticated, detail reason cert_revoked.
        let revoked = ApiError::new(ErrorCode::Unauthenticated, "not valid").with_detail("reason", "cert_revoked");
        match classify(&revoked.to_status()) {
            HeartbeatError::Refused { reason, message } => {
                assert_eq!((reason.as_str(), message.as_str()), ("cert_revoked", "not valid"));
            }
            other => panic!("{other:?}"),
        }
        // A deleted node: the control plane's record is gone, the certificate is refused.
        let deleted =
            ApiError::new(ErrorCode::Unauthenticated, "node \"w\" was deleted").with_detail("reason", "node_deleted");
        let e = classify(&deleted.to_status());
        assert!(e.is_permanent() && e.is_certificate_refused(), "{e:?}");
        assert!(e.advice().contains("deleted") && e.advice().contains("fresh join token"));
        let plain = tonic::Status::unauthenticated("no cert");
        assert!(classify(&plain).is_permanent());
        // A reason that is not in this build's ErrorCode table still counts.
        let gone = rpc::Status {
            code: tonic::Code::FailedPrecondition as i32,
            message: "node is gone".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: rpc::ErrorInfo {
                    reason: "node_gone".into(),
                    domain: "otherix.dev".into(),
                    metadata: Default::default(),
                }
                .encode_to_vec(),
            }],
        };
        let gone =
            tonic::Status::with_details(tonic::Code::FailedPrecondition, "node is gone", gone.encode_to_vec().into());
        match classify(&gone) {
            HeartbeatError::Refused { reason, .. } => assert_eq!(reason, "node_gone"),
            other => panic!("{other:?}"),
        }
        assert!(!classify(&gone).is_certificate_refused());
        assert!(classify(&gone).advice().contains("readmit"));
        assert!(!classify(&tonic::Status::unavailable("connection reset")).is_permanent());
        assert!(!classify(&ApiError::internal().to_status()).is_permanent());
    }

    #[test]
    fn change_detection_ignores_moving_numbers() {
        use otherix_proto::otherix::agent::v1::{Capabilities, Pool, PoolStatus, Resources};
        let a = HeartbeatRequest {
            agent_version: "1".into(),
            capabilities: Some(Capabilities { cpu_cores: 2, ..Default::default() }),
            resources: Some(Resources { memory_available_bytes: 1, ..Default::default() }),
            pools: vec![PoolStatus {
                pool: Some(Pool { name: "default".into(), free_bytes: 5, ..Default::default() }),
                reconciliation_status: "ready".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut b = a.clone();
        b.resources.as_mut().unwrap().memory_available_bytes = 2;
        b.pools[0].pool.as_mut().unwrap().free_bytes = 6;
        assert_eq!(significant(&a), significant(&b));
        b.capabilities.as_mut().unwrap().cpu_cores = 3;
        assert_ne!(significant(&a), significant(&b));
        let mut c = a.clone();
        c.pools.clear();
        assert_ne!(significant(&a), significant(&c));
    }
}
