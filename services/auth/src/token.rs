//! Opaque secrets: API tokens (`otx_...`), refresh tokens, join tokens, and
//! the hashes under which they are stored (the plaintext never is).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The prefix of API tokens.
pub const API_TOKEN_PREFIX: &str = "otx_";
/// The prefix of refresh tokens.
pub const REFRESH_TOKEN_PREFIX: &str = "ort_";
/// How many leading characters of an API token are kept to recognise it.
pub const SHOWN_PREFIX_LEN: usize = 12;

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // The OS generator failing means no secret can be made safely: abort.
    getrandom::fill(&mut buf).expect("the operating system's random generator failed");
    buf
}

/// A new secret: `prefix` and 32 random bytes in base64url.
pub fn generate(prefix: &str) -> String {
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random_bytes(32)))
}

/// The hex sha256 under which a secret is stored.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The shown prefix of a token (`otx_AbCdEfGh`).
pub fn shown_prefix(token: &str) -> String {
    token.chars().take(SHOWN_PREFIX_LEN).collect()
}

/// Whether a secret has the shape `generate(prefix)` makes (so lookups of
/// garbage never reach the store).
pub fn well_formed(token: &str, prefix: &str) -> bool {
    token.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 43 && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = generate(API_TOKEN_PREFIX);
        assert!(well_formed(&t, API_TOKEN_PREFIX), "{t}");
        assert!(!well_formed(&t, REFRESH_TOKEN_PREFIX));
        assert!(!well_formed("otx_short", API_TOKEN_PREFIX));
        assert_ne!(t, generate(API_TOKEN_PREFIX));
        assert_eq!(hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(shown_prefix(&t).len(), SHOWN_PREFIX_LEN);
    }
}
