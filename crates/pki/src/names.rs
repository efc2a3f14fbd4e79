//! Node names and subject alternative names.

use std::fmt;
use std::net::IpAddr;

use crate::error::NodeNameError;

/// DNS suffix of agent SANs: `node-<name>.agents.otherix.local`.
pub const AGENT_DNS_SUFFIX: &str = "agents.otherix.local";

/// CN and SAN prefix of agent certificates.
pub const AGENT_CN_PREFIX: &str = "node-";

/// The URI SAN that marks a control-plane replica certificate. Only the control plane issues
/// it to itself (agent CSRs never choose their SANs), so an agent that requires it can tell a
/// replica from a node whatever names either certificate carries.
pub const CP_IDENTITY_URI: &str = "spiffe://otherix.local/control-plane";

/// Names no node may take: literal segments of REST routes beside
/// `/v1/nodes/{name}` (`/v1/nodes/join-tokens`, `/v1/nodes/join`). The
/// contract lists them as `(otherix.v1.reserved_segments)` on the node name
/// fields, and a test checks both lists agree.
pub const RESERVED_NODE_NAMES: &[&str] = &["join", "join-tokens"];

/// Checks a node name: 1..63 of `[a-z0-9-]`, not starting or ending with `-`,
/// and not one of [`RESERVED_NODE_NAMES`].
pub fn validate_node_name(name: &str) -> Result<(), NodeNameError> {
    let err = |reason| Err(NodeNameError { name: name.chars().take(80).collect(), reason });
    if name.is_empty() {
        return err("must not be empty");
    }
    if RESERVED_NODE_NAMES.contains(&name) {
        return err("is reserved: it is a path segment of the REST API");
    }
    if name.len() > 63 {
        return err("must be at most 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return err("only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return err("must not start or end with '-'");
    }
    Ok(())
}

/// The CN of an agent certificate: `node-<name>`.
pub fn agent_common_name(node_name: &str) -> String {
    format!("{AGENT_CN_PREFIX}{node_name}")
}

/// The DNS SAN of an agent certificate: `node-<name>.agents.otherix.local`.
pub fn agent_dns_name(node_name: &str) -> String {
    format!("{AGENT_CN_PREFIX}{node_name}.{AGENT_DNS_SUFFIX}")
}

/// A parsed subject alternative name in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum San {
    Ip(IpAddr),
    Dns(String),
    /// A URI; only ever set by the CA itself ([`CP_IDENTITY_URI`]), never parsed from input.
    Uri(String),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Ip(ip) => write!(f, "{ip}"),
            San::Dns(d) | San::Uri(d) => f.write_str(d),
        }
    }
}

impl San {
    /// Parses an IP address (IPv6 optionally in brackets) or a DNS name (lower-cased).
    pub(crate) fn parse(s: &str) -> Result<San, &'static str> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty name");
        }
        let unbracketed = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(t);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(San::Ip(ip));
        }
        let lower = t.to_ascii_lowercase();
        validate_dns_name(&lower)?;
        Ok(San::Dns(lower))
    }

    pub(crate) fn to_rcgen(&self) -> Result<rcgen::SanType, &'static str> {
        Ok(match self {
            San::Ip(ip) => rcgen::SanType::IpAddress(*ip),
            San::Dns(d) => rcgen::SanType::DnsName(d.clone().try_into().map_err(|_| "not an IA5 (ASCII) string")?),
            San::Uri(u) => rcgen::SanType::URI(u.clone().try_into().map_err(|_| "not an IA5 (ASCII) string")?),
        })
    }
}

/// Checks a lower-case DNS name: labels of 1..63 `[a-z0-9-]`, no leading/trailing `-`,
/// at most 253 characters; a leftmost `*` label is allowed when two or more labels follow.
fn validate_dns_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 253 {
        return Err("DNS name longer than 253 characters");
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return Err("empty DNS label (leading, trailing or double '.')");
        }
        if *label == "*" {
            if i != 0 || labels.len() < 3 {
                return Err("a wildcard must be the leftmost label of a name with at least 3 labels");
            }
            continue;
        }
        if label.len() > 63 {
            return Err("DNS label longer than 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err("DNS names may contain only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("DNS label starts or ends with '-'");
        }
    }
    Ok(())
}

/// Parses every name, canonicalises it and drops duplicates, keeping the first occurrence.
pub(crate) fn parse_sans(names: &[String]) -> Result<Vec<San>, (String, &'static str)> {
    let mut out: Vec<San> = Vec::with_capacity(names.len());
    for n in names {
        let san = San::parse(n).map_err(|reason| (n.clone(), reason))?;
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "node-1", "0", "a-b-c", &"x".repeat(63)] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "ä", "a b", &"x".repeat(64), "node\n", "join", "join-tokens"] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sans_parse_and_canonicalise() {
        assert_eq!(San::parse("127.0.0.1").unwrap(), San::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(San::parse("[::1]").unwrap(), San::Ip("::1".parse().unwrap()));
        assert_eq!(San::parse("0:0::1").unwrap(), San::parse("::1").unwrap());
        assert_eq!(San::parse("CP-1.Example.COM").unwrap(), San::Dns("cp-1.example.com".into()));
        assert_eq!(San::parse("*.example.com").unwrap(), San::Dns("*.example.com".into()));
        for bad in [
            "",
            " ",
            "a..b",
            ".a",
            "a.",
            "-a.com",
            "a-.com",
            "a_b.com",
            "exa mple.com",
            "*.com",
            "a.*.com",
            "ünïcode.com",
            "http://x",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(San::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sans_dedupe() {
        let names: Vec<String> =
            ["localhost", "LOCALHOST", "127.0.0.1", "::1", "0::1"].iter().map(|s| s.to_string()).collect();
        let sans = parse_sans(&names).unwrap();
        let shown: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        assert_eq!(shown, ["localhost", "127.0.0.1", "::1"]);
    }
}
