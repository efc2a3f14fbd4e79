//! The repository layout the README promises: every workspace crate is in
//! its layout section, shared crates do not depend on control-plane crates,
//! and the CLI depends on neither `services/` nor the gateway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Workspace members and the path each `otherix-*` workspace dependency points to.
fn workspace() -> (Vec<String>, HashMap<String, String>) {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members_block = text.split("members = [").nth(1).unwrap().split(']').next().unwrap();
    let members = members_block
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').strip_prefix('"')?.strip_suffix('"').map(str::to_owned))
        .collect();
    let paths = text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(" = { path = \"")?;
            Some((name.trim().to_owned(), rest.split('"').next()?.to_owned()))
        })
        .collect();
    (members, paths)
}

/// The `otherix-*` crates a member depends on (normal dependencies only).
fn deps_of(member: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    let Some(deps) = text.split("[dependencies]").nth(1) else { return Vec::new() };
    let deps = deps.split("\n[").next().unwrap_or_default();
    deps.lines()
        .filter_map(|l| l.split(['.', ' ', '=']).next())
        .filter(|n| n.starts_with("otherix-"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_layout_names_every_crate_folder() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let layout = readme.split("## Repository layout").nth(1).expect("a layout section").split("\n## ").next().unwrap();
    let (members, _) = workspace();
    for m in members {
        let leaf = m.rsplit('/').next().unwrap();
        let top = m.split('/').next().unwrap();
        assert!(layout.contains(&format!("{top}/")), "README layout lacks {top}/ (for {m})");
        if m.contains('/') && top != "agent" && top != "dev" {
            assert!(layout.contains(&format!("{leaf}/")), "README layout lacks {m}");
        }
    }
}

#[test]
fn shared_crates_and_the_cli_stay_off_the_control_plane() {
    let (members, paths) = workspace();
    let under = |dep: &str, dir: &str| paths.get(dep).is_some_and(|p| p.starts_with(dir));
    // The parsing sees real dependencies (so the checks below can fail).
    assert!(deps_of("cli").contains(&"otherix-proto".to_owned()));
    assert!(under("otherix-store", "services/") && under("otherix-pki", "crates/"));
    for m in members.iter().filter(|m| m.starts_with("crates/") || m.as_str() == "cli") {
        for d in deps_of(m) {
            assert!(!under(&d, "services/"), "{m} depends on {d}, a control-plane crate");
            assert!(!under(&d, "gateway"), "{m} depends on the gateway ({d})");
        }
    }
    // A crate under services/ that a binary other than otherix-api uses belongs in crates/.
    for m in members.iter().filter(|m| m.starts_with("agent") || m.as_str() == "cli") {
        for d in deps_of(m) {
            assert!(!under(&d, "services/"), "{m} depends on {d}: move it to crates/");
        }
    }
}
