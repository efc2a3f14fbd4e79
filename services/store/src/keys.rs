//! The one key schema: every etcd key Otherix writes is built here.
//! `docs/store-schema.md` lists each prefix with its owner, value type and
//! lease or retention; a test below keeps the two in step.
//!
//! Keys are relative to [`crate::PREFIX`] (`/otherix/`). Prefixes end in `/`
//! so a prefix never matches a sibling (`users/` vs `users_x/`).

/// Users (`UserRecord`), by id.
pub const USERS: &str = "users/";
/// Login sessions (`SessionRecord`), `sessions/<user_id>/<session_id>`.
pub const SESSIONS: &str = "sessions/";
/// Refresh tokens (`RefreshTokenRecord`), by sha256 of the token.
pub const REFRESH_TOKENS: &str = "refresh_tokens/";
/// API tokens (`ApiTokenRecord`), `api_tokens/<user_id>/<token_id>`.
pub const API_TOKENS: &str = "api_tokens/";
/// Uniqueness guards: `uniq/<kind>/<field>/<value>` holding the owner's id.
pub const UNIQ: &str = "uniq/";
/// The access-token signing keys (`SigningKeys`).
pub const SIGNING_KEYS: &str = "auth/signing_keys";
/// The ids of the admins (raw, one per line): every change that makes or
/// ends an admin compares-and-swaps it, so the last admin cannot go.
pub const ADMINS: &str = "auth/admins";
/// The key (32 random bytes, sealed) of the HMAC idempotency records carry.
pub const IDEMPOTENCY_SECRET: &str = "auth/idempotency_secret";
/// Stored answers of idempotent calls, `idempotency/<user_id>/<key hash>`.
pub const IDEMPOTENCY: &str = "idempotency/";
/// Cluster-wide settings (`ClusterSettings`).
pub const CLUSTER_SETTINGS: &str = "cluster_settings";
/// The cluster CA (`ClusterCaRecord`).
pub const CLUSTER_CA: &str = "pki/cluster_ca";
/// Node records (`NodeRecord`), by name.
pub const NODES: &str = "nodes/";
/// Node liveness: `node_alive/<name>` holding the serving replica's id,
/// under that replica's lease.
pub const NODE_ALIVE: &str = "node_alive/";
/// Join tokens (`JoinTokenRecord`), by id.
pub const JOIN_TOKENS: &str = "join_tokens/";
/// Join-token uses (`JoinTokenConsumptionRecord`), `join_token_consumptions/<token_id>/<id>`.
pub const JOIN_TOKEN_CONSUMPTIONS: &str = "join_token_consumptions/";
/// Control-plane replicas present, `replicas/<replica_id>`, under each
/// replica's lease.
pub const REPLICAS: &str = "replicas/";

/// The revision of this replica's latest write under each top-level
/// prefix (the key's first segment), so a cache of that prefix can wait for
/// it before answering: a replica reads its own writes.
#[derive(Debug, Default)]
pub struct WriteMarks {
    marks: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<std::sync::atomic::AtomicI64>>>,
}

fn segment(key: &str) -> &str {
    key.split('/').next().unwrap_or(key)
}

impl WriteMarks {
    fn slot(&self, key: &str) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        let seg = segment(key);
        if let Some(s) = self.marks.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(seg) {
            return s.clone();
        }
        self.marks.write().unwrap_or_else(std::sync::PoisonError::into_inner).entry(seg.to_owned()).or_default().clone()
    }

    /// Records a write to `key` at `revision`.
    pub fn note(&self, key: &str, revision: i64) {
        self.slot(key).fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
    }

    /// The handle a cache of `prefix` reads its mark from.
    pub fn watch(&self, prefix: &str) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        self.slot(prefix)
    }
}

/// A user record.
pub fn user(id: &str) -> String {
    format!("{USERS}{id}")
}

/// The guard that keeps usernames unique.
pub fn username_guard(username: &str) -> String {
    format!("{UNIQ}users/username/{username}")
}

