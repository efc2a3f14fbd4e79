//! Where image fetches may go. An image URL comes from whoever can create a
//! VM; without a policy the agent would fetch from cloud metadata services,
//! its own loopback services and the private network it sits on, and hand the
//! answer to that user as a disk (server-side request forgery).
//!
//! The policy is applied to the addresses a host name resolves to, inside the
//! HTTP client's resolver, so the connection goes only to an address that was
//! checked (a second DNS answer cannot swap in another one), and again on
//! every redirect. `file://` sources are confined to one directory and to
//! regular files.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::AgentError;
use crate::config::ImagesConfig;
use crate::error::refusal;

/// Host names of cloud metadata services, refused even when they resolve to
/// an allowed address (and not liftable by a host-name allow entry).
const METADATA_HOSTS: &[&str] = &["metadata.google.internal", "metadata.goog", "metadata", "instance-data"];

/// An address block, `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        // `::ffff:10.0.0.0/104` is the IPv4 block 10.0.0.0/8.
        match canonical(addr) {
            v4 @ IpAddr::V4(_) if addr.is_ipv6() => Some(Cidr { addr: v4, prefix: prefix.checked_sub(96)? }),
            _ => Some(Cidr { addr, prefix }),
        }
    }

    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A host-name entry: `images.example.com`, or `*.example.com` for every name under it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => {
                host.len() > s.len() + 1 && host.ends_with(s.as_str()) && {
                    let cut = host.len() - s.len();
                    host.as_bytes()[cut - 1] == b'.'
                }
            }
        }
    }
}

fn normal_host(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Which class of address an IP is, when it is one the policy cares about.
fn class(ip: IpAddr) -> Option<&'static str> {
    let meta_v4 =
        [Ipv4Addr::new(169, 254, 169, 254), Ipv4Addr::new(169, 254, 170, 2), Ipv4Addr::new(100, 100, 100, 200)];
    let meta_v6 = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if meta_v4.contains(&v4) {
                Some("metadata")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if o[0] == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || o[0] >= 240 {
                Some("multicast or reserved")
            } else if v4.is_private()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
            {
                Some("private")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6 == meta_v6 {
                Some("metadata")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast or reserved")
            } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
                Some("private")
            } else {
                None
            }
        }
    }
}

/// The refusal of one fetch target, found in an HTTP client error's chain.
#[derive(Debug, Clone)]
pub struct Refused {
    /// What was refused and why.
    pub what: String,
    /// The machine-readable reason (see [`refusal`]).
    pub reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Refused {}

/// The fetch policy built from `images.fetch_allow`, `images.fetch_deny` and
/// `images.allow_private_networks`.
#[derive(Debug, Clone, Default)]
pub struct FetchPolicy {
    allow_nets: Vec<Cidr>,
    deny_nets: Vec<Cidr>,
    allow_hosts: Vec<HostPattern>,
    deny_hosts: Vec<HostPattern>,
    allow_private: bool,
}

fn entries(key: &str, list: &[String]) -> Result<(Vec<Cidr>, Vec<HostPattern>), AgentError> {
    let (mut nets, mut hosts) = (Vec::new(), Vec::new());
    for e in list {
        if let Some(c) = Cidr::parse(e) {
            nets.push(c);
            continue;
        }
        let h = normal_host(e);
        let (pat, name) = match h.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(rest.to_string()), rest.to_string()),
            None => (HostPattern::Exact(h.clone()), h.clone()),
        };
        let valid = !name.is_empty()
            && !e.contains('/')
            && name.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            return Err(AgentError::Validation(format!(
                "images.{key}: {e:?} is neither an address block (10.0.0.0/8, fd00::/8, 192.0.2.7) nor a host name (images.example.com, *.example.com)"
            )));
        }
        hosts.push(pat);
    }
    Ok((nets, hosts))
}

impl FetchPolicy {
    /// The policy of an images config; an unparsable entry is a config error.
    pub fn new(cfg: &ImagesConfig) -> Result<FetchPolicy, AgentError> {
        let (allow_nets, allow_hosts) = entries("fetch_allow", &cfg.fetch_allow)?;
        let (deny_nets, deny_hosts) = entries("fetch_deny", &cfg.fetch_deny)?;
        Ok(FetchPolicy { allow_nets, deny_nets, allow_hosts, deny_hosts, allow_private: cfg.allow_private_networks })
    }

    /// Checks a host name before it is resolved.
    pub fn check_name(&self, host: &str, reason: &'static str) -> Result<(), Refused> {
        let h = normal_host(host);
        if self.deny_hosts.iter().any(|p| p.matches(&h)) {
            return Err(Refused { what: format!("host {h} is in images.fetch_deny"), reason });
        }
        if METADATA_HOSTS.contains(&h.as_str()) {
            return Err(Refused { what: format!("host {h} is a cloud metadata service"), reason });
        }
        Ok(())
    }

