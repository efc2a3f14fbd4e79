//! The gRPC service `otherix.agent.v1.VmRuntimeService` over the runtime.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use otherix_errors::ApiError;
use otherix_proto::google::rpc;
use otherix_proto::otherix::agent::v1::vm_runtime_service_server::VmRuntimeService;
use otherix_proto::otherix::agent::v1::{
    ConsoleRequest, ConsoleResponse, CreateVmRequest, DeleteVmRequest, GetTaskRequest, GetVmRequest, ListPoolsRequest,
    ListPoolsResponse, ListVmsRequest, ListVmsResponse, PauseVmRequest, Pool, PoweroffVmRequest, ReadLogRequest,
    ReadLogResponse, RebootVmRequest, ResetVmRequest, ResumeVmRequest, ScanPoolRequest, StartVmRequest, StopVmRequest,
    Task, TaskState, Vm, console_request,
};
use otherix_vm_runtime::{AgentError, Runtime};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, instrument};

/// Turns a runtime error into a gRPC status through the shared error table
/// (`otherix-errors`): the code as `google.rpc.ErrorInfo.reason`, the gRPC code the table
/// gives it, the message with its causes, and the error's structured details.
pub fn status(e: &AgentError) -> Status {
    let mut err = ApiError::new(e.error_code(), e.message());
    for (k, v) in e.details() {
        err = err.with_detail(&k, v);
    }
    err.to_status()
}

/// The documented error code in a status made by [`status`], if it carries one.
pub fn error_code(s: &Status) -> Option<String> {
    let st = rpc::Status::decode(s.details()).ok()?;
    st.details
        .iter()
        .find(|a| a.type_url.ends_with("/google.rpc.ErrorInfo"))
        .and_then(|a| rpc::ErrorInfo::decode(a.value.as_slice()).ok())
        .map(|i| i.reason)
}

fn ok<T>(r: Result<T, AgentError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| status(&e))
}

/// The agent's VM API.
#[derive(Debug, Clone)]
pub struct AgentService {
    rt: Runtime,
    changed: Option<Arc<Notify>>,
}

impl AgentService {
    /// A service over `rt`.
    pub fn new(rt: Runtime) -> AgentService {
        AgentService { rt, changed: None }
    }

    /// Notifies `changed` (the heartbeat's trigger) whenever a mutating task finishes, so
    /// the control plane hears about freed or taken CPUs and new cached images at once.
    pub fn with_change_notify(mut self, changed: Arc<Notify>) -> AgentService {
        self.changed = Some(changed);
        self
    }

    /// Answers a mutating RPC, and notifies once its task is done.
    fn task(&self, r: Result<Task, AgentError>) -> Result<Response<Task>, Status> {
        if let (Some(n), Ok(t)) = (&self.changed, &r) {
            let (rt, n, id) = (self.rt.clone(), n.clone(), t.task_id.clone());
            tokio::spawn(async move {
                // get_task waits at most its own cap per call: ask again while it runs.
                while let Ok(t) = rt.get_task(&id, Duration::from_secs(600)).await {
                    if t.state != TaskState::Running as i32 {
                        break;
                    }
                }
                n.notify_one();
            });
        }
        ok(r)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl VmRuntimeService for AgentService {
    #[instrument(name = "rpc.CreateVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn create_vm(&self, req: Request<CreateVmRequest>) -> Result<Response<Task>, Status> {
        self.task(self.rt.create_vm(req.into_inner()).await)
    }

    #[instrument(name = "rpc.GetVm", skip_all, fields(vm_id = %req.get_ref().vm_id))]
    async fn get_vm(&self, req: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        ok(self.rt.get_vm(&req.get_ref().vm_id).await)
    }

    #[instrument(name = "rpc.ListVms", skip_all)]
    async fn list_vms(&self, _req: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        Ok(Response::new(ListVmsResponse { vms: self.rt.list_vms().await }))
    }

    #[instrument(name = "rpc.DeleteVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn delete_vm(&self, req: Request<DeleteVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.delete_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.StartVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn start_vm(&self, req: Request<StartVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.start_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.StopVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn stop_vm(&self, req: Request<StopVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.stop_vm(&r.task_id, &r.vm_id, r.timeout_seconds).await)
    }

