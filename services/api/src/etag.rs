//! Entity tags: a resource's etcd `mod_revision`, which changes with every
//! write of it (a strong etag). A request carrying an etag (the `etag`
//! field, or `If-Match` on REST) changes the resource only while it still
//! has that etag; otherwise it fails with `etag_mismatch` (409).

use otherix_errors::{ApiError, ErrorCode};

/// The etag of a record at `mod_revision`.
pub fn of(mod_revision: i64) -> String {
    mod_revision.to_string()
}

/// Refuses the change unless `given` is empty or the record's etag.
pub fn check(given: &str, mod_revision: i64, kind: &str, name: &str) -> Result<(), ApiError> {
    if given.is_empty() || given == of(mod_revision) {
        return Ok(());
    }
    Err(ApiError::new(ErrorCode::EtagMismatch, format!("{kind} {name:?} changed since etag {given:?}; read it again"))
        .with_detail("kind", kind)
        .with_detail("name", name)
        .with_detail("current_etag", of(mod_revision)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_current_etag_or_none_passes() {
        assert!(super::check("", 7, "node", "n").is_ok());
        assert!(super::check("7", 7, "node", "n").is_ok());
        let e = super::check("6", 7, "node", "n").unwrap_err();
        assert_eq!(e.code, otherix_errors::ErrorCode::EtagMismatch);
        assert_eq!(e.code.http_status(), 409);
    }
}
