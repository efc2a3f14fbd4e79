//! A typed, watch-fed cache of one key prefix, in the manner of the
//! Kubernetes apiserver's watch cache: list the prefix at a revision, then
//! watch from the next revision; after a broken stream, or when etcd has
//! compacted past the cache, list again and resume.
//!
//! Reads are served from memory. The read barrier: [`Cache::wait_for`]
//! returns once the cache reflects a revision (a replica that made a write
//! waits for the write's revision before it answers, so it reads its own
//! writes), and [`Cache::sync`] waits for the store's current revision.
//! A cache whose watch has been broken longer than its staleness bound
//! refuses reads ([`StoreError::Stale`]) rather than serve old data.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{PREFIX, StoreError, Versioned};

/// How long a read may wait for the cache to reach a revision.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// A change the cache applied, for subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The record under this key was written.
    Put(String),
    /// The record under this key was deleted.
    Delete(String),
    /// The cache was listed afresh (after start-up, a broken stream or a
    /// compaction): anything may have changed.
    Resync,
}

/// A secondary index: a record's index value, if it has one.
pub type IndexFn<M> = fn(&M) -> Option<String>;

struct State<M> {
    items: BTreeMap<String, Versioned<M>>,
    index: HashMap<String, String>,
    /// When the watch broke; `None` while it runs.
    broken_since: Option<Instant>,
    /// Whether the first list has completed.
    listed: bool,
}

struct Inner<M> {
    prefix: String,
    state: RwLock<State<M>>,
    index_fn: Option<IndexFn<M>>,
    revision: watch::Sender<i64>,
    changes: broadcast::Sender<Change>,
    progress: mpsc::Sender<()>,
    stale_after: Duration,
    relists: std::sync::atomic::AtomicU64,
    /// This replica's latest write under the prefix's top-level segment.
    written: Arc<std::sync::atomic::AtomicI64>,
    /// The last store revision a [`Cache::sync`] read, and when.
    last_sync: tokio::sync::Mutex<Option<(Instant, i64)>>,
    client: Client,
}

/// A watch-fed cache of the records under a prefix; cheap to clone.
pub struct Cache<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for Cache<M> {
    fn clone(&self) -> Self {
        Cache { inner: self.inner.clone() }
    }
}

impl<M> std::fmt::Debug for Cache<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("prefix", &self.inner.prefix)
            .field("revision", &*self.inner.revision.borrow())
            .finish()
    }
}

