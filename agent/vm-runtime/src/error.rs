//! The agent's error type and its documented codes.

use tonic::Code;

/// Everything an agent operation can fail with. Each variant maps to one
/// documented error code ([`AgentError::code`]) and one gRPC status code
/// ([`AgentError::grpc_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// A request field is missing or invalid.
    #[error("{0}")]
    Validation(String),
    /// The image could not be fetched.
    #[error("image download failed: {0}")]
    DownloadFailed(String),
    /// The fetched image does not match its sha256 pin.
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        /// The pinned digest.
        expected: String,
        /// The digest of what was fetched.
        actual: String,
    },
    /// The file declared as qcow2 is not a usable qcow2 image.
    #[error("invalid qcow2 image: {0}")]
    Qcow2HeaderInvalid(String),
    /// The file is not in the declared (or any accepted) format.
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    /// The requested disk is smaller than the image.
    #[error("disk of {requested} bytes is smaller than the image's {image} bytes")]
    DiskTooSmall {
        /// Requested disk size in bytes.
        requested: u64,
        /// The image's virtual size in bytes.
        image: u64,
    },
    /// The VM asks for more than the host has.
    #[error("insufficient resources: {0}")]
    InsufficientResources(String),
    /// QEMU did not start; carries QEMU's stderr.
    #[error("qemu failed to start: {0}")]
    QemuSpawnFailed(String),
    /// No VM with this id on the agent.
    #[error("vm {0} not found")]
    VmNotFound(String),
    /// Another interactive console session is open.
    #[error("another console session is open on vm {0}")]
    ConsoleInUse(String),
    /// The guest did not power off within the timeout; it keeps running.
    #[error("vm did not power off within {0} s; it keeps running")]
    StopTimeout(u64),
    /// The operation needs a running QEMU process.
    #[error("vm {0} is not running")]
    VmNotRunning(String),
    /// The named pool is not declared on this agent.
    #[error("pool {0} not found")]
    PoolNotFound(String),
    /// The request conflicts with existing state (e.g. a VM id in use).
    #[error("{0}")]
    Conflict(String),
    /// The agent restarted while the task was running.
    #[error("the agent restarted while the task ran; start a new task")]
    TaskLost,
    /// No task with this id.
    #[error("task {0} not found")]
    TaskNotFound(String),
    /// Making the VM's disk, seed or directories failed.
    #[error("vm create failed: {0}")]
    CreateFailed(String),
    /// Anything else (I/O on the agent's own state, QMP trouble).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// The documented error code, e.g. `checksum_mismatch`.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Validation(_) => "validation_failed",
            AgentError::DownloadFailed(_) => "download_failed",
            AgentError::ChecksumMismatch { .. } => "checksum_mismatch",
            AgentError::Qcow2HeaderInvalid(_) => "qcow2_header_invalid",
            AgentError::UnsupportedFormat(_) => "unsupported_format",
            AgentError::DiskTooSmall { .. } => "disk_too_small",
            AgentError::InsufficientResources(_) => "insufficient_resources",
            AgentError::QemuSpawnFailed(_) => "qemu_spawn_failed",
            AgentError::VmNotFound(_) => "vm_not_found",
            AgentError::ConsoleInUse(_) => "console_in_use",
            AgentError::StopTimeout(_) => "stop_timeout",
            AgentError::VmNotRunning(_) => "vm_not_running",
            AgentError::PoolNotFound(_) => "pool_not_found",
            AgentError::Conflict(_) => "conflict",
            AgentError::TaskLost => "agent_task_lost",
            AgentError::TaskNotFound(_) => "not_found",
            AgentError::CreateFailed(_) => "vm_create_failed",
            AgentError::Internal(_) => "internal",
        }
    }

    /// The gRPC status code the error travels with.
    pub fn grpc_code(&self) -> Code {
        match self {
            AgentError::Validation(_)
            | AgentError::Qcow2HeaderInvalid(_)
            | AgentError::UnsupportedFormat(_)
            | AgentError::DiskTooSmall { .. }
            | AgentError::ChecksumMismatch { .. } => Code::InvalidArgument,
            AgentError::PoolNotFound(_) => Code::InvalidArgument,
            AgentError::DownloadFailed(_) => Code::Unavailable,
            AgentError::InsufficientResources(_) => Code::ResourceExhausted,
            AgentError::VmNotFound(_) | AgentError::TaskNotFound(_) => Code::NotFound,
            AgentError::ConsoleInUse(_) | AgentError::VmNotRunning(_) => Code::FailedPrecondition,
            AgentError::StopTimeout(_) => Code::DeadlineExceeded,
            AgentError::Conflict(_) | AgentError::TaskLost => Code::Aborted,
            AgentError::QemuSpawnFailed(_) | AgentError::CreateFailed(_) | AgentError::Internal(_) => Code::Internal,
        }
    }

    /// An internal error from an I/O failure with context.
    pub(crate) fn io(what: impl std::fmt::Display, e: std::io::Error) -> AgentError {
        AgentError::Internal(format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_strings() {
        assert_eq!(AgentError::Validation("x".into()).code(), "validation_failed");
        assert_eq!(
            AgentError::ChecksumMismatch { expected: "a".into(), actual: "b".into() }.code(),
            "checksum_mismatch"
        );
        assert_eq!(AgentError::StopTimeout(3).code(), "stop_timeout");
        assert_eq!(AgentError::ConsoleInUse("v".into()).grpc_code(), Code::FailedPrecondition);
        assert_eq!(AgentError::VmNotFound("v".into()).grpc_code(), Code::NotFound);
    }
}
