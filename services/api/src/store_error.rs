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
    }
}