fn read<M>(lock: &RwLock<State<M>>) -> std::sync::RwLockReadGuard<'_, State<M>> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<M>(lock: &RwLock<State<M>>) -> std::sync::RwLockWriteGuard<'_, State<M>> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<M: Message + Default + Clone + Send + Sync + 'static> Cache<M> {
    /// Starts caching `prefix` (relative to `/otherix/`); the task runs until
    /// `cancel` fires. Reads wait (up to a bound) for the first list.
    pub fn start(
        client: Client,
        marks: Arc<crate::keys::WriteMarks>,
        prefix: &str,
        index_fn: Option<IndexFn<M>>,
        stale_after: Duration,
        cancel: CancellationToken,
    ) -> Cache<M> {
        let (progress_tx, progress_rx) = mpsc::channel(1);
        let inner = Arc::new(Inner {
            prefix: prefix.to_owned(),
            state: RwLock::new(State {
                items: BTreeMap::new(),
                index: HashMap::new(),
                broken_since: Some(Instant::now()),
                listed: false,
            }),
            index_fn,
            revision: watch::channel(0).0,
            changes: broadcast::channel(1024).0,
            progress: progress_tx,
            stale_after,
            relists: std::sync::atomic::AtomicU64::new(0),
            written: marks.watch(prefix),
            last_sync: tokio::sync::Mutex::new(None),
            client: client.clone(),
        });
        let task = inner.clone();
        let span = tracing::info_span!("cache", prefix = %prefix);
        tokio::spawn(tracing::Instrument::instrument(run(task, client, progress_rx, cancel), span));
        Cache { inner }
    }

    /// The prefix this cache holds.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The store revision the cache reflects.
    pub fn revision(&self) -> i64 {
        *self.inner.revision.borrow()
    }

    /// Changes as they are applied (a slow subscriber sees `Lagged` and
    /// should treat it as a [`Change::Resync`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    fn fresh(&self) -> Result<(), StoreError> {
        let st = read(&self.inner.state);
        match st.broken_since {
            Some(since) if !st.listed || since.elapsed() > self.inner.stale_after => {
                Err(StoreError::Stale { prefix: self.inner.prefix.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Waits until the cache reflects `revision` (a write this replica made,
    /// or the store revision a caller read).
    pub async fn wait_for(&self, revision: i64) -> Result<(), StoreError> {
        let mut rx = self.inner.revision.subscribe();
        if *rx.borrow() >= revision {
            return self.fresh();
        }
        let deadline = tokio::time::Instant::now() + BARRIER_TIMEOUT;
        loop {
            // The write may be outside this prefix: a progress notification
            // moves the revision forward without an event.
            let _ = self.inner.progress.try_send(());
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Stale { prefix: self.inner.prefix.clone() });
                    }
                }
                () = tick => {}
            }
            if *rx.borrow() >= revision {
                return self.fresh();
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Stale { prefix: self.inner.prefix.clone() });
            }
        }
    }

    /// Waits until the cache reflects every write this replica made under
    /// its prefix (cheap when it already does: one atomic load).
    pub async fn caught_up(&self) -> Result<(), StoreError> {
        let mark = self.inner.written.load(std::sync::atomic::Ordering::Acquire);
        if self.revision() >= mark {
            return self.fresh();
        }
        self.wait_for(mark).await
    }

    /// Waits until the cache reflects the store's current revision: a read
    /// after this sees every write any replica completed before the call.
    /// Concurrent callers share one revision read (at most one per 50 ms),
    /// so misses cannot turn into a flood of etcd reads.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let rev = {
            // Held across the read on purpose: callers queue behind one read
            // and reuse its answer.
            let mut last = self.inner.last_sync.lock().await;
            match *last {
                Some((at, rev)) if at.elapsed() < Duration::from_millis(50) => rev,
                _ => {
                    let resp = self
                        .inner
                        .client
                        .kv_client()
                        .get(format!("{PREFIX}{}", self.inner.prefix), Some(GetOptions::new().with_count_only()))
                        .await?;
                    let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                    *last = Some((Instant::now(), rev));
                    rev
                }
            }
        };
        self.wait_for(rev).await
    }

    /// A record by key after this replica's own writes are in; a miss is
    /// checked once against the store's current revision (a record written a
    /// moment ago through another replica). Misses share [`Cache::sync`]'s
    /// coalesced revision read.
    pub async fn lookup(&self, key: &str) -> Result<Option<Versioned<M>>, StoreError> {
        self.caught_up().await?;
        if let Some(v) = self.get(key)? {
            return Ok(Some(v));
        }
        self.sync().await?;
        self.get(key)
    }

    /// [`Cache::lookup`] by the secondary index.
    pub async fn lookup_by_index(&self, value: &str) -> Result<Option<Versioned<M>>, StoreError> {
        self.caught_up().await?;
        if let Some(v) = self.get_by_index(value)? {
            return Ok(Some(v));
        }
        self.sync().await?;
        self.get_by_index(value)
    }

    /// Waits until the cache has listed once (start-up).
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.wait_for(1).await
    }

    /// A record by key (relative to `/otherix/`).
    pub fn get(&self, key: &str) -> Result<Option<Versioned<M>>, StoreError> {
        self.fresh()?;
        Ok(read(&self.inner.state).items.get(key).cloned())
    }

    /// A record by its secondary index value.
    pub fn get_by_index(&self, value: &str) -> Result<Option<Versioned<M>>, StoreError> {
        self.fresh()?;
        let st = read(&self.inner.state);
        Ok(st.index.get(value).and_then(|k| st.items.get(k)).cloned())
    }

    /// The records under `prefix` (which must lie within the cache's), in
    /// key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned<M>)>, StoreError> {
        self.fresh()?;
        let st = read(&self.inner.state);
        Ok(st
            .items
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// One page of the records under `prefix`: at most `limit` after the key
    /// `after`, the key to continue from, and the total count.
    pub fn page(&self, prefix: &str, limit: usize, after: Option<&str>) -> Result<crate::Page<M>, StoreError> {
        self.fresh()?;
        let st = read(&self.inner.state);
        let all = st.items.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix));
        let total = all.clone().count();
        let mut items: Vec<(String, Versioned<M>)> = all
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit.saturating_add(1))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok(crate::Page { items, next, total: i64::try_from(total).unwrap_or(i64::MAX) })
    }

    /// How many times the cache listed its prefix (1 after start-up; more
    /// after compactions or failed lists).
    pub fn relists(&self) -> u64 {
        self.inner.relists.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many records the cache holds.
    pub fn len(&self) -> usize {
        read(&self.inner.state).items.len()
    }

    /// Whether the cache holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn relative(key: &[u8]) -> String {
    String::from_utf8_lossy(key).trim_start_matches(PREFIX).to_owned()
}

fn decode<M: Message + Default>(key: &str, value: &[u8], mod_revision: i64) -> Option<Versioned<M>> {
    match M::decode(value) {
        Ok(value) => Some(Versioned { value, mod_revision }),
        Err(e) => {
            // A record this build cannot read is left out rather than served wrong.
            tracing::error!(key, error = %e, "cannot decode a cached record; leaving it out");
            None
        }
    }
}

impl<M: Message + Default + Clone> Inner<M> {
    fn set_revision(&self, rev: i64) {
        self.revision.send_if_modified(|cur| {
            let moved = rev > *cur;
            if moved {
                *cur = rev;
            }
            moved
        });
    }

