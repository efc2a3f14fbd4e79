//! One supervisor for every background loop of a daemon. Each loop gets a
//! name (in its logs and span), a cancellation token, and a restart with
//! exponential backoff when it returns an error or panics; shutdown cancels
//! every loop and waits for them up to a bound, then aborts the rest.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use tokio_util::sync::CancellationToken as Cancel;

/// A loop's outcome: `Ok` ends it for good, `Err` restarts it after a backoff.
pub type LoopResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Restart backoff bounds.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Supervises named background loops; cheap to clone.
#[derive(Clone, Debug)]
pub struct Supervisor {
    cancel: CancellationToken,
    tasks: Arc<Mutex<JoinSet<()>>>,
    backoff: Backoff,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    /// A supervisor with the default backoff.
    pub fn new() -> Supervisor {
        Supervisor::with_backoff(Backoff::default())
    }

    /// A supervisor with these backoff bounds.
    pub fn with_backoff(backoff: Backoff) -> Supervisor {
        Supervisor { cancel: CancellationToken::new(), tasks: Arc::new(Mutex::new(JoinSet::new())), backoff }
    }

    /// The token every loop watches; cancelled at shutdown.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs `make(token)` as the loop `name` until it returns `Ok`, the token
    /// is cancelled, or forever: an `Err` or a panic restarts it after a
    /// backoff (reset after a run that lasted longer than the max backoff).
    pub fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = LoopResult> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let backoff = self.backoff;
        let span = tracing::info_span!("loop", name);
        let task = async move {
            let mut delay = backoff.initial;
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                let started = tokio::time::Instant::now();
                // A panic stays inside its own task; the supervisor sees it as
                // an error. The body watches its token and ends by itself on
                // shutdown; if the drain runs out, aborting this task aborts it too.
                let run = tokio::spawn(make(cancel.child_token()).in_current_span());
                let _abort = AbortOnDrop(run.abort_handle());
                let outcome = run.await;
                if cancel.is_cancelled() {
                    return;
                }
                match outcome {
                    Ok(Ok(())) => {
                        tracing::debug!("loop finished");
                        return;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, retry_in = ?delay, "loop failed; restarting"),
                    Err(e) => tracing::error!(error = %e, retry_in = ?delay, "loop panicked; restarting"),
                }
                if started.elapsed() > backoff.max {
                    delay = backoff.initial;
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                delay = (delay * 2).min(backoff.max);
            }
        }
        .instrument(span);
        self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).spawn(task);
    }

    /// Cancels every loop and waits up to `drain` for them to end; the rest
    /// are aborted. Returns how many had to be aborted.
    pub async fn shutdown(&self, drain: Duration) -> usize {
        self.cancel.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let deadline = tokio::time::Instant::now() + drain;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(_) => {}
                Err(_) => {
                    let left = tasks.len();
                    tracing::warn!(left, "background loops did not stop in time; aborting them");
                    tasks.abort_all();
                    return left;
                }
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn restarts_after_errors_and_panics_then_drains() {
        let sup =
            Supervisor::with_backoff(Backoff { initial: Duration::from_millis(5), max: Duration::from_millis(20) });
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("flaky", move |cancel| {
            let r = r.clone();
            async move {
                let n = r.fetch_add(1, Ordering::SeqCst);
                match n {
                    0 => Err("first run fails".into()),
                    1 => panic!("second run panics"),
                    _ => {
                        cancel.cancelled().await;
                        Ok(())
                    }
                }
            }
        });
        for _ in 0..100 {
            if runs.load(Ordering::SeqCst) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(sup.shutdown(Duration::from_secs(1)).await, 0);
    }

    #[tokio::test]
    async fn a_loop_that_ignores_cancellation_is_aborted_after_the_drain() {
        let sup = Supervisor::new();
        let alive = Arc::new(AtomicU32::new(0));
        let a = alive.clone();
        sup.spawn("stubborn", move |_cancel| {
            let a = a.clone();
            async move {
                struct Count(Arc<AtomicU32>);
                impl Drop for Count {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                a.fetch_add(1, Ordering::SeqCst);
                let _c = Count(a);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 1);
        assert_eq!(sup.shutdown(Duration::from_millis(200)).await, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alive.load(Ordering::SeqCst), 0, "the loop body outlived the shutdown");
    }
}
