//! Protobuf records in etcd: reads, guarded creates, and compare-and-swap
//! updates on `mod_revision`.
//!
//! Keys are relative to the `/otherix/` prefix. Uniqueness (of names, emails,
//! ...) is kept by guard keys written in the same transaction as the record,
//! so two racing creates cannot both win.

pub mod cache;
pub mod connect;
pub mod keys;
pub mod sealed;

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use prost::Message;
use tokio_util::sync::CancellationToken;

pub use cache::{Cache, Change};
pub use connect::{ConnectConfig, Credentials, Target, TlsMaterial};
pub use sealed::{SealError, Sealer};

/// The prefix under which every Otherix key lives.
pub const PREFIX: &str = "/otherix/";

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or answered with an error.
    #[error("store unavailable")]
    Unavailable(#[source] etcd_client::Error),
    /// The record changed since it was read.
    #[error("{key} was modified concurrently")]
    Conflict {
        /// The record's key.
        key: String,
    },
    /// The record (or one of its guards) exists already.
    #[error("{key} exists already")]
    AlreadyExists {
        /// The key that exists.
        key: String,
    },
    /// A stored value is not the record type it should be.
    #[error("cannot decode {key}")]
    Decode {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// A watch-fed cache lost its watch for longer than its staleness bound
    /// (or could not reach a revision in time): it refuses to serve old data.
    #[error("the cache of {prefix} is not in step with the store")]
    Stale {
        /// The cached prefix.
        prefix: String,
    },
    /// A lease expired or was revoked while it was still needed.
    #[error("lease {lease:x} is gone")]
    LeaseLost {
        /// The lease id.
        lease: i64,
    },
    /// A secret could not be sealed or opened (see [`sealed`]).
    #[error("secret at {key}")]
    Sealed {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: SealError,
    },
    /// A read-modify-write kept conflicting.
    #[error("{key}: gave up after {attempts} conflicting attempts")]
    Contended {
        /// The key.
        key: String,
        /// Attempts made.
        attempts: u32,
    },
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// A record with the revision it was last modified at.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Versioned<M> {
    /// The record.
    pub value: M,
    /// Its etcd `mod_revision`, the token for compare-and-swap.
    pub mod_revision: i64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<M> {
    /// The records, in key order, with their keys.
    pub items: Vec<(String, Versioned<M>)>,
    /// The key to continue after, when more records follow.
    pub next: Option<String>,
    /// How many records the prefix holds in all.
    pub total: i64,
}

/// What a conditional write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must be at this `mod_revision`.
    Revision(i64),
}

/// The store's health as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Active alarms, e.g. `NOSPACE` when the backend quota is exhausted.
    pub alarms: Vec<String>,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Shared: an etcd `Client` holds a channel per service, so cloning it
    /// per request (middleware state is cloned per call) costs more than the
    /// read it serves.
    client: std::sync::Arc<Client>,
    /// Seals secrets at rest; attached with [`Store::with_sealer`].
    sealer: Option<std::sync::Arc<Sealer>>,
    /// The revision of this replica's latest write under each prefix, so its
    /// caches can read its own writes.
    marks: std::sync::Arc<keys::WriteMarks>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn full(key: &str) -> String {
    format!("{PREFIX}{key}")
}

impl Store {
    /// Connects lazily to the given endpoints: requests fail with
    /// [`StoreError::Unavailable`] until etcd answers.
    pub async fn connect(endpoints: &[String], request_timeout: Duration) -> Result<Store, StoreError> {
        Self::connect_with(&ConnectConfig::urls(endpoints, request_timeout)).await
    }

    /// Connects as `config` says: a Unix socket, or URLs with optional TLS and
    /// etcd credentials. Lazy like [`Store::connect`], except that with
    /// credentials etcd-client authenticates at once.
    pub async fn connect_with(config: &ConnectConfig) -> Result<Store, StoreError> {
        let client = connect::client(config).await?;
        Ok(Store { client: std::sync::Arc::new(client), sealer: None, marks: std::sync::Arc::default() })
    }

    /// Reads a record.
    #[tracing::instrument(level = "debug", skip(self), err)]
    pub async fn get<M: Message + Default>(&self, key: &str) -> Result<Option<Versioned<M>>, StoreError> {
        let resp = self.client.kv_client().get(full(key), None).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let value = M::decode(kv.value()).map_err(|source| StoreError::Decode { key: key.to_owned(), source })?;
        Ok(Some(Versioned { value, mod_revision: kv.mod_revision() }))
    }

    /// Reads the raw bytes under a key (guards, index entries).
    pub async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self.client.kv_client().get(full(key), None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Lists the records under a key prefix, in key order.
    pub async fn list<M: Message + Default>(&self, prefix: &str) -> Result<Vec<(String, Versioned<M>)>, StoreError> {
        let resp = self.client.kv_client().get(full(prefix), Some(GetOptions::new().with_prefix())).await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).trim_start_matches(PREFIX).to_owned();
                let value = M::decode(kv.value()).map_err(|source| StoreError::Decode { key: key.clone(), source })?;
                Ok((key, Versioned { value, mod_revision: kv.mod_revision() }))
            })
            .collect()
    }

    /// Writes a record if it is as expected, together with guard keys that
    /// must not exist yet (each holds `guard value`). Returns the new revision.
    #[tracing::instrument(level = "debug", skip(self, value, guards), err)]
    pub async fn put<M: Message>(
        &self,
        key: &str,
        value: &M,
        expect: Expect,
        guards: &[(&str, &str)],
    ) -> Result<i64, StoreError> {
        let mut batch = Batch::new().put(key, value, Some(expect));
        for (g, v) in guards {
            batch = batch.put_raw(g, v.as_bytes().to_vec(), Some(Expect::Absent));
        }
        match self.commit(batch).await {
            Err(StoreError::AlreadyExists { key: k }) if matches!(expect, Expect::Revision(_)) && k == key => {
                Err(StoreError::Conflict { key: k })
            }
            other => other,
        }
    }

    /// Applies a batch atomically: every expectation holds and every write
    /// lands, or nothing does. Returns the new revision.
    pub async fn commit(&self, batch: Batch) -> Result<i64, StoreError> {
        let resp = self.client.kv_client().txn(Txn::new().when(batch.compares).and_then(batch.ops)).await?;
        if resp.succeeded() {
            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            for k in &batch.written {
                self.marks.note(k, rev);
            }
            return Ok(rev);
        }
        // Say which expectation failed: a key that should be absent, first.
        for (k, expect) in &batch.expectations {
            if *expect == Expect::Absent && self.exists(k).await? {
                return Err(StoreError::AlreadyExists { key: k.clone() });
            }
        }
        let first = batch.expectations.first().map(|(k, _)| k.clone()).unwrap_or_default();
        Err(StoreError::Conflict { key: first })
    }

    /// Grants a lease of `ttl`; keys written with it vanish when it expires.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        Ok(self.client.lease_client().grant(secs, None).await?.id())
    }

    /// Deletes a record at a revision, with the guard keys it owned.
    #[tracing::instrument(level = "debug", skip(self, guards), err)]
    pub async fn delete(&self, key: &str, revision: i64, guards: &[&str]) -> Result<(), StoreError> {
        let k = full(key);
        let mut ops = vec![TxnOp::delete(k.clone(), None)];
        ops.extend(guards.iter().map(|g| TxnOp::delete(full(g), None)));
        let txn = Txn::new().when([Compare::mod_revision(k, CompareOp::Equal, revision)]).and_then(ops);
        let resp = self.client.kv_client().txn(txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict { key: key.to_owned() });
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        self.marks.note(key, rev);
        for g in guards {
            self.marks.note(g, rev);
        }
        Ok(())
    }

    /// Read-modify-write with compare-and-swap, retried on conflict: the one
    /// bounded CAS helper. `change` gets the current record (or `None`) and
    /// returns the record to write, or `None` to leave the store as it is.
    /// Returns the record as stored afterwards.
    pub async fn update<M, E, F>(&self, key: &str, mut change: F) -> Result<Option<Versioned<M>>, E>
    where
        M: Message + Default + Clone,
        E: From<StoreError>,
        F: FnMut(Option<&M>) -> Result<Option<M>, E>,
    {
        self.update_versioned(key, |cur| change(cur.map(|v| &v.value))).await
    }

    /// [`Store::update`] whose `change` also sees the record's revision (for
    /// etag checks).
    pub async fn update_versioned<M, E, F>(&self, key: &str, mut change: F) -> Result<Option<Versioned<M>>, E>
    where
        M: Message + Default + Clone,
        E: From<StoreError>,
        F: FnMut(Option<&Versioned<M>>) -> Result<Option<M>, E>,
    {
        const ATTEMPTS: u32 = 16;
        for _ in 0..ATTEMPTS {
            let current = self.get::<M>(key).await?;
            let Some(next) = change(current.as_ref())? else {
                return Ok(current);
            };
            let expect = current.as_ref().map_or(Expect::Absent, |v| Expect::Revision(v.mod_revision));
            match self.put(key, &next, expect, &[]).await {
                Ok(rev) => return Ok(Some(Versioned { value: next, mod_revision: rev })),
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Contended { key: key.to_owned(), attempts: ATTEMPTS }.into())
    }

    /// Starts a watch-fed cache of `prefix` (see [`Cache`]).
    pub fn cache<M: Message + Default + Clone + Send + Sync + 'static>(
        &self,
        prefix: &str,
        index: Option<cache::IndexFn<M>>,
        stale_after: Duration,
        cancel: CancellationToken,
    ) -> Cache<M> {
        Cache::start(Client::clone(&self.client), self.marks.clone(), prefix, index, stale_after, cancel)
    }

    /// The store's current revision (one cheap read).
    pub async fn current_revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(full(keys::CLUSTER_SETTINGS), Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// One page of the records under `prefix`: at most `limit` records after
    /// the key `after` (relative, as returned in [`Page::next`]), and the
    /// total count, read at one revision.
    pub async fn list_page<M: Message + Default>(
        &self,
        prefix: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<M>, StoreError> {
        let start = match after {
            Some(a) => format!("{PREFIX}{a}\0"),
            None => full(prefix),
        };
        let end = prefix_end(&full(prefix));
        let limit_i = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let page =
            GetOptions::new().with_range(end.clone()).with_limit(limit_i).with_sort(SortTarget::Key, SortOrder::Ascend);
        let txn = Txn::new().and_then([
            TxnOp::get(start, Some(page)),
            TxnOp::get(full(prefix), Some(GetOptions::new().with_prefix().with_count_only())),
        ]);
        let resp = self.client.kv_client().txn(txn).await?;
        let mut items = Vec::new();
        let mut total = 0;
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            let etcd_client::TxnOpResponse::Get(g) = r else { continue };
            if i == 0 {
                for kv in g.kvs() {
                    let key = String::from_utf8_lossy(kv.key()).trim_start_matches(PREFIX).to_owned();
                    let value =
                        M::decode(kv.value()).map_err(|source| StoreError::Decode { key: key.clone(), source })?;
                    items.push((key, Versioned { value, mod_revision: kv.mod_revision() }));
                }
            } else {
                total = g.count();
            }
        }
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok(Page { items, next, total })
    }

    /// Revokes a lease: every key written with it is deleted at once.
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.client.lease_client().revoke(lease).await?;
        Ok(())
    }

    /// Keeps a lease alive (a renewal every third of `ttl`) until `cancel`
    /// fires; returns [`StoreError::LeaseLost`] when etcd says it expired.
    /// Renewals go to the etcd leader and are not raft writes.
    pub async fn keep_lease_alive(
        &self,
        lease: i64,
        ttl: Duration,
        cancel: CancellationToken,
    ) -> Result<(), StoreError> {
        let (mut keeper, mut answers) = self.client.lease_client().keep_alive(lease).await?;
        let period = (ttl / 3).max(Duration::from_millis(200));
        loop {
            keeper.keep_alive().await?;
            match answers.message().await? {
                Some(a) if a.ttl() > 0 => {}
                _ => return Err(StoreError::LeaseLost { lease }),
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// Claims `key` for the holder of `lease`: writes `value` only when the
    /// key is absent (create-if-absent), so exactly one of racing claimants
    /// wins; the claim vanishes with the lease. Returns whether this call won.
    pub async fn claim(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool, StoreError> {
        let k = full(key);
        let txn = Txn::new().when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            k,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        Ok(self.client.kv_client().txn(txn).await?.succeeded())
    }

    /// Deletes `key` only while it holds `value` (a claim's owner releasing
    /// it). Returns whether it was deleted.
    pub async fn release(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let k = full(key);
        let txn = Txn::new()
            .when([Compare::value(k.clone(), CompareOp::Equal, value.to_vec())])
            .and_then([TxnOp::delete(k, None)]);
        let resp = self.client.kv_client().txn(txn).await?;
        if resp.succeeded() {
            self.marks.note(key, resp.header().map(|h| h.revision()).unwrap_or_default());
        }
        Ok(resp.succeeded())
    }

    /// Writes `value` under `key` with a lease, unconditionally.
    pub async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, StoreError> {
        let resp = self.client.kv_client().put(full(key), value, Some(PutOptions::new().with_lease(lease))).await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        self.marks.note(key, rev);
        Ok(rev)
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self.client.kv_client().get(full(key), Some(GetOptions::new().with_count_only())).await?;
        Ok(resp.count() > 0)
    }

    /// Asks etcd for its status and alarms.
    pub async fn health(&self) -> Result<Health, StoreError> {
        let mut m = self.client.maintenance_client();
        m.status().await?;
        let alarms = m
            .alarm(etcd_client::AlarmAction::Get, etcd_client::AlarmType::None, None)
            .await?
            .alarms()
            .iter()
            .map(|a| format!("{:?}", a.alarm()).to_uppercase())
            .collect();
        Ok(Health { alarms })
    }
}

/// The end of the key range of a prefix (the prefix with its last byte
/// incremented), as etcd's `--prefix` computes it.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An atomic multi-key write with per-key expectations.
#[derive(Debug, Default)]
pub struct Batch {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    expectations: Vec<(String, Expect)>,
    written: Vec<String>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    fn expect(&mut self, key: &str, expect: Option<Expect>) {
        let Some(e) = expect else { return };
        let k = full(key);
        self.compares.push(match e {
            Expect::Absent => Compare::create_revision(k, CompareOp::Equal, 0),
            Expect::Revision(rev) => Compare::mod_revision(k, CompareOp::Equal, rev),
        });
        self.expectations.push((key.to_owned(), e));
    }

    /// Writes a record.
    pub fn put<M: Message>(self, key: &str, value: &M, expect: Option<Expect>) -> Batch {
        self.put_raw(key, value.encode_to_vec(), expect)
    }

    /// Writes raw bytes (guards, index entries).
    pub fn put_raw(mut self, key: &str, value: Vec<u8>, expect: Option<Expect>) -> Batch {
        self.expect(key, expect);
        self.ops.push(TxnOp::put(full(key), value, None));
        self.written.push(key.to_owned());
        self
    }

    /// Writes raw bytes under a lease.
    pub fn put_leased(mut self, key: &str, value: Vec<u8>, lease: i64, expect: Option<Expect>) -> Batch {
        self.expect(key, expect);
        self.ops.push(TxnOp::put(full(key), value, Some(etcd_client::PutOptions::new().with_lease(lease))));
        self.written.push(key.to_owned());
        self
    }

    /// Deletes a key.
    pub fn delete(mut self, key: &str, expect: Option<Expect>) -> Batch {
        self.expect(key, expect);
        self.ops.push(TxnOp::delete(full(key), None));
        self.written.push(key.to_owned());
        self
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}
