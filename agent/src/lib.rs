//! The Otherix agent: the gRPC surface of the VM runtime on one KVM/QEMU host, its
//! enrolment with the control plane and the heartbeat.

pub mod bootstrap;
pub mod config;
pub mod node;
pub mod server;
pub mod service;
