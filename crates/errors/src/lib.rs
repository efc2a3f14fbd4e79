//! The one table from Otherix error codes to gRPC and HTTP status, and the
//! encoding of error details that every transport shares.
//!
//! A failure leaves a service as a [`tonic::Status`] whose `details` hold a
//! `google.rpc.Status` with two entries: a `google.rpc.ErrorInfo` whose
//! `reason` is the documented error code, and a `google.protobuf.Struct` with
//! the structured details. The REST gateway renders the same status as
//! `{"error":{"code":...,"message":...,"details":{...}}}` and the CLI as
//! `api_error: <code>: <message>`. Nothing else invents codes.

use otherix_proto::google::rpc;
use prost::Message;
use prost_types::{Any, Struct, Value, value::Kind};
use serde_json::{Map, Value as Json};
use tonic::Code;

/// The `ErrorInfo.domain` of every Otherix error.
pub const ERROR_DOMAIN: &str = "otherix.dev";

const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const STRUCT_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";
const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The detail key holding the field violations of a `validation_failed`
/// error: a list of `{"field", "description"}` objects, mirrored on gRPC as a
/// `google.rpc.BadRequest`.
pub const FIELD_VIOLATIONS: &str = "field_violations";
/// The detail key holding how many seconds to wait before retrying, mirrored
/// on gRPC as a `google.rpc.RetryInfo` and on REST as `Retry-After`.
pub const RETRY_AFTER_SECONDS: &str = "retry_after_seconds";

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($code:literal, $grpc:ident, $http:literal), )*) => {
        /// A documented Otherix error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as documented, e.g. `validation_failed`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The gRPC status code this error travels with.
            pub fn grpc_code(self) -> Code {
                match self { $(ErrorCode::$variant => Code::$grpc,)* }
            }

            /// The HTTP status the REST surface answers with.
            pub fn http_status(self) -> http::StatusCode {
                let status = match self { $(ErrorCode::$variant => $http,)* };
                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
            }

            /// Looks a documented code up by its name.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                match name { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The request is malformed or a field is invalid.
    ValidationFailed = ("validation_failed", InvalidArgument, 400),
    /// No credentials were presented.
    Unauthenticated = ("unauthenticated", Unauthenticated, 401),
    /// The credentials were wrong.
    InvalidCredentials = ("invalid_credentials", Unauthenticated, 401),
    /// The token was revoked.
    TokenRevoked = ("token_revoked", Unauthenticated, 401),
    /// A join token's lifetime elapsed.
    TokenExpired = ("token_expired", Unauthenticated, 401),
    /// A join token has no uses left.
    TokenExhausted = ("token_exhausted", Unauthenticated, 401),
    /// A join token is unknown.
    TokenInvalid = ("token_invalid", Unauthenticated, 401),
    /// The caller's role lacks the permission.
    PermissionDenied = ("permission_denied", PermissionDenied, 403),
    /// The resource does not exist or is not visible to the caller.
    NotFound = ("not_found", NotFound, 404),
    /// The HTTP method is not served on this path.
    MethodNotAllowed = ("method_not_allowed", Unimplemented, 405),
    /// The request conflicts with the current state.
    Conflict = ("conflict", Aborted, 409),
    /// The resource is still referenced.
    ResourceInUse = ("resource_in_use", FailedPrecondition, 409),
    /// An idempotency key was reused with another request.
    IdempotencyKeyMismatch = ("idempotency_key_mismatch", AlreadyExists, 409),
    /// The resource changed since the etag the request carries.
    EtagMismatch = ("etag_mismatch", Aborted, 409),
    /// The request body exceeds the limit.
    PayloadTooLarge = ("payload_too_large", ResourceExhausted, 413),
    /// The request body is not in a media type the endpoint reads (REST takes JSON).
    UnsupportedMediaType = ("unsupported_media_type", InvalidArgument, 415),
    /// Too many attempts; retry later.
    RateLimited = ("rate_limited", ResourceExhausted, 429),
    /// An unexpected server-side failure.
    Internal = ("internal", Internal, 500),
    /// The agent on the node could not be reached.
    AgentUnreachable = ("agent_unreachable", Unavailable, 502),
    /// The request did not finish within the server's time limit, or the
    /// store is unavailable.
    RequestTimeout = ("request_timeout", Unavailable, 503),
    /// No default storage pool is configured.
    DefaultPoolNotSet = ("default_pool_not_set", InvalidArgument, 400),
    /// The named storage pool does not exist.
    PoolNotFound = ("pool_not_found", InvalidArgument, 400),
    /// The node is gone; only readmit brings it back.
    NodeGone = ("node_gone", FailedPrecondition, 409),
    /// The image URL could not be fetched.
    DownloadFailed = ("download_failed", Unavailable, 502),
    /// The fetched image does not match its sha256 pin.
    ChecksumMismatch = ("checksum_mismatch", InvalidArgument, 400),
    /// The file is not a valid qcow2 image (or declares a backing file).
    Qcow2HeaderInvalid = ("qcow2_header_invalid", InvalidArgument, 400),
    /// The image format is not qcow2 or raw, or does not match the file.
    UnsupportedFormat = ("unsupported_format", InvalidArgument, 400),
    /// The requested disk is smaller than the image.
    DiskTooSmall = ("disk_too_small", InvalidArgument, 400),
    /// The host lacks the memory or CPUs the VM asks for.
    InsufficientResources = ("insufficient_resources", ResourceExhausted, 409),
    /// QEMU did not start; the message carries its stderr.
    QemuSpawnFailed = ("qemu_spawn_failed", Internal, 500),
    /// The VM does not exist.
    VmNotFound = ("vm_not_found", NotFound, 404),
    /// Another interactive console session is attached.
    ConsoleInUse = ("console_in_use", FailedPrecondition, 409),
    /// The guest did not power off within the stop timeout; it keeps running.
    StopTimeout = ("stop_timeout", DeadlineExceeded, 409),
    /// The VM is not running.
    VmNotRunning = ("vm_not_running", FailedPrecondition, 409),
    /// The agent restarted during the task; start a new task.
    AgentTaskLost = ("agent_task_lost", Aborted, 409),
    /// Creating the VM failed for another reason (see the message).
    VmCreateFailed = ("vm_create_failed", Internal, 500),
}

