//! The four roles and what each may do: one static matrix, as documented.
//! `Own` scope means the caller may act only on resources it owns; the
//! handler of such an RPC decides ownership and answers not-found otherwise.

use std::fmt;
use std::str::FromStr;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything.
    Admin,
    /// Runs the fleet: everything but user and cluster administration.
    Operator,
    /// Runs its own workloads.
    Developer,
    /// Reads.
    Viewer,
}

/// How far a permission reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only resources the caller owns.
    Own,
    /// Every resource.
    Any,
}

impl Role {
    /// Every role, most privileged first.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Developer, Role::Viewer];

    /// The role's name as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    /// The scope at which the role holds `permission`, if at all.
    pub fn grant(self, permission: &str) -> Option<Scope> {
        use Scope::*;
        // Columns: admin, operator, developer, viewer.
        let row: [Option<Scope>; 4] = match permission {
            "vm:read" => [Some(Any), Some(Any), Some(Any), Some(Any)],
            "vm:create" => [Some(Any), Some(Any), Some(Any), None],
            "vm:update" | "vm:delete" | "vm:lifecycle" | "vm:resize" | "vm:console" | "vm:revert" | "vm:ssh"
            | "vm:ingress-grant" | "vm:connect" => [Some(Any), Some(Any), Some(Own), None],
            "vm:migrate" => [Some(Any), Some(Any), None, None],
            "loadbalancer:read" | "loadbalancer:create" => {
                [Some(Any), Some(Any), Some(Any), if permission == "loadbalancer:read" { Some(Any) } else { None }]
            }
            "loadbalancer:update" | "loadbalancer:delete" | "loadbalancer:connect" => {
                [Some(Any), Some(Any), Some(Own), None]
            }
            "loadbalancer:publish" => [Some(Any), Some(Any), None, None],
            "snapshot:read" => [Some(Any), Some(Any), Some(Own), Some(Own)],
            "snapshot:create" | "snapshot:delete" | "snapshot:revert" => [Some(Any), Some(Any), Some(Own), None],
            "network:read" | "firmware:read" | "storage_pool:read" | "cluster:read" => {
                [Some(Any), Some(Any), Some(Any), Some(Any)]
            }
            "network:manage"
            | "firmware:manage"
            | "storage_pool:manage"
            | "cluster:manage"
            | "node:manage"
            | "user:manage" => [Some(Any), None, None, None],
            "storage_pool:scan" | "node:maintenance" | "user:read" => [Some(Any), Some(Any), None, None],
            "node:read" => [Some(Any), Some(Any), Some(Any), Some(Any)],
            "api_token:manage" => [Some(Any), Some(Own), Some(Own), Some(Own)],
            "task:read" => [Some(Any), Some(Any), Some(Own), Some(Own)],
            "task:cancel" => [Some(Any), Some(Any), Some(Own), None],
            _ => [None; 4],
        };
        row[self as usize]
    }

    /// Whether the role sees the full node view (admin, operator) rather
    /// than the reduced one.
    pub fn sees_full_nodes(self) -> bool {
        matches!(self, Role::Admin | Role::Operator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (admin, operator, developer, viewer)"))
    }
}

/// Whether the matrix knows `permission` at all.
pub fn known_permission(permission: &str) -> bool {
    Role::ALL.iter().any(|r| r.grant(permission).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_spot_checks() {
        assert_eq!(Role::Viewer.grant("cluster:read"), Some(Scope::Any));
        assert_eq!(Role::Viewer.grant("cluster:manage"), None);
        assert_eq!(Role::Operator.grant("user:read"), Some(Scope::Any));
        assert_eq!(Role::Operator.grant("user:manage"), None);
        assert_eq!(Role::Developer.grant("api_token:manage"), Some(Scope::Own));
        assert_eq!(Role::Admin.grant("api_token:manage"), Some(Scope::Any));
        assert_eq!(Role::Developer.grant("vm:delete"), Some(Scope::Own));
        assert_eq!(Role::Viewer.grant("loadbalancer:read"), Some(Scope::Any));
        assert_eq!(Role::Viewer.grant("loadbalancer:create"), None);
        assert_eq!(Role::Admin.grant("no:such"), None);
    }

    #[test]
    fn admin_holds_every_known_permission_at_any_scope() {
        for p in ["vm:create", "user:manage", "cluster:manage", "node:manage", "task:cancel"] {
            assert_eq!(Role::Admin.grant(p), Some(Scope::Any), "{p}");
        }
    }

    #[test]
    fn roles_parse() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
