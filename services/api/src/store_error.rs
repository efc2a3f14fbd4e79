//! How store failures leave the API.

use otherix_errors::{ApiError, ErrorCode};
use otherix_store::StoreError;

/// Maps a store failure to the documented error; causes are logged, not shown.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(source) => {
            tracing::warn!(error = %source, "store unavailable");
            ApiError::new(ErrorCode::RequestTimeout, "the store is unavailable; retry shortly")
        }
        StoreError::Conflict { key } | StoreError::Contended { key, .. } => {
            ApiError::new(ErrorCode::Conflict, "the resource changed concurrently; retry").with_detail("key", key)
        }
        StoreError::AlreadyExists { key } => {
            tracing::warn!(%key, "unexpected existing key");
            ApiError::new(ErrorCode::Conflict, "the resource exists already")
        }
        e @ StoreError::Decode { .. } => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "undecodable store record");
            ApiError::internal()
        }
        e @ StoreError::Stale { .. } => {
            tracing::warn!(error = %e, "cache not in step with the store");
            ApiError::new(ErrorCode::RequestTimeout, "the store is unavailable; retry shortly")
        }
        e @ StoreError::LeaseLost { .. } => {
            tracing::error!(error = %e, "lease lost");
            ApiError::internal()
        }
        e @ StoreError::Sealed { .. } => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "cannot seal or open a secret");
            ApiError::internal()
        }
    }
}

/// The error of a read-modify-write ([`otherix_store::Store::update`]) whose
/// change may refuse with an API error.
#[derive(Debug)]
pub enum Rmw {
    /// The store failed.
    Store(StoreError),
    /// The change refused.
    Api(ApiError),
}

impl From<StoreError> for Rmw {
    fn from(e: StoreError) -> Self {
        Rmw::Store(e)
    }
}

impl From<ApiError> for Rmw {
    fn from(e: ApiError) -> Self {
        Rmw::Api(e)
    }
}

impl From<Rmw> for ApiError {
    fn from(e: Rmw) -> Self {
        match e {
            Rmw::Store(e) => store_error(e),
            Rmw::Api(e) => e,
        }
    }
}
