//! The agent's VM runtime: one QEMU process per VM driven over QMP, an image
//! cache per storage pool, a disk and a NoCloud seed per VM, a serial console
//! multiplexer, and records of every VM and task on disk so the agent can be
//! restarted (or killed) without taking VMs down.
//!
//! [`Runtime`] is the entry point; the agent binary puts its gRPC service on
//! top. Errors carry codes of the shared table through [`AgentError::error_code`].

mod cache;
pub mod config;
pub mod console;
mod disk;
mod error;
pub mod fetch;
pub mod image;
mod pool;
pub mod qemu;
mod runtime;
pub mod state;
pub mod validate;

pub use config::RuntimeConfig;
pub use error::{AgentError, Cause, refusal};
pub use runtime::{Runtime, reason};
