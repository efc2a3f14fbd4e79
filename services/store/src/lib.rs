//! Protobuf records in etcd: reads, guarded creates, and compare-and-swap
//! updates on `mod_revision`.
//!
//! Keys are relative to the `/otherix/` prefix. Uniqueness (of names, emails,
//! ...) is kept by guard keys written in the same transaction as the record,
//! so two racing creates cannot both win.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use prost::Message;

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
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<M> {
    /// The record.
    pub value: M,
    /// Its etcd `mod_revision`, the token for compare-and-swap.
    pub mod_revision: i64,
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
    client: Client,
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
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts)).await?;
        Ok(Store { client })
    }

    /// Reads a record.
    #[tracing::instrument(level = "debug", skip(self), err)]
    pub async fn get<M: Message + Default>(&self, key: &str) -> Result<Option<Versioned<M>>, StoreError> {
        let resp = self.client.kv_client().get(full(key), None).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let value = M::decode(kv.value()).map_err(|source| StoreError::Decode { key: key.to_owned(), source })?;
        Ok(Some(Versioned { value, mod_revision: kv.mod_revision() }))
    }

    /// Reads several records in one round trip (one etcd transaction, so one
    /// consistent revision). Each entry is `None` when absent.
    pub async fn get_two<A, B>(
        &self,
        a: &str,
        b: &str,
    ) -> Result<(Option<Versioned<A>>, Option<Versioned<B>>), StoreError>
    where
        A: Message + Default,
        B: Message + Default,
    {
        let txn = Txn::new().and_then([TxnOp::get(full(a), None), TxnOp::get(full(b), None)]);
        let resp = self.client.kv_client().txn(txn).await?;
        let mut kvs = resp.op_responses().into_iter().map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        let first = kvs.next().flatten();
        let second = kvs.next().flatten();
        Ok((decode_versioned(a, first)?, decode_versioned(b, second)?))
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
            return Ok(resp.header().map(|h| h.revision()).unwrap_or_default());
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
        if resp.succeeded() { Ok(()) } else { Err(StoreError::Conflict { key: key.to_owned() }) }
    }

    /// Read-modify-write with compare-and-swap, retried on conflict.
    /// `change` gets the current record (or `None`) and returns the record to
    /// write, or `None` to leave the store as it is. Returns the record as
    /// stored afterwards.
    pub async fn update<M, E, F>(&self, key: &str, mut change: F) -> Result<Option<Versioned<M>>, E>
    where
        M: Message + Default + Clone,
        E: From<StoreError>,
        F: FnMut(Option<&M>) -> Result<Option<M>, E>,
    {
        const ATTEMPTS: u32 = 16;
        for _ in 0..ATTEMPTS {
            let current = self.get::<M>(key).await?;
            let Some(next) = change(current.as_ref().map(|v| &v.value))? else {
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

fn decode_versioned<M: Message + Default>(
    key: &str,
    raw: Option<(Vec<u8>, i64)>,
) -> Result<Option<Versioned<M>>, StoreError> {
    raw.map(|(bytes, rev)| {
        M::decode(bytes.as_slice())
            .map(|value| Versioned { value, mod_revision: rev })
            .map_err(|source| StoreError::Decode { key: key.to_owned(), source })
    })
    .transpose()
}

/// An atomic multi-key write with per-key expectations.
#[derive(Debug, Default)]
pub struct Batch {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    expectations: Vec<(String, Expect)>,
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
        self
    }

    /// Writes raw bytes under a lease.
    pub fn put_leased(mut self, key: &str, value: Vec<u8>, lease: i64, expect: Option<Expect>) -> Batch {
        self.expect(key, expect);
        self.ops.push(TxnOp::put(full(key), value, Some(etcd_client::PutOptions::new().with_lease(lease))));
        self
    }

    /// Deletes a key.
    pub fn delete(mut self, key: &str, expect: Option<Expect>) -> Batch {
        self.expect(key, expect);
        self.ops.push(TxnOp::delete(full(key), None));
        self
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}