    /// Checks one address `host` (a name, or `None` for an address literal) resolved to.
    pub fn check_ip(&self, host: Option<&str>, ip: IpAddr, reason: &'static str) -> Result<(), Refused> {
        let ip = canonical(ip);
        if self.deny_nets.iter().any(|c| c.contains(ip)) {
            return Err(Refused { what: format!("address {ip} is in images.fetch_deny"), reason });
        }
        if self.allow_nets.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        let Some(class) = class(ip) else { return Ok(()) };
        let host_allowed = host.is_some_and(|h| {
            let h = normal_host(h);
            self.allow_hosts.iter().any(|p| p.matches(&h))
        });
        let ok = match class {
            "metadata" => false,
            _ if host_allowed => true,
            "private" => self.allow_private,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            let via = host.map(|h| format!(" ({h})")).unwrap_or_default();
            Err(Refused {
                what: format!("address {ip}{via} is {class}; image fetches there are refused (see images.fetch_allow)"),
                reason,
            })
        }
    }

    /// Checks a URL's host before a request or redirect: names against the
    /// lists, address literals against everything (the resolver never sees them).
    pub fn check_url(&self, url: &url::Url, reason: &'static str) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.check_ip(None, IpAddr::V4(a), reason),
            Some(url::Host::Ipv6(a)) => self.check_ip(None, IpAddr::V6(a), reason),
            Some(url::Host::Domain(d)) => self.check_name(d, reason),
            None => Err(Refused { what: format!("{url} has no host"), reason }),
        }
    }

    /// Keeps the resolved addresses the policy allows; refuses when none is left.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        let mut first_refusal = None;
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(Some(host), a.ip(), refusal::ADDRESS_NOT_ALLOWED) {
                Ok(()) => true,
                Err(r) => {
                    first_refusal.get_or_insert(r);
                    false
                }
            })
            .collect();
        match (kept.is_empty(), first_refusal) {
            (false, _) => Ok(kept),
            (true, Some(r)) => Err(r),
            (true, None) => Err(Refused {
                what: format!("host {host} resolves to no address"),
                reason: refusal::ADDRESS_NOT_ALLOWED,
            }),
        }
    }
}

/// The HTTP client's resolver: system DNS, then the policy. The client
/// connects only to the addresses returned here.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: Arc<FetchPolicy>,
}

