//! NodeService: join tokens and the node lifecycle.

use std::sync::Arc;
use std::time::Duration;

use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{JoinTokenConsumptionRecord, JoinTokenRecord, NodeRecord};
use otherix_proto::v1::node_service_server::NodeService;
use otherix_proto::v1::{
    CordonNodeRequest, CreateJoinTokenRequest, CreateJoinTokenResponse, DeleteNodeRequest, DeleteNodeResponse,
    GetNodeRequest, JoinToken, JoinTokenConsumption, ListJoinTokenConsumptionsRequest,
    ListJoinTokenConsumptionsResponse, ListJoinTokensRequest, ListJoinTokensResponse, ListNodesRequest,
    ListNodesResponse, Node, ReadmitNodeRequest, RevokeJoinTokenRequest, UncordonNodeRequest,
};
use otherix_store::{Batch, Expect, StoreError, Versioned};
use tonic::{Request, Response, Status};

use super::enrolment::{JOIN_TOKEN_PREFIX, join_token_hash_guard, join_token_key};
use super::{NodeHub, node_key, node_not_found, node_view, status};
use crate::identity::{Caller, is_past, now_ts, ts_after};
use crate::paging::{self, Order};
use crate::store_error::{Rmw, store_error};

/// Serves NodeService.
#[derive(Debug, Clone)]
pub struct NodeServiceImpl {
    hub: Arc<NodeHub>,
}

impl NodeServiceImpl {
    /// A service over the hub.
    pub fn new(hub: Arc<NodeHub>) -> Self {
        NodeServiceImpl { hub }
    }

    /// Cordons or uncordons a node (idempotent; refused for a gone node).
    async fn set_cordoned(&self, name: &str, etag: &str, cordoned: bool) -> Result<Node, ApiError> {
        let rec = self
            .change_node(name, etag, |r| {
                let n = r.node.get_or_insert_default();
                if n.status == status::GONE {
                    return Err(ApiError::new(ErrorCode::NodeGone, format!("node {name:?} is gone")));
                }
                Ok(std::mem::replace(&mut n.cordoned, cordoned) != cordoned)
            })
            .await?;
        tracing::info!(node = %name, cordoned, "node cordon changed");
        Ok(node_of(&rec))
    }

    /// Applies `change` to a node with compare-and-swap, while it still has
    /// `etag` (when one is given); returns the node as stored.
    async fn change_node(
        &self,
        name: &str,
        etag: &str,
        mut change: impl FnMut(&mut NodeRecord) -> Result<bool, ApiError>,
    ) -> Result<Versioned<NodeRecord>, ApiError> {
        if otherix_pki::validate_node_name(name).is_err() {
            return Err(node_not_found(name));
        }
        let stored = self
            .hub
            .store
            .update_versioned::<NodeRecord, Rmw, _>(&node_key(name), |cur| {
                let cur = cur.ok_or_else(|| node_not_found(name))?;
                crate::etag::check(etag, cur.mod_revision, "node", name)?;
                let mut next = cur.value.clone();
                Ok(change(&mut next)?.then_some(next))
            })
            .await?;
        stored.ok_or_else(|| node_not_found(name))
    }
}

fn token_view(t: &JoinTokenRecord) -> JoinToken {
    JoinToken {
        id: t.id.clone(),
        intended_node_name: t.intended_node_name.clone(),
        max_uses: t.max_uses,
        consumption_count: t.consumption_count,
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        created_by: t.created_by.clone(),
    }
}

fn usable(t: &JoinTokenRecord) -> bool {
    t.revoked_at.is_none()
        && !t.expires_at.as_ref().is_some_and(is_past)
        && (t.max_uses == 0 || t.consumption_count < t.max_uses)
}

fn full_view(caller: &Caller) -> bool {
    caller.role.sees_full_nodes()
}

fn node_of(rec: &Versioned<NodeRecord>) -> Node {
    Node { etag: crate::etag::of(rec.mod_revision), ..rec.value.node.clone().unwrap_or_default() }
}

