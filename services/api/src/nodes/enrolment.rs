//! EnrolmentService: the CA for agents to pin, and join tokens redeemed for
//! node certificates.

use std::sync::Arc;
use std::time::Duration;

use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::agent::v1::enrolment_service_server::EnrolmentService;
use otherix_proto::otherix::agent::v1::{GetCaRequest, GetCaResponse, JoinRequest, JoinResponse};
use otherix_proto::otherix::store::v1::{JoinTokenConsumptionRecord, JoinTokenRecord, NodeRecord};
use otherix_proto::v1::Node;
use otherix_store::{Batch, Expect, StoreError};
use tonic::{Request, Response, Status};

use super::{NodeHub, node_key, status};
use crate::identity::{is_past, now_ts};
use crate::store_error::store_error;

/// The prefix of join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "otx_join_";

pub use otherix_store::keys::{join_token as join_token_key, join_token_hash_guard};

/// Serves EnrolmentService.
#[derive(Debug, Clone)]
pub struct EnrolmentServiceImpl {
    hub: Arc<NodeHub>,
}

impl EnrolmentServiceImpl {
    /// A service over the hub.
    pub fn new(hub: Arc<NodeHub>) -> Self {
        EnrolmentServiceImpl { hub }
    }
}

fn refused(code: ErrorCode, message: &str) -> ApiError {
    ApiError::new(code, message)
}

/// Checks the advertised endpoint's shape (`host:port`, or empty). It is only recorded:
/// the control plane dials it and then checks the node's identity, not this name.
fn check_advertised_endpoint(endpoint: &str) -> Result<(), ApiError> {
    if endpoint.is_empty() {
        return Ok(());
    }
    let bad = || ApiError::invalid_field("advertised_endpoint", "advertised_endpoint is host:port");
    if endpoint.len() > 261 || !endpoint.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

#[tonic::async_trait]
impl EnrolmentService for EnrolmentServiceImpl {
    #[tracing::instrument(skip_all)]
    async fn get_ca(&self, _req: Request<GetCaRequest>) -> Result<Response<GetCaResponse>, Status> {
        Ok(Response::new(GetCaResponse {
            ca_cert_pem: self.hub.ca.cert_pem().to_owned(),
            fingerprint_sha256: otherix_pki::format_fingerprint(&self.hub.ca.fingerprint_bytes()),
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_name, source = tracing::field::Empty))]
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let source = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        tracing::Span::current().record("source", source.as_str());
        let r = req.into_inner();
        otherix_pki::validate_node_name(&r.node_name)
            .map_err(|e| ApiError::invalid_field("node_name", e.to_string()))?;
        if !matches!(r.architecture.as_str(), "amd64" | "arm64") {
            return Err(ApiError::invalid_field("architecture", "architecture must be amd64 or arm64").into());
        }
        check_advertised_endpoint(&r.advertised_endpoint)?;
        let invalid = || refused(ErrorCode::TokenInvalid, "the join token is not valid");
        if !otherix_auth::token::well_formed(&r.token, JOIN_TOKEN_PREFIX) {
            return Err(invalid().into());
        }
        let hash = otherix_auth::token::hash(&r.token);
        let hub = &self.hub;
        // Retried when another join consumed the same token concurrently.
        for _ in 0..8 {
            let id =
                hub.store.get_raw(&join_token_hash_guard(&hash)).await.map_err(store_error)?.ok_or_else(invalid)?;
            let id = String::from_utf8_lossy(&id).into_owned();
            let token = hub
                .store
                .get::<JoinTokenRecord>(&join_token_key(&id))
                .await
                .map_err(store_error)?
                .ok_or_else(invalid)?;
            let t = &token.value;
            if t.revoked_at.is_some() || t.expires_at.as_ref().is_some_and(is_past) {
                tracing::info!(token = %t.id, "join refused: token expired");
                return Err(refused(ErrorCode::TokenExpired, "the join token expired").into());
            }
            if t.max_uses > 0 && t.consumption_count >= t.max_uses {
                tracing::info!(token = %t.id, "join refused: token exhausted");
                return Err(refused(ErrorCode::TokenExhausted, "the join token has no uses left").into());
            }
            if !t.intended_node_name.is_empty() && t.intended_node_name != r.node_name {
                return Err(ApiError::invalid_field(
                    "node_name",
                    format!("this join token enrols only node {:?}", t.intended_node_name),
                )
                .into());
            }
            let existing = hub.node(&r.node_name).await?;
            if let Some(n) = &existing
                && !n.value.cert_fingerprint.is_empty()
                && !n.value.cert_not_after.as_ref().is_some_and(is_past)
            {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "node {:?} already holds an active certificate; delete the node first to enrol it again",
                        r.node_name
                    ),
                )
                .into());
            }
            // The certificate names the node only; the advertised endpoint is recorded below,
            // never certified (docs/nodes.md, "Node certificates").
            let signed = hub
                .ca
                .sign_agent_csr(&r.csr_pem, &r.node_name, otherix_pki::AGENT_CERT_VALIDITY)
                .map_err(|e| ApiError::invalid_field("csr_pem", e.to_string()))?;
            let now = now_ts();
            let mut node = existing.as_ref().and_then(|n| n.value.node.clone()).unwrap_or_else(|| Node {
                id: uuid::Uuid::now_v7().to_string(),
                name: r.node_name.clone(),
                created_at: Some(now),
                ..Default::default()
            });
            node.architecture = r.architecture.clone();
            node.advertised_endpoint = r.advertised_endpoint.clone();
            node.status = status::PENDING.to_owned();
            let record = NodeRecord {
                node: Some(node.clone()),
                cert_fingerprint: signed.fingerprint_sha256.clone(),
                cert_serial: signed.serial_hex.clone(),
                cert_not_after: Some(prost_types::Timestamp::from(signed.not_after)),
                unreachable_since: None,
            };
            let consumption = JoinTokenConsumptionRecord {
                node_name: r.node_name.clone(),
                node_id: node.id.clone(),
                consumed_at: Some(now),
                source_address: source.clone(),
            };
            let next_token = JoinTokenRecord { consumption_count: t.consumption_count + 1, ..t.clone() };
            let node_expect = existing.as_ref().map_or(Expect::Absent, |n| Expect::Revision(n.mod_revision));
            let batch = Batch::new()
                .put(&join_token_key(&t.id), &next_token, Some(Expect::Revision(token.mod_revision)))
                .put(&node_key(&r.node_name), &record, Some(node_expect))
                .put(
                    &otherix_store::keys::join_token_consumption(&t.id, &uuid::Uuid::now_v7().to_string()),
                    &consumption,
                    Some(Expect::Absent),
                );
            match hub.store.commit(batch).await {
                Ok(_) => {
                    tracing::info!(node = %r.node_name, token = %t.id, serial = %signed.serial_hex, %source, "node joined");
                    return Ok(Response::new(JoinResponse {
                        node_id: node.id,
                        cert_pem: signed.cert_pem,
                        ca_cert_pem: hub.ca.cert_pem().to_owned(),
                    }));
                }
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(e) => return Err(store_error(e).into()),
            }
        }
        Err(ApiError::new(ErrorCode::Conflict, "the join raced with other joins; retry").into())
    }
}
