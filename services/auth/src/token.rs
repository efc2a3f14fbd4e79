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

/// An HMAC-SHA256 under a server secret, fed piece by piece: what a record
/// keeps instead of a bare hash of something that may be guessed.
pub struct Keyed(hmac::Hmac<Sha256>);

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("Keyed(HMAC-SHA256)")
    }
}

impl Keyed {
    /// An HMAC under `key`.
    pub fn new(key: &[u8]) -> Keyed {
        use hmac::KeyInit;
        Keyed(<hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length"))
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        hmac::Mac::update(&mut self.0, bytes);
    }

    /// The tag.
    pub fn finish(self) -> Vec<u8> {
        hmac::Mac::finalize(self.0).into_bytes().to_vec()
    }
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

    #[test]
    fn keyed_is_hmac_sha256() {
        // RFC 4231, test case 2.
        let mut k = Keyed::new(b"Jefe");
        k.update(b"what do ya want ");
        k.update(b"for nothing?");
        assert_eq!(hex(&k.finish()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(!format!("{:?}", Keyed::new(b"Jefe")).contains("Jefe"));
    }
}
