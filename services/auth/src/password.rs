//! Password hashing with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane).
//!
//! Each hash needs a 19 MiB work area. Hashing on a general blocking pool
//! lets a burst of logins run hundreds at once, and the allocator keeps the
//! freed areas: memory grew to gigabytes and never came back. Here hashing
//! runs on a [`HashPool`]: one thread per core, each reusing one work area,
//! behind a bounded queue. A full queue refuses at once ([`PoolBusy`]), so
//! memory stays at `threads x 19 MiB` whatever the load, and a thread idle
//! for [`IDLE_RELEASE`] gives its area back to the system.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Shortest accepted password.
pub const MIN_LEN: usize = 12;
/// Longest accepted password.
pub const MAX_LEN: usize = 256;
/// The memory cost in KiB (one argon2 block is 1 KiB).
pub const M_COST: u32 = 19 * 1024;
/// Hashes waiting per pool thread before further requests are refused.
pub const QUEUE_PER_THREAD: usize = 8;
/// Hashes waiting at least, however few the cores (the queue bounds waiting
/// time, not memory).
pub const MIN_QUEUE: usize = 16;
/// How long a pool thread keeps its work area without a job.
pub const IDLE_RELEASE: Duration = Duration::from_secs(5);
/// The allocation behind a work area, in blocks: above glibc's largest
/// dynamic mmap threshold (32 MiB), so the area is always a mapping of its
/// own and freeing it returns the memory at once, instead of a heap chunk
/// the allocator may keep. Only the 19 MiB used are ever touched; the rest
/// is address space, not memory.
const AREA_CAPACITY_BLOCKS: usize = 33 * 1024;

/// Password hashing failed (only on broken randomness or parameters).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// The hashing pool is full: every thread busy and the queue at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks at once")]
pub struct PoolBusy {
    /// A fair guess of when a retry finds room.
    pub retry_after: Duration,
}

fn params() -> Params {
    Params::new(M_COST, 2, 1, None).unwrap_or_default()
}

fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params())
}

/// Why a new password is refused.
pub fn check_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_LEN {
        return Err(format!("a password needs at least {MIN_LEN} characters"));
    }
    if n > MAX_LEN {
        return Err(format!("a password has at most {MAX_LEN} characters"));
    }
    Ok(())
}

/// Hashes a password into a PHC string (salt and parameters included),
/// allocating its own work area. Servers use [`HashPool::hash`].
pub fn hash(password: &str) -> Result<String, HashError> {
    hasher().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| HashError(e.to_string()))
}

/// Whether `password` matches the PHC string, allocating its own work area.
/// A malformed hash never matches. Servers use [`HashPool::verify`].
pub fn verify(password: &str, phc: &str) -> bool {
    hasher().verify_password(password.as_bytes(), phc).is_ok()
}

/// A reusable argon2 work area for the standard parameters.
pub struct WorkArea(Vec<Block>);

impl std::fmt::Debug for WorkArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the blocks: they are derived from a password.
        write!(f, "WorkArea({} KiB)", self.0.len())
    }
}

impl Default for WorkArea {
    fn default() -> Self {
        let used = params().block_count();
        let mut blocks = Vec::with_capacity(AREA_CAPACITY_BLOCKS.max(used));
        blocks.resize(used, Block::new());
        WorkArea(blocks)
    }
}

impl WorkArea {
    /// Hashes a password into a PHC string in this work area.
    pub fn hash(&mut self, password: &str) -> Result<String, HashError> {
        let err = |e: &dyn std::fmt::Display| HashError(e.to_string());
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| err(&e))?;
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        hasher()
            .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, &mut self.0[..])
            .map_err(|e| err(&e))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params()).map_err(|e| err(&e))?,
            salt: Some(Salt::new(&salt).map_err(|e| err(&e))?),
            hash: Some(Output::new(&out).map_err(|e| err(&e))?),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches the PHC string. A malformed hash, or one
    /// asking for more memory than the standard parameters, never matches.
    pub fn verify(&mut self, password: &str, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else { return false };
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
        let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(parsed.algorithm.as_str()), Params::try_from(&parsed))
        else {
            return false;
        };
        let version = match parsed.version.map(Version::try_from) {
            None => Version::default(),
            Some(Ok(v)) => v,
            Some(Err(_)) => return false,
        };
        // A stored hash that asks for more memory than this area is refused
        // rather than allocated: a planted record must not size our memory.
        let blocks = params.block_count();
        if blocks > self.0.len() {
            return false;
        }
        let mut out = vec![0u8; expected.len()];
        let ok = Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut self.0[..blocks])
            .is_ok();
        // Output compares in constant time.
        ok && Output::new(&out).is_ok_and(|o| &o == expected)
    }
}

type Job = Box<dyn FnOnce(&mut WorkArea) + Send>;

/// The queue the pool's threads take jobs from.
#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Work areas allocated now, across the threads.
    areas: AtomicUsize,
}

/// A fixed set of hashing threads, each with one reused [`WorkArea`], fed
/// by a bounded queue.
pub struct HashPool {
    queue: Arc<Queue>,
    threads: usize,
    capacity: usize,
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool").field("threads", &self.threads).field("capacity", &self.capacity).finish()
    }
}

