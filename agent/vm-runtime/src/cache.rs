//! The per-pool image cache: images fetched from URLs, keyed by the URL's
//! basename, verified (sha256 pin, declared format against the header),
//! size-limited, with concurrent requests for one image coalesced into one
//! download, and least-recently-used eviction beyond a byte budget.
//!
//! Layout inside a pool: `images/<basename>` (the image), `images/.meta/<basename>.pb`
//! (its record, a `CachedImage`), `images/.partial/` (downloads in progress).
//! Basenames never start with a dot, so they cannot collide with these.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otherix_proto::otherix::agent::v1::{CachedImage, ImageDownload, ImageFormat};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedRwLockReadGuard, RwLock, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::config::ImagesConfig;
use crate::error::refusal;
use crate::fetch::{self, FetchPolicy, PolicyResolver, Refused};
use crate::image::{self, ImageInfo};
use crate::validate::ImageUrl;
use crate::{AgentError, state};

/// What a VM create asks of the cache.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// The validated URL and cache key.
    pub url: ImageUrl,
    /// Optional sha256 pin (lowercase hex).
    pub sha256: Option<String>,
    /// The declared format.
    pub format: ImageFormat,
}

/// A cached image held for reading: it is not replaced or evicted while held.
#[derive(Debug)]
pub struct Lease {
    /// The image file.
    pub path: PathBuf,
    /// Its format and virtual size.
    pub info: ImageInfo,
    _guard: OwnedRwLockReadGuard<()>,
}

type Outcome = Option<Result<(), AgentError>>;

#[derive(Debug)]
struct InFlight {
    url: String,
    /// What the leading request asked for; only identical requests share the result.
    sha256: Option<String>,
    format: ImageFormat,
    progress: watch::Sender<(u64, u64)>,
    done: watch::Sender<Outcome>,
}

/// The image caches of all pools.
#[derive(Debug)]
pub struct ImageCache {
    cfg: ImagesConfig,
    policy: Arc<FetchPolicy>,
    client: reqwest::Client,
    locks: Locks,
    inflight: Arc<Mutex<HashMap<PathBuf, Arc<InFlight>>>>,
}

type Locks = Arc<Mutex<HashMap<PathBuf, Arc<RwLock<()>>>>>;