    fn replace(&self, items: BTreeMap<String, Versioned<M>>, rev: i64) {
        let index = match self.index_fn {
            Some(f) => items.iter().filter_map(|(k, v)| Some((f(&v.value)?, k.clone()))).collect(),
            None => HashMap::new(),
        };
        {
            let mut st = write(&self.state);
            st.items = items;
            st.index = index;
            st.broken_since = None;
            st.listed = true;
        }
        self.set_revision(rev);
        let _ = self.changes.send(Change::Resync);
    }

    fn apply(&self, events: &[etcd_client::Event], rev: i64) {
        let mut changes = Vec::with_capacity(events.len());
        {
            let mut st = write(&self.state);
            for ev in events {
                let Some(kv) = ev.kv() else { continue };
                let key = relative(kv.key());
                if let Some(old) = st.items.remove(&key)
                    && let Some(v) = self.index_fn.and_then(|f| f(&old.value))
                {
                    st.index.remove(&v);
                }
                match ev.event_type() {
                    EventType::Put => {
                        if let Some(v) = decode::<M>(&key, kv.value(), kv.mod_revision()) {
                            if let Some(iv) = self.index_fn.and_then(|f| f(&v.value)) {
                                st.index.insert(iv, key.clone());
                            }
                            st.items.insert(key.clone(), v);
                        }
                        changes.push(Change::Put(key));
                    }
                    EventType::Delete => changes.push(Change::Delete(key)),
                }
            }
        }
        self.set_revision(rev);
        for c in changes {
            let _ = self.changes.send(c);
        }
    }

    fn mark_healthy(&self) {
        write(&self.state).broken_since = None;
    }

    fn mark_broken(&self) {
        let mut st = write(&self.state);
        if st.broken_since.is_none() {
            st.broken_since = Some(Instant::now());
        }
    }
}

async fn run<M: Message + Default + Clone + Send + Sync + 'static>(
    inner: Arc<Inner<M>>,
    client: Client,
    mut progress: mpsc::Receiver<()>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    // The revision to resume the watch after; `None` means list first.
    let mut resume: Option<i64> = None;
    loop {
        let round = tokio::select! {
            r = list_and_watch(&inner, &client, &mut progress, resume) => r,
            () = cancel.cancelled() => return,
        };
        resume = round;
        inner.mark_broken();
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Lists (unless resuming) and watches until the stream ends; returns the
/// revision to resume after, or `None` when the next round must list again
/// (etcd compacted past the cache, or the list itself failed).
async fn list_and_watch<M: Message + Default + Clone>(
    inner: &Inner<M>,
    client: &Client,
    progress: &mut mpsc::Receiver<()>,
    resume: Option<i64>,
) -> Option<i64> {
    let full = format!("{PREFIX}{}", inner.prefix);
    let mut rev = match resume {
        Some(rev) => rev,
        None => {
            let resp = match client.kv_client().get(full.clone(), Some(GetOptions::new().with_prefix())).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(prefix = %inner.prefix, error = %e, "cache list failed; retrying");
                    return None;
                }
            };
            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            let items = resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let key = relative(kv.key());
                    decode::<M>(&key, kv.value(), kv.mod_revision()).map(|v| (key, v))
                })
                .collect();
            inner.replace(items, rev);
            inner.relists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rev
        }
    };
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1).with_progress_notify();
    let mut stream = match client.watch_client().watch(full, Some(opts)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(prefix = %inner.prefix, error = %e, "cache watch failed; resuming");
            return Some(rev);
        }
    };
    let mut resumed = resume.is_some();
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        tracing::info!(
                            prefix = %inner.prefix,
                            compact_revision = resp.compact_revision(),
                            reason = resp.cancel_reason(),
                            "cache watch cancelled (etcd compacted past it); relisting"
                        );
                        return None;
                    }
                    if resp.created() {
                        if resumed && let Err(e) = stream.request_progress().await {
                            tracing::warn!(prefix = %inner.prefix, error = %e, "cache progress request failed; resuming");
                            return Some(rev);
                        }
                        continue;
                    }
                    if resumed {
                        // The first answer after a resumed watch that is not a
                        // compaction: back in step, nothing missed.
                        inner.mark_healthy();
                        resumed = false;
                    }
                    let at = resp.header().map(|h| h.revision()).unwrap_or_default();
                    inner.apply(resp.events(), at);
                    rev = rev.max(at);
                }
                Ok(None) => {
                    tracing::warn!(prefix = %inner.prefix, "cache watch closed; resuming");
                    return Some(rev);
                }
                Err(e) => {
                    tracing::warn!(prefix = %inner.prefix, error = %e, "cache watch broke; resuming");
                    return Some(rev);
                }
            },
            Some(()) = progress.recv() => {
                if let Err(e) = stream.request_progress().await {
                    tracing::warn!(prefix = %inner.prefix, error = %e, "cache progress request failed; resuming");
                    return Some(rev);
                }
            }
        }
    }
}
