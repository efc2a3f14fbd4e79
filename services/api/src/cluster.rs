//! ClusterService: cluster-wide settings, kept in one store record.

use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::ClusterSettings;
use otherix_proto::v1::cluster_service_server::ClusterService;
use otherix_proto::v1::{
    DefaultPool, GetDefaultPoolRequest, SetDefaultPoolRequest, UnsetDefaultPoolRequest, UnsetDefaultPoolResponse,
};
use otherix_store::{Store, StoreError};
use tonic::{Request, Response, Status};

use crate::names::is_label;
use crate::store_error::{Rmw, store_error};

/// The store key of the settings record.
pub const SETTINGS_KEY: &str = otherix_store::keys::CLUSTER_SETTINGS;

/// Serves ClusterService: reads from the watch-fed settings cache, writes
/// through the store.
#[derive(Debug, Clone)]
pub struct ClusterSettingsService {
    store: Store,
    cache: otherix_store::Cache<ClusterSettings>,
}

impl ClusterSettingsService {
    /// A service over `store` and its settings cache.
    pub fn new(store: Store, cache: otherix_store::Cache<ClusterSettings>) -> Self {
        ClusterSettingsService { store, cache }
    }
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

fn view(s: &ClusterSettings, mod_revision: i64) -> Result<DefaultPool, ApiError> {
    if s.default_pool_name.is_empty() {
        return Err(ApiError::new(ErrorCode::NotFound, "no cluster default pool is set")
            .with_detail("kind", "setting")
            .with_detail("name", "default_pool")
            .with_detail("setting", "default_pool"));
    }
    Ok(DefaultPool {
        name: s.default_pool_name.clone(),
        updated_at: s.default_pool_updated_at,
        etag: crate::etag::of(mod_revision),
    })
}

#[tonic::async_trait]
impl ClusterService for ClusterSettingsService {
    #[tracing::instrument(skip_all)]
    async fn get_default_pool(&self, _req: Request<GetDefaultPoolRequest>) -> Result<Response<DefaultPool>, Status> {
        self.cache.caught_up().await.map_err(store_error)?;
        let current = self.cache.get(SETTINGS_KEY).map_err(store_error)?.unwrap_or_default();
        Ok(Response::new(view(&current.value, current.mod_revision)?))
    }

    #[tracing::instrument(skip_all, fields(pool = %req.get_ref().name))]
    async fn set_default_pool(&self, req: Request<SetDefaultPoolRequest>) -> Result<Response<DefaultPool>, Status> {
        let r = req.into_inner();
        let name = r.name;
        if !is_label(&name) {
            return Err(ApiError::invalid_field(
                "name",
                format!("{name:?} is not a valid pool name (lowercase letters, digits and '-', at most 63)"),
            )
            .into());
        }
        let stored = self
            .store
            .update_versioned::<ClusterSettings, Rmw, _>(SETTINGS_KEY, |cur| {
                crate::etag::check(&r.etag, cur.map_or(0, |c| c.mod_revision), "setting", "default_pool")?;
                let mut next = cur.map(|c| c.value.clone()).unwrap_or_default();
                if next.default_pool_name == name {
                    return Ok(None);
                }
                next.default_pool_name = name.clone();
                next.default_pool_updated_at = Some(now());
                next.default_pool_seeded = true;
                Ok(Some(next))
            })
            .await
            .map_err(ApiError::from)?;
        let settings = stored.unwrap_or_default();
        tracing::info!(pool = %settings.value.default_pool_name, "cluster default pool set");
        Ok(Response::new(view(&settings.value, settings.mod_revision)?))
    }

    #[tracing::instrument(skip_all)]
    async fn unset_default_pool(
        &self,
        req: Request<UnsetDefaultPoolRequest>,
    ) -> Result<Response<UnsetDefaultPoolResponse>, Status> {
        let etag = req.into_inner().etag;
        self.store
            .update_versioned::<ClusterSettings, Rmw, _>(SETTINGS_KEY, |cur| {
                crate::etag::check(&etag, cur.map_or(0, |c| c.mod_revision), "setting", "default_pool")?;
                let mut next = cur.map(|c| c.value.clone()).unwrap_or_default();
                if next.default_pool_name.is_empty() && next.default_pool_seeded {
                    return Ok(None);
                }
                next.default_pool_name.clear();
                next.default_pool_updated_at = Some(now());
                next.default_pool_seeded = true;
                Ok(Some(next))
            })
            .await
            .map_err(ApiError::from)?;
        tracing::info!("cluster default pool unset");
        Ok(Response::new(UnsetDefaultPoolResponse {}))
    }
}

/// On the first start of a cluster, makes `name` the default pool; an
/// operator's later change or unset is never undone.
pub async fn seed_default_pool(store: &Store, name: &str) -> Result<(), StoreError> {
    if name.is_empty() {
        return Ok(());
    }
    store
        .update::<ClusterSettings, StoreError, _>(SETTINGS_KEY, |cur| {
            if cur.is_some_and(|c| c.default_pool_seeded) {
                return Ok(None);
            }
            tracing::info!(pool = name, "seeding the cluster default pool");
            Ok(Some(ClusterSettings {
                default_pool_name: name.to_owned(),
                default_pool_updated_at: Some(now()),
                default_pool_seeded: true,
            }))
        })
        .await
        .map(|_| ())
}
