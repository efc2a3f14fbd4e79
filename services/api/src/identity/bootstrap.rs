//! The first admin, from the environment, on the first start of a cluster.

use otherix_auth::Role;
use otherix_errors::ApiError;

use super::{Identity, role_of};

/// The environment variables that name the first admin.
pub const ENV_EMAIL: &str = "OTHERIX_BOOTSTRAP_ADMIN_EMAIL";
/// Alternative to the email: the username itself.
pub const ENV_USERNAME: &str = "OTHERIX_BOOTSTRAP_ADMIN_USERNAME";
/// The first admin's password.
pub const ENV_PASSWORD: &str = "OTHERIX_BOOTSTRAP_ADMIN_PASSWORD";

/// The bootstrap admin's credentials, read from the environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BootstrapAdmin {
    /// Email (optional).
    pub email: String,
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for BootstrapAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("BootstrapAdmin").field("username", &self.username).field("email", &self.email).finish()
    }
}

impl BootstrapAdmin {
    /// Reads the variables; `Ok(None)` when none is set, an error naming the
    /// variable when they are incomplete or invalid.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<BootstrapAdmin>, String> {
        let email = get(ENV_EMAIL).unwrap_or_default().trim().to_owned();
        let username = get(ENV_USERNAME).unwrap_or_default().trim().to_owned();
        let password = get(ENV_PASSWORD).unwrap_or_default();
        if email.is_empty() && username.is_empty() && password.is_empty() {
            return Ok(None);
        }
        if password.is_empty() {
            return Err(format!("{ENV_PASSWORD} is required with {ENV_EMAIL} or {ENV_USERNAME}"));
        }
        otherix_auth::password::check_policy(&password).map_err(|m| format!("{ENV_PASSWORD}: {m}"))?;
        if !email.is_empty() && !otherix_auth::valid_email(&email) {
            return Err(format!("{ENV_EMAIL}: {email:?} is not an email address"));
        }
        let username = if username.is_empty() {
            otherix_auth::username_from_email(&email)
                .ok_or_else(|| format!("{ENV_EMAIL}: no valid username in {email:?}; set {ENV_USERNAME}"))?
        } else {
            username
        };
        if !otherix_auth::valid_username(&username) {
            return Err(format!("{ENV_USERNAME}: {username:?} is not a valid username (3 to 32 of a-z, 0-9, '-')"));
        }
        Ok(Some(BootstrapAdmin { email, username, password }))
    }
}

impl Identity {
    /// Creates the bootstrap admin unless an admin exists already.
    pub async fn bootstrap_admin(&self, admin: &BootstrapAdmin) -> Result<bool, ApiError> {
        if self.list_users().await?.iter().any(|u| role_of(&u.value) == Role::Admin) {
            tracing::debug!("an admin exists; bootstrap admin not needed");
            return Ok(false);
        }
        match self.create_user(&admin.username, &admin.password, Role::Admin, &admin.email, "").await {
            Ok(_) => {
                tracing::info!(username = %admin.username, "bootstrap admin created");
                Ok(true)
            }
            // Another replica won the race.
            Err(e) if e.code == otherix_errors::ErrorCode::Conflict => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn reads_the_seed_variables() {
        let a = BootstrapAdmin::from_env(env(&[
            (ENV_EMAIL, "admin@otherix.local"),
            (ENV_PASSWORD, "correct-horse-battery-staple"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.username, "admin");
        assert_eq!(a.email, "admin@otherix.local");
        assert!(!format!("{a:?}").contains("staple"));
        assert_eq!(BootstrapAdmin::from_env(env(&[])).unwrap(), None);
        assert!(BootstrapAdmin::from_env(env(&[(ENV_EMAIL, "admin@otherix.local")])).is_err());
        assert!(BootstrapAdmin::from_env(env(&[(ENV_USERNAME, "admin"), (ENV_PASSWORD, "short")])).is_err());
        assert!(
            BootstrapAdmin::from_env(env(&[(ENV_USERNAME, "Bad Name"), (ENV_PASSWORD, "long-enough-pass")])).is_err()
        );
    }
}
