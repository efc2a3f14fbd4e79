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
}

/// A signing key.
#[derive(Debug, Clone)]
pub struct Key {
    /// Its id (the JWT `kid`).
    pub id: String,
    /// The HMAC secret (32 bytes or more).
    pub secret: Vec<u8>,
    /// Tokens signed with it are refused after this time (seconds since the
    /// epoch); `None` while it is valid without limit.
    pub retire_after: Option<i64>,
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

/// Verifies a token against the keys and the current time (seconds).
pub fn verify(token: &str, keys: &[Key], now: i64) -> Result<Claims, JwtError> {
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

    #[test]
    fn round_trip_and_failures() {
        let k1 = key("k1");
        let k2 = key("k2");
        let t = sign(&claims(1000), &k1);
        assert_eq!(key_id(&t).as_deref(), Some("k1"));
        assert_eq!(verify(&t, &[k2.clone(), k1.clone()], 500), Ok(claims(1000)));
        assert_eq!(verify(&t, std::slice::from_ref(&k1), 1000), Err(JwtError::Expired));
        assert_eq!(verify(&t, std::slice::from_ref(&k2), 500), Err(JwtError::Invalid));
        // A token signed by k2 but claiming k1's id fails the signature check.
        let forged = sign(&claims(1000), &Key { id: "k1".into(), ..k2.clone() });
        assert_eq!(verify(&forged, std::slice::from_ref(&k1), 500), Err(JwtError::Invalid));
        // Tampered claims.
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin","sid":"s1","iat":100,"exp":1000}"#);
        parts[1] = &other;
        assert_eq!(verify(&parts.join("."), std::slice::from_ref(&k1), 500), Err(JwtError::Invalid));
        assert_eq!(verify("a.b", std::slice::from_ref(&k1), 0), Err(JwtError::Invalid));
        let retired = Key { retire_after: Some(400), ..k1 };
        assert_eq!(verify(&t, &[retired], 500), Err(JwtError::Retired));
    }

    #[test]
    fn alg_none_is_refused() {
        let k = key("k1");
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        let c = URL_SAFE_NO_PAD.encode(br#"{"sub":"u","sid":"s","iat":1,"exp":9999999999}"#);
        assert_eq!(verify(&format!("{h}.{c}."), &[k], 5), Err(JwtError::Invalid));
    }
}