impl HashPool {
    /// A pool of `threads` threads (at least one), `queue` waiting jobs, and
    /// threads that free their work area after `idle` without a job.
    pub fn new(threads: usize, queue: usize, idle: Duration) -> std::io::Result<HashPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Queue::default());
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new().name(format!("otherix-argon2-{i}")).spawn(move || worker(&shared, idle))?;
        }
        Ok(HashPool { queue: shared, threads, capacity: queue })
    }

    /// The process's pool: one thread per core, [`QUEUE_PER_THREAD`] waiting
    /// jobs per thread ([`MIN_QUEUE`] at least). One per process, because
    /// the memory it bounds is.
    pub fn global() -> &'static HashPool {
        static POOL: OnceLock<HashPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            // Thread creation failing at start-up leaves no way to check a
            // password at all.
            HashPool::new(cores, (cores * QUEUE_PER_THREAD).max(MIN_QUEUE), IDLE_RELEASE)
                .expect("cannot start the password hashing threads")
        })
    }

    /// How many hashes run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How many work areas are allocated now (each 19 MiB).
    pub fn work_areas(&self) -> usize {
        self.queue.areas.load(Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut WorkArea) -> T + Send + 'static) -> Result<T, PoolBusy> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |area| {
            let _ = done.send(f(area));
        });
        let busy = PoolBusy { retry_after: Duration::from_secs(1) };
        {
            let mut jobs = self.queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if jobs.len() >= self.capacity {
                return Err(busy);
            }
            jobs.push_back(job);
        }
        self.queue.ready.notify_one();
        result.await.map_err(|_| busy)
    }

    /// Hashes a password on the pool.
    pub async fn hash(&self, password: String) -> Result<Result<String, HashError>, PoolBusy> {
        self.run(move |area| area.hash(&password)).await
    }

    /// Verifies a password on the pool; with no hash (an unknown user) it
    /// spends the time of a verification and fails, so timing does not tell
    /// an unknown user from a wrong password.
    pub async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, PoolBusy> {
        self.run(move |area| match phc {
            Some(h) => area.verify(&password, &h),
            None => {
                static DUMMY: OnceLock<String> = OnceLock::new();
                let dummy = DUMMY.get_or_init(|| area.hash("otherix-timing-equaliser").unwrap_or_default());
                let _ = area.verify(&password, dummy);
                false
            }
        })
        .await
    }
}

fn worker(queue: &Queue, idle: Duration) {
    // Allocated on the first job, reused while jobs keep coming, freed after
    // `idle` without one.
    let mut area: Option<WorkArea> = None;
    loop {
        let job = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = jobs.pop_front() {
                    break job;
                }
                let (guard, waited) = queue.ready.wait_timeout(jobs, idle).unwrap_or_else(PoisonError::into_inner);
                jobs = guard;
                if waited.timed_out() && jobs.is_empty() && area.take().is_some() {
                    queue.areas.fetch_sub(1, Ordering::Relaxed);
                }
            }
        };
        let area = area.get_or_insert_with(|| {
            queue.areas.fetch_add(1, Ordering::Relaxed);
            WorkArea::default()
        });
        // A panicking job must not take the thread (and its place in the
        // pool) with it; its caller sees the dropped channel as busy.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(area)));
    }
}

/// Spends the time of one verification, so an unknown user cannot be told
/// from a wrong password by timing.
pub fn verify_dummy(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = DUMMY.get_or_init(|| hash("otherix-timing-equaliser").unwrap_or_default());
    let _ = verify(password, phc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("correct-horse-battery-staple").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct-horse-battery-staple", &h));
        assert!(!verify("correct-horse-battery-stapl", &h));
        assert!(!verify("x", "not a hash"));
        assert_ne!(hash("same-password-twice").unwrap(), hash("same-password-twice").unwrap());
    }

    #[test]
    fn a_work_area_hashes_what_the_library_verifies_and_back() {
        let mut area = WorkArea::default();
        let mine = area.hash("correct-horse-battery-staple").unwrap();
        assert!(mine.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{mine}");
        assert!(verify("correct-horse-battery-staple", &mine));
        let theirs = hash("correct-horse-battery-staple").unwrap();
        assert!(area.verify("correct-horse-battery-staple", &theirs));
        assert!(!area.verify("correct-horse-battery-stapl", &theirs));
        assert!(!area.verify("x", "not a hash"));
        // A hash asking for more memory than the area holds is refused, not allocated.
        let big = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(M_COST * 2, 1, 1, None).unwrap())
            .hash_password(b"correct-horse-battery-staple")
            .unwrap()
            .to_string();
        assert!(!area.verify("correct-horse-battery-staple", &big));
        assert!(!format!("{area:?}").contains('['));
    }

    #[tokio::test]
    async fn the_pool_refuses_beyond_its_queue() {
        let pool = Arc::new(HashPool::new(1, 2, Duration::from_millis(200)).unwrap());
        let h = pool.hash("correct-horse-battery-staple".into()).await.unwrap().unwrap();
        assert!(pool.verify("correct-horse-battery-staple".into(), Some(h.clone())).await.unwrap());
        assert!(!pool.verify("wrong".into(), Some(h.clone())).await.unwrap());
        assert!(!pool.verify("wrong".into(), None).await.unwrap());
        // One running, two queued: the rest are refused at once.
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let (pool, h) = (pool.clone(), h.clone());
                tokio::spawn(async move { pool.verify("wrong".into(), Some(h)).await })
            })
            .collect();
        let mut busy = 0;
        for c in calls {
            if c.await.unwrap().is_err() {
                busy += 1;
            }
        }
        assert!(busy >= 8, "{busy} of 12 refused");
        // The work area is kept while busy and freed once idle.
        assert_eq!(pool.work_areas(), 1);
        let start = std::time::Instant::now();
        while pool.work_areas() > 0 && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(pool.work_areas(), 0, "the idle thread kept its work area");
        // And comes back for the next job.
        assert!(pool.verify("correct-horse-battery-staple".into(), Some(h)).await.unwrap());
    }

    #[test]
    fn policy() {
        assert!(check_policy("short").is_err());
        assert!(check_policy(&"a".repeat(257)).is_err());
        assert!(check_policy("twelve-chars").is_ok());
    }
}