#[tonic::async_trait]
impl NodeService for NodeServiceImpl {
    #[tracing::instrument(skip_all)]
    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let ttl = if r.ttl_seconds == 0 { 3600 } else { r.ttl_seconds };
        if !(60..=86_400).contains(&ttl) {
            return Err(ApiError::invalid_field("ttl_seconds", "ttl_seconds is between 60 and 86400").into());
        }
        if r.max_uses < 0 {
            return Err(ApiError::invalid_field("max_uses", "max_uses is 0 (unlimited) or more").into());
        }
        let intended = r.intended_node_name.trim().to_owned();
        let max_uses = if intended.is_empty() {
            r.max_uses
        } else {
            otherix_pki::validate_node_name(&intended)
                .map_err(|e| ApiError::invalid_field("intended_node_name", e.to_string()))?;
            if r.max_uses > 1 {
                return Err(ApiError::invalid_field("max_uses", "a token bound to a node name is single-use").into());
            }
            1
        };
        let plaintext = otherix_auth::token::generate(JOIN_TOKEN_PREFIX);
        let record = JoinTokenRecord {
            id: uuid::Uuid::now_v7().to_string(),
            hash: otherix_auth::token::hash(&plaintext),
            intended_node_name: intended,
            max_uses,
            consumption_count: 0,
            created_at: Some(now_ts()),
            expires_at: Some(ts_after(Duration::from_secs(ttl as u64))),
            revoked_at: None,
            created_by: caller.username.clone(),
        };
        let batch = Batch::new().put(&join_token_key(&record.id), &record, Some(Expect::Absent)).put_raw(
            &join_token_hash_guard(&record.hash),
            record.id.clone().into_bytes(),
            Some(Expect::Absent),
        );
        self.hub.store.commit(batch).await.map_err(store_error)?;
        tracing::info!(token = %record.id, by = %caller.username, ttl, max_uses, "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token: plaintext,
            ca_fingerprint_sha256: otherix_pki::format_fingerprint(&self.hub.ca.fingerprint_bytes()),
            join_token: Some(token_view(&record)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        let r = req.into_inner();
        let all = r.include_expired;
        let mut tokens: Vec<JoinTokenRecord> = self
            .hub
            .store
            .list::<JoinTokenRecord>(otherix_store::keys::JOIN_TOKENS)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(_, v)| v.value)
            .filter(|t| all || usable(t))
            .collect();
        tokens.sort_by(|a, b| b.id.cmp(&a.id));
        let query = paging::query(&[if all { "all" } else { "usable" }]);
        let p = paging::page(tokens, Order::Desc, |t| t.id.clone(), r.page_size, &r.page_token, &query)?;
        Ok(Response::new(ListJoinTokensResponse {
            join_tokens: p.items.iter().map(token_view).collect(),
            next_page_token: p.next_page_token,
            total_size: p.total_size,
        }))
    }

    #[tracing::instrument(skip_all, fields(token = %req.get_ref().id))]
    async fn revoke_join_token(&self, req: Request<RevokeJoinTokenRequest>) -> Result<Response<JoinToken>, Status> {
        let id = req.into_inner().id;
        let not_found = || ApiError::not_found("join token", &id);
        if uuid::Uuid::parse_str(&id).is_err() {
            return Err(not_found().into());
        }
        let stored = self
            .hub
            .store
            .update::<JoinTokenRecord, StoreError, _>(&join_token_key(&id), |cur| {
                Ok(cur
                    .filter(|t| t.revoked_at.is_none())
                    .map(|t| JoinTokenRecord { revoked_at: Some(now_ts()), ..t.clone() }))
            })
            .await
            .map_err(store_error)?
            .ok_or_else(not_found)?;
        tracing::info!(token = %id, "join token revoked");
        Ok(Response::new(token_view(&stored.value)))
    }

