//! Rendering API objects as tables, text or JSON.

use std::time::SystemTime;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::Format;
use otherix_proto::v1::{
    CreateJoinTokenResponse, ListJoinTokenConsumptionsResponse, ListJoinTokensResponse, ListNodesResponse, Node,
};

/// Prints in the chosen format.
pub struct Printer {
    format: Option<Format>,
}

/// A compact age: 45s, 20m, 3h, 5d.
pub fn age(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t.and_then(|t| SystemTime::try_from(*t).ok()) else { return "-".into() };
    let secs = SystemTime::now().duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1}GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn table(rows: &[Vec<String>]) {
    let widths: Vec<usize> =
        (0..rows.first().map_or(0, Vec::len)).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("   ").trim_end());
    }
}

static POOL: std::sync::LazyLock<Option<DescriptorPool>> =
    std::sync::LazyLock::new(|| DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).ok());

/// The message (of proto type `full_name`) as the REST surface renders it.
fn json<M: Message>(msg: &M, full_name: &str) -> String {
    let rendered = POOL
        .as_ref()
        .and_then(|p| p.get_message_by_name(full_name))
        .and_then(|d| DynamicMessage::decode(d, msg.encode_to_vec().as_slice()).ok())
        .and_then(|m| otherix_proto_json::message_to_json(&m).ok());
    rendered.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()).unwrap_or_else(|| "{}".into())
}

impl Printer {
    /// A printer for `format` (each command has its own default).
    pub fn new(format: Option<Format>) -> Printer {
        Printer { format }
    }

    fn is_json(&self) -> bool {
        self.format == Some(Format::Json)
    }

    /// `NAME ARCHITECTURE STATUS CORDONED AGE`.
    pub fn node_list(&self, r: &ListNodesResponse) {
        if self.is_json() {
            return println!("{}", json(r, "otherix.v1.ListNodesResponse"));
        }
        let mut rows =
            vec![vec!["NAME", "ARCHITECTURE", "STATUS", "CORDONED", "AGE"].into_iter().map(String::from).collect()];
        for n in &r.nodes {
            rows.push(vec![
                n.name.clone(),
                n.architecture.clone(),
                n.status.clone(),
                if n.cordoned { "yes" } else { "no" }.into(),
                age(n.created_at.as_ref()),
            ]);
        }
        table(&rows);
    }

    /// One node as `key: value` lines, with hardware, heartbeat age and pressure.
    pub fn node(&self, n: &Node) {
        if self.is_json() {
            return println!("{}", json(n, "otherix.v1.Node"));
        }
        println!("name: {}", n.name);
        println!("architecture: {}", n.architecture);
        println!("status: {}", n.status);
        println!("cordoned: {}", if n.cordoned { "yes" } else { "no" });
        println!("age: {}", age(n.created_at.as_ref()));
        if let Some(c) = &n.capacity {
            println!("advertised_endpoint: {}", n.advertised_endpoint);
            println!("agent_version: {}", n.agent_version);
            println!("accelerator: {}", n.accelerator);
            println!("qemu_version: {}", n.qemu_version);
            println!(
                "last_heartbeat: {} ({} ago)",
                n.last_heartbeat_at.map(|t| t.to_string()).unwrap_or_else(|| "never".into()),
                age(n.last_heartbeat_at.as_ref())
            );
            println!("hardware:");
            println!("  cpu: {} used / {} total", c.cpu_cores.saturating_sub(c.cpu_available), c.cpu_cores);
            println!(
                "  memory: {} used / {} total",
                gib(c.memory_bytes.saturating_sub(c.memory_available_bytes)),
                gib(c.memory_bytes)
            );
            println!(
                "  system_disk: {} used / {} total",
                gib(c.system_disk_total_bytes.saturating_sub(c.system_disk_free_bytes)),
                gib(c.system_disk_total_bytes)
            );
            let p = n.pressure.unwrap_or_default();
            println!("pressure:");
            for (name, cond) in [("memory", p.memory), ("system_disk", p.system_disk)] {
                let cond = cond.unwrap_or_default();
                let state = if cond.active { "under pressure" } else { "ok" };
                println!("  {name}: {state} (consecutive: {})", cond.consecutive_count);
            }
            if !n.pools.is_empty() {
                println!("pools:");
                for p in &n.pools {
                    println!(
                        "  - {} {} {} free {} ({})",
                        p.name,
                        p.r#type,
                        p.path,
                        gib(p.free_bytes),
                        p.reconciliation_status
                    );
                }
            }
        }
    }

    /// The plaintext token and the CA fingerprint to pin.
    pub fn join_token_created(&self, r: &CreateJoinTokenResponse) {
        if self.is_json() {
            return println!("{}", json(r, "otherix.v1.CreateJoinTokenResponse"));
        }
        let t = r.join_token.clone().unwrap_or_default();
        println!("token: {}", r.token);
        println!("ca_fingerprint_sha256: {}", r.ca_fingerprint_sha256);
        println!("id: {}", t.id);
        println!("expires_at: {}", t.expires_at.map(|t| t.to_string()).unwrap_or_default());
        println!("max_uses: {}", if t.max_uses == 0 { "unlimited".into() } else { t.max_uses.to_string() });
        if !t.intended_node_name.is_empty() {
            println!("node_name: {}", t.intended_node_name);
        }
    }

    /// `ID NODE USES EXPIRES CREATED_BY`.
    pub fn join_token_list(&self, r: &ListJoinTokensResponse) {
        if self.is_json() {
            return println!("{}", json(r, "otherix.v1.ListJoinTokensResponse"));
        }
        let mut rows =
            vec![vec!["ID", "NODE", "USES", "EXPIRES", "CREATED_BY"].into_iter().map(String::from).collect()];
        for t in &r.join_tokens {
            let max = if t.max_uses == 0 { "∞".into() } else { t.max_uses.to_string() };
            rows.push(vec![
                t.id.clone(),
                if t.intended_node_name.is_empty() { "-".into() } else { t.intended_node_name.clone() },
                format!("{}/{max}", t.consumption_count),
                t.expires_at.map(|t| t.to_string()).unwrap_or_default(),
                t.created_by.clone(),
            ]);
        }
        table(&rows);
    }

    /// `NODE CONSUMED_AT SOURCE`.
    pub fn consumptions(&self, r: &ListJoinTokenConsumptionsResponse) {
        if self.is_json() {
            return println!("{}", json(r, "otherix.v1.ListJoinTokenConsumptionsResponse"));
        }
        let mut rows = vec![vec!["NODE", "CONSUMED_AT", "SOURCE"].into_iter().map(String::from).collect()];
        for c in &r.consumptions {
            rows.push(vec![
                c.node_name.clone(),
                c.consumed_at.map(|t| t.to_string()).unwrap_or_default(),
                c.source_address.clone(),
            ]);
        }
        table(&rows);
    }

    /// A mutation's outcome: one line, or the object in JSON.
    pub fn done<M: Message>(&self, msg: &M, full_name: &str, line: &str) {
        if self.is_json() {
            println!("{}", json(msg, full_name));
        } else {
            println!("{line}");
        }
    }
}
