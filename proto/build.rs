//! Generates Rust code and the raw descriptor set from the protos in this directory.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    // The published contract; `../proto-internal` (the etcd records, otherix.store.v1)
    // is compiled separately below so it never enters the descriptor set that
    // reflection serves and the gateway reads.
    for dir in ["otherix/v1", "otherix/agent/v1", "google/rpc"] {
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
        .compile_protos(&files, std::slice::from_ref(&root))?;

    let internal = root.join("../proto-internal");
    println!("cargo:rerun-if-changed=../proto-internal/otherix/store/v1");
    let mut store: Vec<_> = std::fs::read_dir(internal.join("otherix/store/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    store.sort();
    for f in &store {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // Types it imports from the public contract are the ones generated above.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("otherix_store_descriptor.bin"))
        .build_server(false)
        .build_client(false)
        .extern_path(".otherix.v1", "crate::otherix::v1")
        .compile_protos(&store, &[internal, root])?;
    Ok(())
}