    #[tracing::instrument(skip_all, fields(token = %req.get_ref().id))]
    async fn list_join_token_consumptions(
        &self,
        req: Request<ListJoinTokenConsumptionsRequest>,
    ) -> Result<Response<ListJoinTokenConsumptionsResponse>, Status> {
        let r = req.into_inner();
        let id = r.id.clone();
        if uuid::Uuid::parse_str(&id).is_err()
            || self.hub.store.get::<JoinTokenRecord>(&join_token_key(&id)).await.map_err(store_error)?.is_none()
        {
            return Err(ApiError::not_found("join token", &id).into());
        }
        let consumptions: Vec<(String, JoinTokenConsumption)> = self
            .hub
            .store
            .list::<JoinTokenConsumptionRecord>(&otherix_store::keys::join_token_consumptions_of(&id))
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(key, c)| {
                // The record's id (a uuid v7, so time order) is the cursor.
                let cursor = otherix_store::keys::leaf(&key).to_owned();
                (
                    cursor,
                    JoinTokenConsumption {
                        node_name: c.value.node_name,
                        node_id: c.value.node_id,
                        consumed_at: c.value.consumed_at,
                        source_address: c.value.source_address,
                    },
                )
            })
            .collect();
        let query = paging::query(&[&id]);
        let p = paging::page(consumptions, Order::Asc, |(k, _)| k.clone(), r.page_size, &r.page_token, &query)?;
        Ok(Response::new(ListJoinTokenConsumptionsResponse {
            consumptions: p.items.into_iter().map(|(_, c)| c).collect(),
            next_page_token: p.next_page_token,
            total_size: p.total_size,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_nodes(&self, req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let caller = Caller::of(&req)?;
        let want = req.get_ref().status.clone();
        if !want.is_empty()
            && ![status::PENDING, status::READY, status::UNREACHABLE, status::GONE].contains(&want.as_str())
        {
            return Err(ApiError::invalid_field("status", "status is pending, ready, unreachable or gone").into());
        }
        let nodes: Vec<Node> = self
            .hub
            .nodes()
            .await?
            .iter()
            .map(|n| Node { etag: crate::etag::of(n.mod_revision), ..node_view(&n.value, full_view(&caller)) })
            .filter(|n| want.is_empty() || n.status == want)
            .collect();
        let r = req.into_inner();
        let p =
            paging::page(nodes, Order::Asc, |n| n.name.clone(), r.page_size, &r.page_token, &paging::query(&[&want]))?;
        Ok(Response::new(ListNodesResponse {
            nodes: p.items,
            next_page_token: p.next_page_token,
            total_size: p.total_size,
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().name))]
    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let caller = Caller::of(&req)?;
        let name = &req.get_ref().name;
        let rec = self.hub.cached_node(name).await?.ok_or_else(|| node_not_found(name))?;
        Ok(Response::new(Node { etag: crate::etag::of(rec.mod_revision), ..node_view(&rec.value, full_view(&caller)) }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().name))]
    async fn cordon_node(&self, req: Request<CordonNodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.set_cordoned(&req.get_ref().name, &req.get_ref().etag, true).await?))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().name))]
    async fn uncordon_node(&self, req: Request<UncordonNodeRequest>) -> Result<Response<Node>, Status> {
        Ok(Response::new(self.set_cordoned(&req.get_ref().name, &req.get_ref().etag, false).await?))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().name))]
    async fn readmit_node(&self, req: Request<ReadmitNodeRequest>) -> Result<Response<Node>, Status> {
        let name = req.get_ref().name.clone();
        let etag = req.get_ref().etag.clone();
        let rec = self
            .change_node(&name, &etag, |r| {
                let n = r.node.get_or_insert_default();
                match n.status.as_str() {
                    status::GONE => {
                        n.status = status::PENDING.to_owned();
                        r.unreachable_since = None;
                        Ok(true)
                    }
                    status::PENDING => Ok(false),
                    other => Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("node {name:?} is {other}; only a gone node is readmitted"),
                    )
                    .with_detail("current_status", other.to_owned())),
                }
            })
            .await?;
        tracing::info!(node = %name, "node readmitted");
        Ok(Response::new(node_of(&rec)))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().name))]
    async fn delete_node(&self, req: Request<DeleteNodeRequest>) -> Result<Response<DeleteNodeResponse>, Status> {
        let caller = Caller::of(&req)?;
        let name = req.get_ref().name.clone();
        let cur = self.hub.node(&name).await?.ok_or_else(|| node_not_found(&name))?;
        crate::etag::check(&req.get_ref().etag, cur.mod_revision, "node", &name)?;
        self.hub
            .store
            .commit(Batch::new().delete(&node_key(&name), Some(Expect::Revision(cur.mod_revision))))
            .await
            .map_err(store_error)?;
        // Its certificate dies with the record; open streams close now.
        let _ = self.hub.deleted.send(name.clone());
        tracing::info!(node = %name, by = %caller.username, serial = %cur.value.cert_serial, "node deleted; certificate revoked");
        Ok(Response::new(DeleteNodeResponse {}))
    }
}
