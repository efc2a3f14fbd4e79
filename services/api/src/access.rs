//! The access rule of every RPC, read from the `otherix.v1.access` method
//! option in the descriptor set: the contract says who may call what.

use std::collections::HashMap;

use otherix_proto::v1::AccessRule;
use prost_reflect::{DescriptorPool, Value};

/// The packages whose RPCs must all carry an access rule.
pub const GOVERNED_PACKAGES: &[&str] = &["otherix.v1", "otherix.agent.v1"];

/// Access rules by gRPC path (`/otherix.v1.ClusterService/GetDefaultPool`).
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    by_path: HashMap<String, AccessRule>,
}

impl AccessTable {
    /// Reads the rules; fails naming every RPC without exactly one rule set.
    pub fn from_pool(pool: &DescriptorPool) -> Result<AccessTable, String> {
        let ext = pool
            .get_extension_by_name("otherix.v1.access")
            .ok_or("the otherix.v1.access option is not in the descriptor set")?;
        let mut by_path = HashMap::new();
        let mut missing = Vec::new();
        for service in pool.services().filter(|s| GOVERNED_PACKAGES.contains(&s.package_name())) {
            for method in service.methods() {
                let opts = method.options();
                let rule = match opts.has_extension(&ext).then(|| opts.get_extension(&ext).into_owned()) {
                    Some(Value::Message(m)) => m.transcode_to::<AccessRule>().ok(),
                    _ => None,
                };
                let valid = rule.as_ref().is_some_and(|r| {
                    let set = usize::from(!r.permission.is_empty())
                        + usize::from(r.public)
                        + usize::from(r.authenticated)
                        + usize::from(r.agent)
                        + usize::from(r.control_plane);
                    set == 1 && (r.permission.is_empty() || valid_permission(&r.permission))
                });
                match rule {
                    Some(r) if valid => {
                        by_path.insert(format!("/{}/{}", service.full_name(), method.name()), r);
                    }
                    _ => missing.push(method.full_name().to_owned()),
                }
            }
        }
        if missing.is_empty() {
            Ok(AccessTable { by_path })
        } else {
            Err(format!("RPCs without exactly one valid otherix.v1.access rule: {}", missing.join(", ")))
        }
    }

    /// The rule of a gRPC path.
    pub fn rule(&self, path: &str) -> Option<&AccessRule> {
        self.by_path.get(path)
    }

    /// How many RPCs are governed.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether no RPC is governed.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

/// `resource:action`, lowercase with `_` and `-`.
fn valid_permission(p: &str) -> bool {
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '-');
    p.split_once(':').is_some_and(|(r, a)| ok(r) && ok(a))
}

/// A short form for logs and spans.
pub fn describe(rule: &AccessRule) -> &str {
    if rule.public {
        "public"
    } else if rule.authenticated {
        "authenticated"
    } else if rule.agent {
        "agent"
    } else if rule.control_plane {
        "control_plane"
    } else {
        &rule.permission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_in_the_contract_carries_an_access_rule() {
        let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
        let table = AccessTable::from_pool(&pool).unwrap();
        let total: usize =
            pool.services().filter(|s| GOVERNED_PACKAGES.contains(&s.package_name())).map(|s| s.methods().len()).sum();
        assert_eq!(table.len(), total);
        assert_eq!(table.rule("/otherix.v1.ClusterService/SetDefaultPool").unwrap().permission, "cluster:manage");
    }

    #[test]
    fn permissions_have_the_resource_action_shape() {
        assert!(valid_permission("cluster:read"));
        assert!(valid_permission("api_token:manage"));
        assert!(!valid_permission("cluster"));
        assert!(!valid_permission("Cluster:read"));
        assert!(!valid_permission(":read"));
    }
}
