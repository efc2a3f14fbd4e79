//! HS256 access tokens (JWT). Kept deliberately small: one algorithm, a key
//! id in the header, constant-time signature checks, and expiry.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The claims Otherix puts in an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The session (refresh-token family) it belongs to.
    pub sid: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Limits on the claims a token may carry, beyond its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest lifetime (`exp - iat`) accepted, in seconds: the configured
    /// access-token TTL. A token minted with a stolen key for years is refused.
    pub max_lifetime: i64,
    /// Clock difference tolerated between replicas, in seconds: `iat` may lie
    /// this far in the future and the lifetime may exceed the TTL by this much.
    pub leeway: i64,
}

impl Limits {
    /// The leeway used unless configured otherwise.
    pub const DEFAULT_LEEWAY: i64 = 60;

    /// Limits for tokens issued with an access TTL of `ttl_seconds`.
    pub fn for_ttl(ttl_seconds: u64) -> Limits {
        Limits { max_lifetime: i64::try_from(ttl_seconds).unwrap_or(i64::MAX), leeway: Self::DEFAULT_LEEWAY }
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a JWT, bad signature, unknown key, wrong algorithm.
    #[error("invalid access token")]
    Invalid,
    /// Well-formed and signed, but past its expiry.
    #[error("access token expired")]
    Expired,
    /// Signed with a key that was retired.
    #[error("access token signed with a retired key")]
    Retired,
    /// Signed, but its claims break the limits: a lifetime longer than the
    /// configured TTL, or issued in the future.
    #[error("access token claims are out of bounds")]
    OutOfBounds,
}

/// A signing key. Its `Debug` shows the id, never the secret.
#[derive(Clone)]
pub struct Key {
    /// Its id (the JWT `kid`).
    pub id: String,
    /// The HMAC secret (32 bytes or more).
    pub secret: Vec<u8>,
    /// Tokens signed with it are refused after this time (seconds since the
    /// epoch); `None` while it is valid without limit.
    pub retire_after: Option<i64>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("retire_after", &self.retire_after)
            .finish()
    }
}

/// Signs claims with a key.
pub fn sign(claims: &Claims, key: &Key) -> String {
    let header = Header { alg: "HS256".into(), typ: "JWT".into(), kid: key.id.clone() };
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
    let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{h}.{c}");
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&key.secret).expect("HMAC takes keys of any length");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// The key id a token names, without verifying anything.
pub fn key_id(token: &str) -> Option<String> {
    let h = token.split('.').next()?;
    let header: Header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    Some(header.kid)
}

