//! The Otherix agent: the gRPC surface of the VM runtime on one KVM/QEMU host.

pub mod config;
pub mod server;
pub mod service;