    #[instrument(name = "rpc.PoweroffVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn poweroff_vm(&self, req: Request<PoweroffVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.poweroff_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.RebootVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn reboot_vm(&self, req: Request<RebootVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.reboot_vm(&r.task_id, &r.vm_id, r.timeout_seconds).await)
    }

    #[instrument(name = "rpc.PauseVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn pause_vm(&self, req: Request<PauseVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.pause_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.ResumeVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn resume_vm(&self, req: Request<ResumeVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.resume_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.ResetVm", skip_all, fields(task_id = %req.get_ref().task_id, vm_id = %req.get_ref().vm_id))]
    async fn reset_vm(&self, req: Request<ResetVmRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        self.task(self.rt.reset_vm(&r.task_id, &r.vm_id).await)
    }

    #[instrument(name = "rpc.ListPools", skip_all)]
    async fn list_pools(&self, _req: Request<ListPoolsRequest>) -> Result<Response<ListPoolsResponse>, Status> {
        Ok(Response::new(ListPoolsResponse { pools: self.rt.list_pools().await }))
    }

    #[instrument(name = "rpc.ScanPool", skip_all, fields(pool = %req.get_ref().name))]
    async fn scan_pool(&self, req: Request<ScanPoolRequest>) -> Result<Response<Pool>, Status> {
        ok(self.rt.scan_pool(&req.get_ref().name).await)
    }

    type ConsoleStream = BoxStream<ConsoleResponse>;

    #[instrument(name = "rpc.Console", skip_all)]
    async fn console(&self, req: Request<Streaming<ConsoleRequest>>) -> Result<Response<Self::ConsoleStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty console stream"))?;
        let Some(console_request::Kind::Open(open)) = first.kind else {
            return Err(status(&AgentError::Validation("the first console message must be open".into())));
        };
        let mut session = self.rt.open_console(&open.vm_id).map_err(|e| status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        let span = info_span!("console.session", vm_id = %open.vm_id);
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        out = session.recv() => match out {
                            Some(b) => {
                                if tx.send(Ok(ConsoleResponse { output: b.to_vec() })).await.is_err() {
                                    break;
                                }
                            }
                            None => break,
                        },
                        msg = inbound.message() => match msg {
                            Ok(Some(ConsoleRequest { kind: Some(console_request::Kind::Input(b)) })) => {
                                if let Err(e) = session.write(&b).await {
                                    let _ = tx.send(Err(status(&e))).await;
                                    break;
                                }
                            }
                            Ok(Some(_)) => {
                                let e = AgentError::Validation("only input may follow open".into());
                                let _ = tx.send(Err(status(&e))).await;
                                break;
                            }
                            Ok(None) | Err(_) => break,
                        },
                    }
                }
                debug!("console session closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadLogStream = BoxStream<ReadLogResponse>;

    #[instrument(name = "rpc.ReadLog", skip_all, fields(vm_id = %req.get_ref().vm_id, follow = req.get_ref().follow))]
    async fn read_log(&self, req: Request<ReadLogRequest>) -> Result<Response<Self::ReadLogStream>, Status> {
        let r = req.into_inner();
        let mut reader = self.rt.read_log(&r.vm_id, r.tail_bytes, r.follow).map_err(|e| status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some((data, dropped)) = reader.next().await {
                let msg = ReadLogResponse { data: data.to_vec(), dropped_bytes: dropped };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(name = "rpc.GetTask", skip_all, fields(task_id = %req.get_ref().task_id))]
    async fn get_task(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let r = req.get_ref();
        ok(self.rt.get_task(&r.task_id, Duration::from_millis(u64::from(r.wait_ms))).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otherix_errors::ErrorCode;

    #[test]
    fn status_carries_the_code() {
        let s = status(&AgentError::ConsoleInUse("v".into()));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(error_code(&s).as_deref(), Some("console_in_use"));
        assert_eq!(ApiError::from_status(&s).code, ErrorCode::ConsoleInUse);
        assert_eq!(error_code(&Status::internal("x")), None);
    }

    #[test]
    fn status_carries_cause_and_details() {
        let e = AgentError::InsufficientResources { resource: "memory", requested: 512, available: 100, unit: "MiB" };
        let s = status(&e);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let api = ApiError::from_status(&s);
        assert_eq!(api.code, ErrorCode::InsufficientResources);
        assert_eq!(api.details["resource"], "memory");
        assert_eq!(api.details["available"], 100.0);
        let e = AgentError::download(
            "http://169.254.169.254/x: address 169.254.169.254 is metadata",
            otherix_vm_runtime::refusal::ADDRESS_NOT_ALLOWED,
            None,
        );
        let api = ApiError::from_status(&status(&e));
        assert_eq!(api.code, ErrorCode::DownloadFailed);
        assert_eq!(api.details["reason"], "address_not_allowed");
    }
}