fn meta_path(images: &Path, name: &str) -> PathBuf {
    images.join(".meta").join(format!("{name}.pb"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ImageCache {
    /// A cache with the given settings.
    pub fn new(cfg: ImagesConfig) -> Result<ImageCache, AgentError> {
        // reqwest is built without a default TLS provider; ring is the one the
        // workspace uses everywhere. An error means one is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(FetchPolicy::new(&cfg)?);
        let allowed = cfg.allowed_schemes.clone();
        let max_redirects = cfg.max_redirects;
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .read_timeout(Duration::from_secs(cfg.read_timeout_secs))
            // A proxy would resolve and connect on the agent's behalf, past the policy.
            .no_proxy()
            // Host names resolve through the policy: the client connects only to vetted addresses.
            .dns_resolver(Arc::new(PolicyResolver::new(policy.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let url = attempt.url().clone();
                let scheme = url.scheme();
                let refused = |what: String, reason| Refused { what, reason };
                if attempt.previous().len() >= max_redirects {
                    attempt.error(refused(format!("more than {max_redirects} redirects"), refusal::TOO_MANY_REDIRECTS))
                } else if !matches!(scheme, "http" | "https") || !allowed.iter().any(|s| s == scheme) {
                    attempt
                        .error(refused(format!("redirect to {url}: scheme not allowed"), refusal::REDIRECT_NOT_ALLOWED))
                } else if scheme == "http" && attempt.previous().iter().any(|u| u.scheme() == "https") {
                    attempt.error(refused(format!("redirect from https to {url}"), refusal::REDIRECT_NOT_ALLOWED))
                } else if let Err(r) = redirect_policy.check_url(&url, refusal::REDIRECT_NOT_ALLOWED) {
                    attempt.error(refused(format!("redirect to {url}: {r}"), refusal::REDIRECT_NOT_ALLOWED))
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| AgentError::internal_from("build the http client", e))?;
        Ok(ImageCache { cfg, policy, client, locks: Arc::default(), inflight: Arc::default() })
    }

    fn entry_lock(&self, path: &Path) -> Arc<RwLock<()>> {
        entry_lock(&self.locks, path)
    }

    /// Returns the image for `req` from the cache of the pool whose image dir
    /// is `images`, downloading it first if needed. `progress(done, total)` is
    /// called while a download runs (also one started by another request).
    pub async fn acquire(
        &self,
        images: &Path,
        req: &ImageRequest,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Lease, AgentError> {
        let path = images.join(&req.url.basename);
        // Each round either finds the image or takes part in one download; more
        // than a few rounds means other requests keep replacing the entry.
        for _ in 0..4 {
            let guard = self.entry_lock(&path).read_owned().await;
            let (p, meta_file, r) = (path.clone(), meta_path(images, &req.url.basename), req.clone());
            let found = state::blocking(move || {
                if let Some(mut meta) = state::load::<CachedImage>(&meta_file)?
                    && entry_usable(&p, &meta, &r)
                {
                    let info = image::inspect_file(&p, r.format)?;
                    meta.last_used_at = Some(state::now());
                    state::save(&meta_file, &meta)?;
                    return Ok(Some(info));
                }
                Ok(None)
            })
            .await?;
            if let Some(info) = found {
                return Ok(Lease { path, info, _guard: guard });
            }
            drop(guard);
            self.download_coalesced(images, req, progress).await?;
        }
        Err(AgentError::internal(format!(
            "image {} kept being replaced in the cache while this request waited",
            req.url.basename
        )))
    }

    async fn download_coalesced(
        &self,
        images: &Path,
        req: &ImageRequest,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(), AgentError> {
        let path = images.join(&req.url.basename);
        let (flight, leader) = {
            let found = {
                let mut map = lock(&self.inflight);
                match map.get(&path) {
                    Some(f) => (f.clone(), false),
                    None => {
                        let f = Arc::new(InFlight {
                            url: req.url.url.to_string(),
                            sha256: req.sha256.clone(),
                            format: req.format,
                            progress: watch::channel((0, 0)).0,
                            done: watch::channel(None).0,
                        });
                        map.insert(path.clone(), f.clone());
                        (f, true)
                    }
                }
            };
            let (flight, leader) = found;
            let same = flight.url == req.url.url.as_str() && flight.sha256 == req.sha256 && flight.format == req.format;
            if !(leader || same) {
                // Another request's download of this name (other URL, pin or
                // format): its verdict is not ours. Wait for it, then look again.
                let mut other = flight.done.subscribe();
                let _ = other.wait_for(Option::is_some).await;
                return Ok(());
            }
            (flight, leader)
        };
        let mut done = flight.done.subscribe();
        let mut prog = flight.progress.subscribe();
        if leader {
            let job = Download {
                client: self.client.clone(),
                policy: self.policy.clone(),
                file_dir: self.cfg.file_dir.clone(),
                max_bytes: self.cfg.max_image_bytes,
                images: images.to_path_buf(),
                req: req.clone(),
                lock: self.entry_lock(&path),
                flight: flight.clone(),
            };
            let budget = self.cfg.cache_max_bytes;
            let span = info_span!("image.download", url = %req.url.url, name = %req.url.basename);
            let locks = self.locks.clone();
            let inflight = self.inflight.clone();
            // A spawned task finishes the download even if the requester goes away.
            tokio::spawn(
                async move {
                    let res = job.run().await;
                    match &res {
                        Ok(()) => info!("image cached"),
                        Err(e) => warn!(error = %e, "image download failed"),
                    }
                    if res.is_ok() {
                        let (images, keep) = (job.images.clone(), job.req.url.basename.clone());
                        let _ = tokio::task::spawn_blocking(move || evict(&images, &keep, budget, &locks)).await;
                    }
                    lock(&inflight).remove(&job.images.join(&job.req.url.basename));
                    flight.done.send_replace(Some(res));
                }
                .instrument(span),
            );
        }
        loop {
            if let Some(res) = done.borrow_and_update().clone() {
                return res;
            }
            tokio::select! {
                r = done.changed() => {
                    if r.is_err() {
                        return Err(AgentError::internal("image download task vanished"));
                    }
                }
                r = prog.changed() => {
                    if r.is_ok() {
                        let (d, t) = *prog.borrow_and_update();
                        progress(d, t);
                    }
                }
            }
        }
    }

    /// The cached images of a pool. Blocking.
    pub fn list(&self, images: &Path) -> Vec<CachedImage> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(images.join(".meta")) else {
            return out;
        };
        for e in entries.flatten() {
            if let Ok(Some(m)) = state::load::<CachedImage>(&e.path())
                && images.join(&m.name).is_file()
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Downloads in progress into a pool.
    pub fn downloads(&self, images: &Path) -> Vec<ImageDownload> {
        let map = lock(&self.inflight);
        let mut out: Vec<_> = map
            .iter()
            .filter(|(p, _)| p.parent() == Some(images))
            .map(|(p, f)| {
                let (done, total) = *f.progress.borrow();
                ImageDownload {
                    name: p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
                    url: f.url.clone(),
                    bytes_done: done,
                    bytes_total: total,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn entry_lock(locks: &Locks, path: &Path) -> Arc<RwLock<()>> {
    lock(locks).entry(path.to_path_buf()).or_default().clone()
}

/// Evicts least recently used images of a pool until the cache fits `budget`,
/// skipping `keep` (just added) and any image held by a lease. Blocking.
fn evict(images: &Path, keep: &str, budget: u64, locks: &Locks) {
    let Ok(entries) = std::fs::read_dir(images.join(".meta")) else {
        return;
    };
    let mut metas: Vec<CachedImage> =
        entries.flatten().filter_map(|e| state::load::<CachedImage>(&e.path()).ok().flatten()).collect();
    let mut total: u64 = metas.iter().map(|m| m.size_bytes).sum();
    metas.sort_by_key(|m| m.last_used_at.map(|t| (t.seconds, t.nanos)).unwrap_or((0, 0)));
    for m in metas {
        if total <= budget {
            break;
        }
        if m.name == keep {
            continue;
        }
        let path = images.join(&m.name);
        let lk = entry_lock(locks, &path);
        let Ok(_w) = lk.try_write() else { continue };
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(meta_path(images, &m.name));
        total = total.saturating_sub(m.size_bytes);
        info!(image = %m.name, "evicted from the image cache");
    }
}

/// One download into a pool's cache.
struct Download {
    client: reqwest::Client,
    policy: Arc<FetchPolicy>,
    file_dir: Option<PathBuf>,
    max_bytes: u64,
    images: PathBuf,
    req: ImageRequest,
    lock: Arc<RwLock<()>>,
    flight: Arc<InFlight>,
}

impl Download {
    async fn run(&self) -> Result<(), AgentError> {
        let partial_dir = self.images.join(".partial");
        let (pd, md) = (partial_dir.clone(), self.images.join(".meta"));
        state::blocking(move || {
            state::private_dir(&pd)?;
            state::private_dir(&md)
        })
        .await?;
        let partial = partial_dir.join(format!("{}.{}", self.req.url.basename, uuid::Uuid::new_v4()));
        let res = self.fetch_to(&partial).await;
        let (sha, size) = match res {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        let checked = match &self.req.sha256 {
            Some(pin) if *pin != sha => {
                Err(AgentError::ChecksumMismatch { expected: pin.clone(), actual: sha.clone() })
            }
            _ => {
                let (p, f) = (partial.clone(), self.req.format);
                state::blocking(move || image::inspect_file(&p, f)).await
            }
        };
        let info = match checked {
            Ok(info) => info,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        let name = &self.req.url.basename;
        let meta = CachedImage {
            name: name.clone(),
            url: self.req.url.url.to_string(),
            sha256: sha,
            size_bytes: size,
            format: info.format as i32,
            virtual_size_bytes: info.virtual_size,
            last_used_at: Some(state::now()),
        };
        // Replace under the write lock: no lease reads the old file meanwhile.
        let _w = self.lock.write().await;
        let dest = self.images.join(name);
        let meta_file = meta_path(&self.images, name);
        state::blocking(move || {
            let res = std::fs::rename(&partial, &dest)
                .map_err(|e| AgentError::io("move image into the cache", e))
                .and_then(|_| state::save(&meta_file, &meta));
            if res.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            res
        })
        .await
    }

    /// Streams the URL into `dest`, hashing as it goes; returns (sha256, size).
    async fn fetch_to(&self, dest: &Path) -> Result<(String, u64), AgentError> {
        let mut file = tokio::fs::File::create(dest).await.map_err(|e| AgentError::io("create partial image", e))?;
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let too_big = || {
            AgentError::download(
                format!("image larger than the limit of {} bytes", self.max_bytes),
                refusal::TOO_LARGE,
                None,
            )
        };
        let url = &self.req.url.url;
        if url.scheme() == "file" {
            let src = url.to_file_path().map_err(|_| AgentError::Validation("file url has no usable path".into()))?;
            let root = self.file_dir.clone();
            let (f, total) = state::blocking(move || fetch::open_local(root.as_deref(), &src)).await?;
            let mut f = tokio::fs::File::from_std(f);
            if total > self.max_bytes {
                return Err(too_big());
            }
            let mut buf = vec![0u8; 1 << 20];
            loop {
                use tokio::io::AsyncReadExt;
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| AgentError::download(format!("read {url}"), refusal::TRANSPORT, Some(Arc::new(e))))?;
                if n == 0 {
                    break;
                }
                done += n as u64;
                if done > self.max_bytes {
                    return Err(too_big());
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(|e| AgentError::io("write partial image", e))?;
                self.flight.progress.send_replace((done, total));
            }
        } else {
            // Address literals never reach the resolver: check them here.
            if let Err(r) = self.policy.check_url(url, refusal::ADDRESS_NOT_ALLOWED) {
                return Err(AgentError::download(format!("{url}: {r}"), r.reason, None));
            }
            let mut resp = self.client.get(url.clone()).send().await.map_err(|e| http_error(url, e))?;
            if !resp.status().is_success() {
                return Err(AgentError::download(
                    format!("{url}: HTTP {}", resp.status()),
                    refusal::BAD_RESPONSE,
                    None,
                ));
            }
            let total = resp.content_length().unwrap_or(0);
            if total > self.max_bytes {
                return Err(too_big());
            }
            while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(url, e))? {
                done += chunk.len() as u64;
                if done > self.max_bytes {
                    return Err(too_big());
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(|e| AgentError::io("write partial image", e))?;
                self.flight.progress.send_replace((done, total));
            }
            if total != 0 && done != total {
                return Err(AgentError::download(
                    format!("{url}: got {done} of {total} bytes"),
                    refusal::BAD_RESPONSE,
                    None,
                ));
            }
        }
        file.sync_all().await.map_err(|e| AgentError::io("sync partial image", e))?;
        Ok((hex(&hasher.finalize()), done))
    }
}

/// A failed HTTP fetch: a policy refusal keeps its reason (and its message
/// alone, without the client's layers); anything else is a transport failure.
fn http_error(url: &url::Url, e: reqwest::Error) -> AgentError {
    if let Some(r) = fetch::find_refusal(&e) {
        return AgentError::download(format!("{url}: {r}"), r.reason, None);
    }
    AgentError::download(url.to_string(), refusal::TRANSPORT, Some(Arc::new(e)))
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether a cache entry serves a request: complete, matching the pin, and
/// from the same URL unless the pin vouches for the content.
fn entry_usable(path: &Path, meta: &CachedImage, req: &ImageRequest) -> bool {
    let size_ok = std::fs::metadata(path).is_ok_and(|m| m.len() == meta.size_bytes);
    let pin_ok = req.sha256.as_ref().is_none_or(|p| *p == meta.sha256);
    let source_ok = meta.url == req.url.url.as_str() || req.sha256.is_some();
    size_ok && pin_ok && source_ok
}
