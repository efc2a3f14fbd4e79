//! Password hashing with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane).

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

/// Shortest accepted password.
pub const MIN_LEN: usize = 12;
/// Longest accepted password.
pub const MAX_LEN: usize = 256;

/// Password hashing failed (only on broken randomness or parameters).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Why a new password is refused.
pub fn check_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_LEN {
        return Err(format!("a password needs at least {MIN_LEN} characters"));
    }
    if n > MAX_LEN {
        return Err(format!("a password has at most {MAX_LEN} characters"));
    }
    Ok(())
}

/// Hashes a password into a PHC string (salt and parameters included).
pub fn hash(password: &str) -> Result<String, HashError> {
    hasher().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| HashError(e.to_string()))
}

/// Whether `password` matches the PHC string. A malformed hash never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    hasher().verify_password(password.as_bytes(), phc).is_ok()
}

/// Spends the time of one verification, so an unknown user cannot be told
/// from a wrong password by timing.
pub fn verify_dummy(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let phc = DUMMY.get_or_init(|| hash("otherix-timing-equaliser").unwrap_or_default());
    let _ = verify(password, phc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("correct-horse-battery-staple").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct-horse-battery-staple", &h));
        assert!(!verify("correct-horse-battery-stapl", &h));
        assert!(!verify("x", "not a hash"));
        assert_ne!(hash("same-password-twice").unwrap(), hash("same-password-twice").unwrap());
    }

    #[test]
    fn policy() {
        assert!(check_policy("short").is_err());
        assert!(check_policy(&"a".repeat(257)).is_err());
        assert!(check_policy("twelve-chars").is_ok());
    }
}