/// An error as it leaves the API: a documented code, a message for people and
/// structured details for programs.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The documented code.
    pub code: ErrorCode,
    /// A one-sentence English message.
    pub message: String,
    /// Structured details (may be empty).
    pub details: Map<String, Json>,
}

impl ApiError {
    /// An error with a code and a message and no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: Map::new() }
    }

    /// Adds one detail.
    pub fn with_detail(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// `validation_failed` naming the offending field (a dotted path such as
    /// `vm.name`), with the matching field violation.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let violation = serde_json::json!([{ "field": field, "description": message }]);
        ApiError::new(ErrorCode::ValidationFailed, message)
            .with_detail("field", field)
            .with_detail(FIELD_VIOLATIONS, violation)
    }

    /// `not_found` naming the kind of resource and its name, e.g. `node` and
    /// `worker-1`: details `{"kind", "name"}`.
    pub fn not_found(kind: &str, name: &str) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{kind} {name:?} not found"))
            .with_detail("kind", kind)
            .with_detail("name", name)
    }

    /// `rate_limited` telling the caller to retry after `seconds`.
    pub fn rate_limited(message: impl Into<String>, seconds: u64) -> Self {
        ApiError::new(ErrorCode::RateLimited, message).with_detail(RETRY_AFTER_SECONDS, seconds.max(1))
    }

    /// How many seconds the caller should wait before retrying, when the error says.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.details.get(RETRY_AFTER_SECONDS).and_then(Json::as_u64)
    }

    fn field_violations(&self) -> Vec<rpc::bad_request::FieldViolation> {
        let Some(Json::Array(items)) = self.details.get(FIELD_VIOLATIONS) else { return Vec::new() };
        items
            .iter()
            .filter_map(|v| {
                let field = v.get("field")?.as_str()?.to_owned();
                let description = v.get("description").and_then(Json::as_str).unwrap_or_default().to_owned();
                Some(rpc::bad_request::FieldViolation { field, description, ..Default::default() })
            })
            .collect()
    }

    /// `internal`, for failures whose cause is logged, not shown.
    pub fn internal() -> Self {
        ApiError::new(ErrorCode::Internal, "internal error")
    }

    /// Encodes the error as a gRPC status with ErrorInfo and Struct details.
    pub fn to_status(&self) -> tonic::Status {
        let info = rpc::ErrorInfo {
            reason: self.code.as_str().to_owned(),
            domain: ERROR_DOMAIN.to_owned(),
            metadata: Default::default(),
        };
        let mut details = vec![Any { type_url: ERROR_INFO_TYPE.to_owned(), value: info.encode_to_vec() }];
        if !self.details.is_empty() {
            let s = json_object_to_struct(&self.details);
            details.push(Any { type_url: STRUCT_TYPE.to_owned(), value: s.encode_to_vec() });
        }
        let field_violations = self.field_violations();
        if !field_violations.is_empty() {
            let br = rpc::BadRequest { field_violations };
            details.push(Any { type_url: BAD_REQUEST_TYPE.to_owned(), value: br.encode_to_vec() });
        }
        if let Some(secs) = self.retry_after_seconds() {
            // A retry "now" invites a hot loop: never less than a second.
            let delay = prost_types::Duration { seconds: i64::try_from(secs.max(1)).unwrap_or(i64::MAX), nanos: 0 };
            let ri = rpc::RetryInfo { retry_delay: Some(delay) };
            details.push(Any { type_url: RETRY_INFO_TYPE.to_owned(), value: ri.encode_to_vec() });
        }
        let status = rpc::Status { code: self.code.grpc_code() as i32, message: self.message.clone(), details };
        tonic::Status::with_details(self.code.grpc_code(), self.message.clone(), status.encode_to_vec().into())
    }

    /// Reads an error back from a gRPC status. Statuses that carry no Otherix
    /// ErrorInfo (tonic's own, a proxy's) get the code their gRPC code maps to.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut err = ApiError::new(fallback_code(status.code()), status.message());
        if let Ok(decoded) = rpc::Status::decode(status.details()) {
            for any in decoded.details {
                match any.type_url.as_str() {
                    ERROR_INFO_TYPE => {
                        if let Ok(info) = rpc::ErrorInfo::decode(any.value.as_slice())
                            && let Some(code) = ErrorCode::from_name(&info.reason)
                        {
                            err.code = code;
                        }
                    }
                    STRUCT_TYPE => {
                        if let Ok(s) = Struct::decode(any.value.as_slice()) {
                            err.details = struct_to_json_object(&s);
                        }
                    }
                    _ => {}
                }
            }
        }
        err
    }

    /// The REST body: `{"error":{"code","message","details"}}`, `details`
    /// being `{}` when there are none.
    pub fn to_json(&self) -> Json {
        let mut inner = Map::new();
        inner.insert("code".into(), Json::String(self.code.as_str().into()));
        inner.insert("message".into(), Json::String(self.message.clone()));
        inner.insert("details".into(), Json::Object(self.details.clone()));
        let mut outer = Map::new();
        outer.insert("error".into(), Json::Object(inner));
        Json::Object(outer)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.to_status()
    }
}