/// The guard that keeps emails unique (case-insensitively).
pub fn email_guard(email: &str) -> String {
    format!("{UNIQ}users/email/{}", email.to_ascii_lowercase())
}

/// Whether a key is a username guard.
pub fn is_username_guard(key: &str) -> bool {
    key.starts_with(&format!("{UNIQ}users/username/"))
}

/// Whether a key is an email guard.
pub fn is_email_guard(key: &str) -> bool {
    key.starts_with(&format!("{UNIQ}users/email/"))
}

/// A session.
pub fn session(user_id: &str, id: &str) -> String {
    format!("{SESSIONS}{user_id}/{id}")
}

/// The sessions of a user.
pub fn sessions_of(user_id: &str) -> String {
    format!("{SESSIONS}{user_id}/")
}

/// A refresh token, by the sha256 (hex) of its plaintext.
pub fn refresh_token(hash: &str) -> String {
    format!("{REFRESH_TOKENS}{hash}")
}

/// An API token.
pub fn api_token(user_id: &str, id: &str) -> String {
    format!("{API_TOKENS}{user_id}/{id}")
}

/// The API tokens of a user.
pub fn api_tokens_of(user_id: &str) -> String {
    format!("{API_TOKENS}{user_id}/")
}

/// The guard mapping an API token's hash to `<user_id>/<id>`.
pub fn api_token_hash_guard(hash: &str) -> String {
    format!("{UNIQ}api_tokens/hash/{hash}")
}

/// An idempotency record.
pub fn idempotency(user_id: &str, key_hash: &str) -> String {
    format!("{IDEMPOTENCY}{user_id}/{key_hash}")
}

/// A node record.
pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

/// A node's liveness key.
pub fn node_alive(name: &str) -> String {
    format!("{NODE_ALIVE}{name}")
}

/// A join token.
pub fn join_token(id: &str) -> String {
    format!("{JOIN_TOKENS}{id}")
}

/// The guard mapping a join token's hash to its id.
pub fn join_token_hash_guard(hash: &str) -> String {
    format!("{UNIQ}join_tokens/hash/{hash}")
}

/// One use of a join token.
pub fn join_token_consumption(token_id: &str, id: &str) -> String {
    format!("{JOIN_TOKEN_CONSUMPTIONS}{token_id}/{id}")
}

/// The uses of a join token.
pub fn join_token_consumptions_of(token_id: &str) -> String {
    format!("{JOIN_TOKEN_CONSUMPTIONS}{token_id}/")
}

/// A replica's presence key.
pub fn replica(id: &str) -> String {
    format!("{REPLICAS}{id}")
}

/// The last path segment of a key (a record's id or name).
pub fn leaf(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix and single key is documented in docs/store-schema.md.
    #[test]
    fn the_schema_document_lists_every_prefix() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/store-schema.md")).unwrap();
        for k in [
            USERS,
            SESSIONS,
            REFRESH_TOKENS,
            API_TOKENS,
            UNIQ,
            SIGNING_KEYS,
            ADMINS,
            IDEMPOTENCY_SECRET,
            IDEMPOTENCY,
            CLUSTER_SETTINGS,
            CLUSTER_CA,
            NODES,
            NODE_ALIVE,
            JOIN_TOKENS,
            JOIN_TOKEN_CONSUMPTIONS,
            REPLICAS,
        ] {
            assert!(doc.contains(&format!("`{k}")), "docs/store-schema.md does not list {k}");
        }
    }

    #[test]
    fn prefixes_do_not_nest() {
        assert_eq!(user("u1"), "users/u1");
        assert!(session("u", "s").starts_with(&sessions_of("u")));
        assert!(api_token("u", "t").starts_with(&api_tokens_of("u")));
        assert!(is_username_guard(&username_guard("bob")) && !is_email_guard(&username_guard("bob")));
        assert_eq!(email_guard("A@B.c"), "uniq/users/email/a@b.c");
        assert_eq!(leaf(&node("n1")), "n1");
    }
}