impl PolicyResolver {
    /// A resolver applying `policy`.
    pub fn new(policy: Arc<FetchPolicy>) -> PolicyResolver {
        PolicyResolver { policy }
    }
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            policy.check_name(&host, refusal::ADDRESS_NOT_ALLOWED)?;
            // getaddrinfo runs on the blocking pool inside lookup_host.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter(&host, addrs)?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The `Refused` in an error's source chain, if any.
pub fn find_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// Opens a `file://` source: only a regular file whose real path lies under
/// `root` (symlinks resolved), never under /proc, /sys or /dev. Blocking.
pub fn open_local(root: Option<&Path>, src: &Path) -> Result<(std::fs::File, u64), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let refuse = |what: String| AgentError::download(what, refusal::FILE_NOT_ALLOWED, None);
    let Some(root) = root else {
        return Err(refuse("file:// images need images.file_dir".into()));
    };
    let root = root.canonicalize().map_err(|e| {
        AgentError::download(
            format!("images.file_dir {}", root.display()),
            refusal::FILE_NOT_ALLOWED,
            Some(Arc::new(e)),
        )
    })?;
    let real = src.canonicalize().map_err(|e| {
        AgentError::download(format!("file {}", src.display()), refusal::FILE_NOT_ALLOWED, Some(Arc::new(e)))
    })?;
    let inside = |p: &Path| p.starts_with(&root) && !["/proc", "/sys", "/dev"].iter().any(|bad| p.starts_with(bad));
    if !inside(&real) {
        return Err(refuse(format!("{} is outside images.file_dir {}", src.display(), root.display())));
    }
    // O_NOFOLLOW: the last component cannot have become a symlink since the
    // check; O_NONBLOCK: a FIFO swapped in cannot hang the open.
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(&real).map_err(|e| {
        AgentError::download(format!("open {}", real.display()), refusal::FILE_NOT_ALLOWED, Some(Arc::new(e)))
    })?;
    let meta = f.metadata().map_err(|e| AgentError::io(format!("stat {}", real.display()), e))?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!("{} is not a regular file", real.display())));
    }
    // Where the open really landed (a directory above may have been swapped).
    let landed: PathBuf = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| AgentError::io("read the opened file's path", e))?;
    if !inside(&landed) {
        return Err(refuse(format!("{} is outside images.file_dir {}", landed.display(), root.display())));
    }
    Ok((f, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], private: bool) -> FetchPolicy {
        let cfg = ImagesConfig {
            fetch_allow: allow.iter().map(|s| s.to_string()).collect(),
            fetch_deny: deny.iter().map(|s| s.to_string()).collect(),
            allow_private_networks: private,
            ..ImagesConfig::default()
        };
        FetchPolicy::new(&cfg).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const R: &str = refusal::ADDRESS_NOT_ALLOWED;

    #[test]
    fn default_refuses_local_link_local_metadata_and_private() {
        let p = policy(&[], &[], false);
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(p.check_ip(None, ip(bad), R).is_err(), "{bad} allowed");
        }
        for good in ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "8.8.8.8"] {
            assert!(p.check_ip(None, ip(good), R).is_ok(), "{good} refused");
        }
        let err = p.check_ip(None, ip("169.254.169.254"), R).unwrap_err();
        assert!(err.what.contains("metadata"), "{err}");
    }

    #[test]
    fn private_is_a_switch_but_metadata_never_is() {
        let p = policy(&[], &[], true);
        assert!(p.check_ip(None, ip("10.1.2.3"), R).is_ok());
        assert!(p.check_ip(None, ip("fd12::1"), R).is_ok());
        assert!(p.check_ip(None, ip("127.0.0.1"), R).is_err());
        assert!(p.check_ip(None, ip("169.254.169.254"), R).is_err());
        // A host-name allow entry lifts loopback for that name, not metadata.
        let p = policy(&["mirror.internal"], &[], false);
        assert!(p.check_ip(Some("mirror.internal"), ip("10.0.0.9"), R).is_ok());
        assert!(p.check_ip(Some("other.internal"), ip("10.0.0.9"), R).is_err());
        assert!(p.check_ip(Some("mirror.internal"), ip("169.254.169.254"), R).is_err());
    }

    #[test]
    fn allow_and_deny_lists() {
        let p = policy(&["127.0.0.1", "10.8.0.0/16", "*.images.example"], &["93.184.0.0/16", "bad.example"], false);
        assert!(p.check_ip(None, ip("127.0.0.1"), R).is_ok());
        assert!(p.check_ip(None, ip("::ffff:127.0.0.1"), R).is_ok());
        assert!(p.check_ip(None, ip("127.0.0.2"), R).is_err());
        assert!(p.check_ip(None, ip("10.8.200.1"), R).is_ok());
        assert!(p.check_ip(None, ip("10.9.0.1"), R).is_err());
        assert!(p.check_ip(None, ip("93.184.215.14"), R).is_err());
        assert!(p.check_name("bad.example.", R).is_err());
        assert!(p.check_name("BAD.example", R).is_err());
        assert!(p.check_name("good.example", R).is_ok());
        assert!(p.check_name("metadata.google.internal", R).is_err());
        assert!(p.check_ip(Some("a.images.example"), ip("192.168.0.5"), R).is_ok());
        assert!(p.check_ip(Some("images.example"), ip("192.168.0.5"), R).is_err());
        assert!(p.check_ip(Some("xa.images.example.evil"), ip("192.168.0.5"), R).is_err());
        // An explicit allow of a metadata address is the operator's choice.
        let p = policy(&["169.254.169.254/32"], &[], false);
        assert!(p.check_ip(None, ip("169.254.169.254"), R).is_ok());
    }

    #[test]
    fn bad_entries_are_config_errors() {
        for bad in ["10.0.0.0/33", "not a host", "a..b", "http://x/"] {
            let cfg = ImagesConfig { fetch_allow: vec![bad.into()], ..ImagesConfig::default() };
            assert_eq!(FetchPolicy::new(&cfg).unwrap_err().code(), "validation_failed", "{bad}");
        }
    }

    #[test]
    fn literal_urls_and_resolved_answers() {
        let p = policy(&[], &[], false);
        let u = url::Url::parse("http://169.254.169.254/latest/meta-data/").unwrap();
        assert!(p.check_url(&u, R).is_err());
        // Decimal and IPv6-mapped spellings are the same addresses.
        assert!(p.check_url(&url::Url::parse("http://2852039166/").unwrap(), R).is_err());
        assert!(p.check_url(&url::Url::parse("http://[::ffff:a9fe:a9fe]/").unwrap(), R).is_err());
        assert!(p.check_url(&url::Url::parse("https://example.com/").unwrap(), R).is_ok());
        // A name answering with a public and a metadata address keeps only the public one;
        // one answering only with refused addresses is refused.
        let mixed = vec!["93.184.215.14:0".parse().unwrap(), "169.254.169.254:0".parse().unwrap()];
        assert_eq!(p.filter("x.example", mixed).unwrap(), vec!["93.184.215.14:0".parse().unwrap()]);
        let local = vec!["127.0.0.1:0".parse().unwrap()];
        assert_eq!(p.filter("localhost", local).unwrap_err().reason, R);
    }

    #[tokio::test]
    async fn resolver_refuses_names_that_resolve_to_loopback() {
        use reqwest::dns::Resolve;
        let r = PolicyResolver::new(Arc::new(policy(&[], &[], false)));
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(a) => panic!("localhost resolved to {:?}", a.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert_eq!(find_refusal(err.as_ref()).map(|r| r.reason), Some(R), "{err}");
    }
}