/// The documented code for a gRPC status that carries none of its own.
pub fn fallback_code(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition => ErrorCode::ValidationFailed,
        Code::OutOfRange => ErrorCode::PayloadTooLarge,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::NotFound => ErrorCode::NotFound,
        Code::Unimplemented => ErrorCode::NotFound,
        Code::AlreadyExists | Code::Aborted => ErrorCode::Conflict,
        Code::ResourceExhausted => ErrorCode::RateLimited,
        Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled => ErrorCode::RequestTimeout,
        _ => ErrorCode::Internal,
    }
}

fn json_object_to_struct(map: &Map<String, Json>) -> Struct {
    Struct { fields: map.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
}

fn json_to_value(v: &Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(json_to_value).collect() }),
        Json::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

fn struct_to_json_object(s: &Struct) -> Map<String, Json> {
    s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()
}

fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Integral numbers come back as integers so `{"limit": 200}` stays `200`.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Json::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json_object(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_message_and_details() {
        let err = ApiError::new(ErrorCode::PermissionDenied, "role viewer lacks user:manage")
            .with_detail("required_permission", "user:manage")
            .with_detail("count", 3);
        let status = err.to_status();
        assert_eq!(status.code(), Code::PermissionDenied);
        let back = ApiError::from_status(&status);
        assert_eq!(back, err);
    }

    #[test]
    fn foreign_status_falls_back_on_grpc_code() {
        let status = tonic::Status::out_of_range("decoded message length too large");
        let err = ApiError::from_status(&status);
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
        assert_eq!(err.message, "decoded message length too large");
    }

    #[test]
    fn every_code_is_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{name}");
            assert_eq!(ErrorCode::from_name(name), Some(*code));
        }
    }

    #[test]
    fn json_shape_always_has_details() {
        let j = ApiError::new(ErrorCode::NotFound, "no such thing").to_json();
        assert_eq!(j, serde_json::json!({"error":{"code":"not_found","message":"no such thing","details":{}}}));
    }

    fn decoded_details(status: &tonic::Status) -> Vec<Any> {
        rpc::Status::decode(status.details()).expect("google.rpc.Status").details
    }

    #[test]
    fn validation_errors_carry_bad_request() {
        let err = ApiError::invalid_field("spec.memory_mib", "must be at least 64");
        assert_eq!(
            err.details["field_violations"],
            serde_json::json!([{"field":"spec.memory_mib","description":"must be at least 64"}])
        );
        let status = err.to_status();
        let any = decoded_details(&status).into_iter().find(|a| a.type_url == BAD_REQUEST_TYPE).expect("BadRequest");
        let br = rpc::BadRequest::decode(any.value.as_slice()).unwrap();
        assert_eq!(br.field_violations.len(), 1);
        assert_eq!(br.field_violations[0].field, "spec.memory_mib");
        assert_eq!(br.field_violations[0].description, "must be at least 64");
        assert_eq!(ApiError::from_status(&status), err);
    }

    #[test]
    fn rate_limits_carry_retry_info() {
        let err = ApiError::rate_limited("slow down", 7);
        let status = err.to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let any = decoded_details(&status).into_iter().find(|a| a.type_url == RETRY_INFO_TYPE).expect("RetryInfo");
        let ri = rpc::RetryInfo::decode(any.value.as_slice()).unwrap();
        assert_eq!(ri.retry_delay.unwrap().seconds, 7);
        assert_eq!(ApiError::from_status(&status).retry_after_seconds(), Some(7));
    }

    #[test]
    fn not_found_names_kind_and_name() {
        let err = ApiError::not_found("node", "worker-1");
        assert_eq!(err.message, "node \"worker-1\" not found");
        assert_eq!(err.details["kind"], "node");
        assert_eq!(err.details["name"], "worker-1");
    }
}
