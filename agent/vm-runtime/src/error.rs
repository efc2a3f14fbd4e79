//! The agent's error type. Each variant maps to one code of the shared error
//! table (`otherix-errors`); the table alone decides the gRPC and HTTP status.

use std::sync::Arc;

use otherix_errors::ErrorCode;
use serde_json::{Map, Value};

/// The cause of an error, shared so that one download's failure can be handed
/// to every request waiting on it.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why an image fetch was refused before any byte was read (`details.reason`
/// of a `download_failed`).
pub mod refusal {
    /// The host, or every address it resolves to, is not allowed by the fetch policy.
    pub const ADDRESS_NOT_ALLOWED: &str = "address_not_allowed";
    /// A redirect pointed at a host or address the fetch policy refuses.
    pub const REDIRECT_NOT_ALLOWED: &str = "redirect_not_allowed";
    /// A `file://` URL outside `images.file_dir`, or not a regular file.
    pub const FILE_NOT_ALLOWED: &str = "file_not_allowed";
    /// More redirects than the limit.
    pub const TOO_MANY_REDIRECTS: &str = "too_many_redirects";
    /// The image is larger than `images.max_image_bytes`.
    pub const TOO_LARGE: &str = "too_large";
    /// The server answered, but not with the image (HTTP status, short body).
    pub const BAD_RESPONSE: &str = "bad_response";
    /// The connection failed or broke.
    pub const TRANSPORT: &str = "transport";
}