/// Verifies a token against the keys, the current time (seconds) and the
/// lifetime limits.
pub fn verify(token: &str, keys: &[Key], now: i64, limits: &Limits) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Invalid);
    };
    let header: Header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Invalid)?)
        .map_err(|_| JwtError::Invalid)?;
    if header.alg != "HS256" {
        return Err(JwtError::Invalid);
    }
    let key = keys.iter().find(|k| k.id == header.kid).ok_or(JwtError::Invalid)?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Invalid)?;
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&key.secret).map_err(|_| JwtError::Invalid)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(c.as_bytes());
    mac.verify_slice(&sig).map_err(|_| JwtError::Invalid)?;
    let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).map_err(|_| JwtError::Invalid)?)
        .map_err(|_| JwtError::Invalid)?;
    if key.retire_after.is_some_and(|t| now >= t) {
        return Err(JwtError::Retired);
    }
    // Issued in the future, or living longer than any token this cluster
    // issues: only a holder of the signing key mints such a token.
    if claims.iat > now.saturating_add(limits.leeway)
        || claims.exp.saturating_sub(claims.iat) > limits.max_lifetime.saturating_add(limits.leeway)
    {
        return Err(JwtError::OutOfBounds);
    }
    if now >= claims.exp {
        return Err(JwtError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Key {
        Key { id: id.into(), secret: crate::token::random_bytes(32), retire_after: None }
    }

    fn claims(exp: i64) -> Claims {
        Claims { sub: "u1".into(), sid: "s1".into(), iat: 100, exp }
    }

    const L: Limits = Limits { max_lifetime: 900, leeway: 60 };

    #[test]
    fn round_trip_and_failures() {
        let k1 = key("k1");
        let k2 = key("k2");
        let t = sign(&claims(1000), &k1);
        assert_eq!(key_id(&t).as_deref(), Some("k1"));
        assert_eq!(verify(&t, &[k2.clone(), k1.clone()], 500, &L), Ok(claims(1000)));
        assert_eq!(verify(&t, std::slice::from_ref(&k1), 1000, &L), Err(JwtError::Expired));
        assert_eq!(verify(&t, std::slice::from_ref(&k2), 500, &L), Err(JwtError::Invalid));
        // A token signed by k2 but claiming k1's id fails the signature check.
        let forged = sign(&claims(1000), &Key { id: "k1".into(), ..k2.clone() });
        assert_eq!(verify(&forged, std::slice::from_ref(&k1), 500, &L), Err(JwtError::Invalid));
        // Tampered claims.
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","sid":"s1","iat":100,"exp":1000}"#);
        parts[1] = &other;
        assert_eq!(verify(&parts.join("."), std::slice::from_ref(&k1), 500, &L), Err(JwtError::Invalid));
        assert_eq!(verify("a.b", std::slice::from_ref(&k1), 0, &L), Err(JwtError::Invalid));
        let retired = Key { retire_after: Some(400), ..k1 };
        assert_eq!(verify(&t, &[retired], 500, &L), Err(JwtError::Retired));
    }

    #[test]
    fn alg_none_is_refused() {
        let k = key("k1");
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        let c = URL_SAFE_NO_PAD.encode(br#"{"sub":"u","sid":"s","iat":1,"exp":9999999999}"#);
        assert_eq!(verify(&format!("{h}.{c}."), &[k], 5, &L), Err(JwtError::Invalid));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = Key { id: "k1".into(), secret: b"super-secret-signing-material".to_vec(), retire_after: None };
        let shown = format!("{k:?} {k:#?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(!shown.contains("super-secret"), "{shown}");
        // Nor as the bytes a derived Debug would print.
        assert!(!shown.contains(&format!("{:?}", &k.secret[..4]).trim_end_matches(']').to_owned()), "{shown}");
    }

    #[test]
    fn a_token_living_longer_than_the_ttl_is_refused() {
        // What a holder of a stolen signing key mints: a real key, a valid
        // signature, and three years of validity.
        let k = key("k1");
        let now = 1_800_000_000;
        let three_years = Claims { sub: "u1".into(), sid: "s1".into(), iat: now, exp: now + 3 * 365 * 86_400 };
        let limits = Limits::for_ttl(900);
        assert_eq!(
            verify(&sign(&three_years, &k), std::slice::from_ref(&k), now + 10, &limits),
            Err(JwtError::OutOfBounds)
        );
        // The configured TTL, and the TTL plus the leeway, still pass; one second more does not.
        for (lifetime, ok) in [(900, true), (960, true), (961, false)] {
            let c = Claims { exp: now + lifetime, ..three_years.clone() };
            let got = verify(&sign(&c, &k), std::slice::from_ref(&k), now + 10, &limits);
            assert_eq!(got.is_ok(), ok, "lifetime {lifetime}: {got:?}");
        }
    }

    #[test]
    fn a_token_issued_in_the_future_is_refused() {
        let k = key("k1");
        let now = 1_800_000_000;
        let limits = Limits::for_ttl(900);
        let future = Claims { sub: "u1".into(), sid: "s1".into(), iat: now + 3600, exp: now + 3600 + 900 };
        assert_eq!(verify(&sign(&future, &k), std::slice::from_ref(&k), now, &limits), Err(JwtError::OutOfBounds));
        // A replica whose clock runs a little ahead is tolerated.
        let skewed = Claims { iat: now + 30, exp: now + 30 + 900, ..future };
        assert!(verify(&sign(&skewed, &k), std::slice::from_ref(&k), now, &limits).is_ok());
    }
}
