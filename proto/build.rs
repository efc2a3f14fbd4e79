//! Generates Rust code and the raw descriptor set from the protos in this directory.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    for dir in ["otherix/v1", "otherix/store/v1", "otherix/agent/v1", "google/rpc"] {
        // A directory's mtime changes when a file is added or removed.
        println!("cargo:rerun-if-changed={dir}");
        if !root.join(dir).is_dir() {
            continue;
        }
        let mut entries: Vec<_> = std::fs::read_dir(root.join(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "proto"))
            .collect();
        entries.sort();
        files.extend(entries);
    }
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=google/api");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The raw descriptor set keeps custom options (google.api.http, otherix.v1.access),
    // which a round trip through prost-types would drop.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("otherix_descriptor.bin"))
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &[root])?;
    Ok(())
}
