//! Identity primitives for the control plane: password hashing (argon2id),
//! opaque tokens and their hashes, HS256 access tokens signed with keys kept
//! in the store, the role/permission matrix, and the login rate limiter.
//! Nothing here touches the network or the store.

pub mod jwt;
pub mod limiter;
pub mod password;
pub mod rbac;
pub mod token;

pub use rbac::{Role, Scope};

/// Whether `s` is a valid username: 3 to 32 of `[a-z0-9-]`, not starting or
/// ending with `-`.
pub fn valid_username(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=32).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A username derived from an email's local part (`Admin.One@x` → `admin-one`).
pub fn username_from_email(email: &str) -> Option<String> {
    let local = email.split('@').next()?;
    let mut out = String::new();
    for c in local.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').chars().take(32).collect::<String>().trim_end_matches('-').to_owned();
    valid_username(&out).then_some(out)
}

/// Whether `s` looks like an email address (one `@`, something either side, a dot in the domain).
pub fn valid_email(s: &str) -> bool {
    s.len() <= 254
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !d.contains('@') && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(valid_username("admin"));
        assert!(valid_username("ops-1"));
        for bad in ["ab", "-ab", "ab-", "Admin", "a_b", &"a".repeat(33)] {
            assert!(!valid_username(bad), "{bad}");
        }
        assert_eq!(username_from_email("admin@otherix.local").as_deref(), Some("admin"));
        assert_eq!(username_from_email("Jane.Doe+x@example.com").as_deref(), Some("jane-doe-x"));
        assert_eq!(username_from_email("a@b.c"), None);
    }

    #[test]
    fn emails() {
        assert!(valid_email("admin@otherix.local"));
        for bad in ["", "a", "a@b", "@b.c", "a@@b.c", "a b@c.d", "a@.c"] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