/// Everything an agent operation can fail with. Each variant maps to one
/// documented error code ([`AgentError::error_code`]). `Display` gives this
/// error's own message; [`AgentError::message`] adds its causes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// A request field is missing or invalid.
    #[error("{0}")]
    Validation(String),
    /// The image URL does not parse.
    #[error("image url {raw:?} is invalid")]
    InvalidUrl {
        /// The URL as given.
        raw: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The image could not be fetched, or its fetch was refused.
    #[error("image download failed: {message}")]
    DownloadFailed {
        /// What went wrong, with the URL or path.
        message: String,
        /// A machine-readable reason, one of [`refusal`].
        reason: &'static str,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },
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
    /// The VM asks for more than the host or the pool has left.
    #[error("insufficient resources: {requested} {unit} of {resource} requested, {available} {unit} available")]
    InsufficientResources {
        /// `vcpus`, `memory` or `disk`.
        resource: &'static str,
        /// What the request needs.
        requested: u64,
        /// What is left for it.
        available: u64,
        /// The unit of both numbers (`vcpus`, `MiB`, `bytes`).
        unit: &'static str,
    },
    /// QEMU did not start.
    #[error("qemu failed to start: {message}")]
    QemuSpawnFailed {
        /// QEMU's stderr, or what the agent saw.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },
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
    #[error("vm create failed: {what}")]
    CreateFailed {
        /// The step, and a tool's stderr when it had one.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },
    /// Anything else (I/O on the agent's own state, QMP trouble).
    #[error("internal error: {what}")]
    Internal {
        /// What the agent was doing.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Cause>,
    },
}

impl AgentError {
    /// The documented error code in the shared table. This is the agent's only
    /// mapping: the table gives the gRPC and HTTP status.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            AgentError::Validation(_) | AgentError::InvalidUrl { .. } => ErrorCode::ValidationFailed,
            AgentError::DownloadFailed { .. } => ErrorCode::DownloadFailed,
            AgentError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
            AgentError::Qcow2HeaderInvalid(_) => ErrorCode::Qcow2HeaderInvalid,
            AgentError::UnsupportedFormat(_) => ErrorCode::UnsupportedFormat,
            AgentError::DiskTooSmall { .. } => ErrorCode::DiskTooSmall,
            AgentError::InsufficientResources { .. } => ErrorCode::InsufficientResources,
            AgentError::QemuSpawnFailed { .. } => ErrorCode::QemuSpawnFailed,
            AgentError::VmNotFound(_) => ErrorCode::VmNotFound,
            AgentError::ConsoleInUse(_) => ErrorCode::ConsoleInUse,
            AgentError::StopTimeout(_) => ErrorCode::StopTimeout,
            AgentError::VmNotRunning(_) => ErrorCode::VmNotRunning,
            AgentError::PoolNotFound(_) => ErrorCode::PoolNotFound,
            AgentError::Conflict(_) => ErrorCode::Conflict,
            AgentError::TaskLost => ErrorCode::AgentTaskLost,
            AgentError::TaskNotFound(_) => ErrorCode::NotFound,
            AgentError::CreateFailed { .. } => ErrorCode::VmCreateFailed,
            AgentError::Internal { .. } => ErrorCode::Internal,
        }
    }

    /// The documented error code as a string, e.g. `checksum_mismatch`.
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    /// The message for people: this error and each cause, joined by `: `.
    pub fn message(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    }

    /// Structured details for `google.protobuf.Struct` / the REST `details`.
    pub fn details(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            AgentError::DownloadFailed { reason, .. } => {
                m.insert("reason".into(), Value::from(*reason));
            }
            AgentError::InsufficientResources { resource, requested, available, unit } => {
                m.insert("resource".into(), Value::from(*resource));
                m.insert("requested".into(), Value::from(*requested));
                m.insert("available".into(), Value::from(*available));
                m.insert("unit".into(), Value::from(*unit));
            }
            AgentError::DiskTooSmall { requested, image } => {
                m.insert("requested_bytes".into(), Value::from(*requested));
                m.insert("image_bytes".into(), Value::from(*image));
            }
            _ => {}
        }
        m
    }

    /// An internal error without a cause.
    pub(crate) fn internal(what: impl Into<String>) -> AgentError {
        AgentError::Internal { what: what.into(), source: None }
    }

    /// An internal error from a failure with context.
    pub(crate) fn internal_from(
        what: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> AgentError {
        AgentError::Internal { what: what.into(), source: Some(Arc::new(e)) }
    }

    /// An internal error from an I/O failure with context.
    pub(crate) fn io(what: impl Into<String>, e: std::io::Error) -> AgentError {
        AgentError::internal_from(what, e)
    }

    /// An internal error from a file helper (the path is in the cause).
    pub(crate) fn file(what: impl Into<String>, e: otherix_files::FileError) -> AgentError {
        AgentError::internal_from(what, e)
    }

    /// A refused or failed download (`reason` from [`refusal`]).
    pub fn download(message: impl Into<String>, reason: &'static str, source: Option<Cause>) -> AgentError {
        AgentError::DownloadFailed { message: message.into(), reason, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_come_from_the_shared_table() {
        assert_eq!(AgentError::Validation("x".into()).code(), "validation_failed");
        assert_eq!(
            AgentError::ChecksumMismatch { expected: "a".into(), actual: "b".into() }.code(),
            "checksum_mismatch"
        );
        assert_eq!(AgentError::StopTimeout(3).code(), "stop_timeout");
        assert_eq!(AgentError::ConsoleInUse("v".into()).error_code().grpc_code(), tonic::Code::FailedPrecondition);
        assert_eq!(AgentError::TaskLost.code(), "agent_task_lost");
    }

    #[test]
    fn display_leaves_the_cause_to_source() {
        let e = AgentError::io("write /x/vm.pb", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(e.to_string(), "internal error: write /x/vm.pb");
        let cause = std::io::Error::from(std::io::ErrorKind::PermissionDenied).to_string();
        assert_eq!(std::error::Error::source(&e).map(|s| s.to_string()), Some(cause.clone()));
        assert_eq!(e.message(), format!("internal error: write /x/vm.pb: {cause}"));
    }

    #[test]
    fn download_refusals_carry_their_reason() {
        let e = AgentError::download("http://169.254.169.254/: refused", refusal::ADDRESS_NOT_ALLOWED, None);
        assert_eq!(e.code(), "download_failed");
        assert_eq!(e.details()["reason"], "address_not_allowed");
    }
}
