//! Secrets at rest: values sealed with ChaCha20-Poly1305 under a key held
//! outside etcd, so a copy of etcd's data (a stolen disk, a snapshot, a
//! backup, a local user reading the member) does not give them away.
//!
//! A sealed value is `OXS1 | key id (8) | nonce (12) | ciphertext | tag (16)`.
//! The key id is derived from the key, so a ring of keys (the current one and
//! earlier ones kept for reading) tells which key opens a value, and a value
//! sealed with an old key is sealed again with the current one. The store key
//! a value belongs to is authenticated with it, so a sealed value cannot be
//! moved under another key.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::Store;

const MAGIC: &[u8; 4] = b"OXS1";
const ID_LEN: usize = 8;
const HEADER: usize = MAGIC.len() + ID_LEN + NONCE_LEN;
/// The length of a key file: 32 random bytes, nothing else.
pub const KEY_LEN: usize = 32;
/// The prefix of a sealed value kept in a text (string) field.
pub const TEXT_PREFIX: &str = "otherix-sealed:";

/// Why a value could not be sealed or opened, or a key not loaded.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or written.
    #[error("key file {path}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not 32 bytes.
    #[error("key file {path} holds {len} bytes, not {KEY_LEN}")]
    KeyLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Other users can read or write the key file.
    #[error("key file {path} is accessible to other users (mode {mode:o}); chmod 600 it")]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The value is not sealed (plaintext where a sealed value belongs).
    #[error("the value is not sealed")]
    NotSealed,
    /// None of the keys has this id.
    #[error("sealed with key {id}, which is not configured (current key {current})")]
    UnknownKey {
        /// The value's key id.
        id: String,
        /// The current key's id.
        current: String,
    },
    /// The key id matched but the value does not authenticate: altered, or
    /// moved from another store key.
    #[error("sealed value fails authentication (altered, or moved from another key)")]
    Corrupt,
    /// No sealer was attached to the store.
    #[error("no secrets-at-rest key is loaded")]
    NoKey,
    /// The system's random source failed.
    #[error("no randomness available")]
    Random,
}

struct SealKey {
    id: [u8; ID_LEN],
    key: LessSafeKey,
}

impl SealKey {
    fn new(raw: &[u8; KEY_LEN]) -> SealKey {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"otherix etcd encryption key id\0".as_slice(), raw].concat(),
        );
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..ID_LEN]);
        // CHACHA20_POLY1305 takes exactly 32 bytes, which KEY_LEN is.
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, raw).expect("a 32-byte ChaCha20 key"));
        SealKey { id, key }
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn aad(id: &[u8], context: &str) -> Vec<u8> {
    [MAGIC.as_slice(), id, context.as_bytes()].concat()
}

/// The current key and earlier ones kept for reading.
pub struct Sealer {
    current: SealKey,
    previous: Vec<SealKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let previous: Vec<String> = self.previous.iter().map(|k| hex(&k.id)).collect();
        f.debug_struct("Sealer").field("current", &self.current_id()).field("previous", &previous).finish()
    }
}

impl Sealer {
    /// A sealer from raw keys.
    pub fn new(current: &[u8; KEY_LEN], previous: &[[u8; KEY_LEN]]) -> Sealer {
        Sealer {
            current: SealKey::new(current),
            previous: previous.iter().map(SealKey::new).collect(),
            rng: SystemRandom::new(),
        }
    }

    /// Loads the current key file and earlier ones; each must be exactly 32
    /// bytes and not accessible to other users.
    pub fn load(current: &Path, previous: &[PathBuf]) -> Result<Sealer, SealError> {
        let cur = read_key(current)?;
        let prev = previous.iter().map(|p| read_key(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(Sealer::new(&cur, &prev))
    }

    /// Writes a new random key to `path` (mode 0600, its directory 0700);
    /// fails if the file exists.
    pub fn create_key_file(path: &Path) -> Result<(), SealError> {
        let err = |source| SealError::KeyFile { path: path.to_owned(), source };
        let mut raw = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut raw).map_err(|_| SealError::Random)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
        f.write_all(&raw).and_then(|()| f.sync_all()).map_err(err)?;
        // hard_link fails when `path` exists: a racing replica's key is never overwritten.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        linked.map_err(err)
    }

    /// The current key's id (16 hex digits).
    pub fn current_id(&self) -> String {
        hex(&self.current.id)
    }

    /// Seals `plaintext`, bound to `context` (the store key it is kept under).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(HEADER + plaintext.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&self.current.id, context)),
                &mut body,
            )
            .map_err(|_| SealError::Corrupt)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a sealed value kept under `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, SealError> {
        let id = sealed_key_id(sealed).ok_or(SealError::NotSealed)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey { id: hex(&id), current: self.current_id() })?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[MAGIC.len() + ID_LEN..HEADER]);
        let mut body = sealed[HEADER..].to_vec();
        let plain = key
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad(&id, context)), &mut body)
            .map_err(|_| SealError::Corrupt)?;
        Ok(plain.to_vec())
    }

    /// Whether `sealed` was sealed with the current key (else it wants resealing).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed_key_id(sealed) == Some(self.current.id)
    }

    /// [`Sealer::seal`] for a text field: `otherix-sealed:<base64>`.
    pub fn seal_text(&self, plaintext: &str, context: &str) -> Result<String, SealError> {
        Ok(format!("{TEXT_PREFIX}{}", STANDARD.encode(self.seal(plaintext.as_bytes(), context)?)))
    }

    /// [`Sealer::open`] for a text field.
    pub fn open_text(&self, sealed: &str, context: &str) -> Result<String, SealError> {
        let raw = text_bytes(sealed).ok_or(SealError::NotSealed)?;
        String::from_utf8(self.open(&raw, context)?).map_err(|_| SealError::Corrupt)
    }
}

/// The key id a sealed value names, or `None` when it is not sealed.
pub fn sealed_key_id(sealed: &[u8]) -> Option<[u8; ID_LEN]> {
    if sealed.len() < HEADER + CHACHA20_POLY1305.tag_len() || !sealed.starts_with(MAGIC) {
        return None;
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&sealed[MAGIC.len()..MAGIC.len() + ID_LEN]);
    Some(id)
}

/// The sealed bytes of a text field, or `None` when it is not sealed.
pub fn text_bytes(sealed: &str) -> Option<Vec<u8>> {
    let raw = STANDARD.decode(sealed.strip_prefix(TEXT_PREFIX)?).ok()?;
    sealed_key_id(&raw).map(|_| raw)
}

/// The key id (hex) of a sealed value, for messages.
pub fn key_id_hex(sealed: &[u8]) -> Option<String> {
    sealed_key_id(sealed).map(|id| hex(&id))
}

fn read_key(path: &Path) -> Result<[u8; KEY_LEN], SealError> {
    let err = |source| SealError::KeyFile { path: path.to_owned(), source };
    let mode = std::fs::metadata(path).map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SealError::KeyMode { path: path.to_owned(), mode: mode & 0o777 });
    }
    let raw = std::fs::read(path).map_err(err)?;
    raw.as_slice().try_into().map_err(|_| SealError::KeyLength { path: path.to_owned(), len: raw.len() })
}

impl Store {
    /// This handle with a sealer for secrets at rest.
    pub fn with_sealer(mut self, sealer: Arc<Sealer>) -> Store {
        self.sealer = Some(sealer);
        self
    }

    /// The sealer, when one is attached.
    pub fn sealer(&self) -> Result<&Sealer, SealError> {
        self.sealer.as_deref().ok_or(SealError::NoKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_the_ways_it_fails() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let s = Sealer::new(&a, &[]);
        let secret = b"-----BEGIN PRIVATE KEY-----\nsecret";
        let sealed = s.seal(secret, "pki/cluster_ca").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"BEGIN PRIV"));
        assert_eq!(s.open(&sealed, "pki/cluster_ca").unwrap(), secret);
        // Two seals of the same value differ (random nonce).
        assert_ne!(sealed, s.seal(secret, "pki/cluster_ca").unwrap());
        // Moved under another key, altered, plaintext, or another key ring.
        assert!(matches!(s.open(&sealed, "auth/signing_keys"), Err(SealError::Corrupt)));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(s.open(&bad, "pki/cluster_ca"), Err(SealError::Corrupt)));
        assert!(matches!(s.open(secret, "pki/cluster_ca"), Err(SealError::NotSealed)));
        let other = Sealer::new(&b, &[]);
        assert!(matches!(other.open(&sealed, "pki/cluster_ca"), Err(SealError::UnknownKey { .. })));
        // Rotation: the new key current, the old one kept for reading.
        let rotated = Sealer::new(&b, &[a]);
        assert_eq!(rotated.open(&sealed, "pki/cluster_ca").unwrap(), secret);
        assert!(!rotated.is_current(&sealed));
        let resealed = rotated.seal(secret, "pki/cluster_ca").unwrap();
        assert!(rotated.is_current(&resealed));
        assert!(matches!(s.open(&resealed, "pki/cluster_ca"), Err(SealError::UnknownKey { .. })));
        // The text form.
        let t = s.seal_text("pem", "c").unwrap();
        assert!(t.starts_with(TEXT_PREFIX));
        assert_eq!(s.open_text(&t, "c").unwrap(), "pem");
        assert!(matches!(s.open_text("-----BEGIN", "c"), Err(SealError::NotSealed)));
        assert!(!format!("{s:?}").contains("[1, 1"));
    }

    #[test]
    fn key_files_are_private_exact_and_never_overwritten() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/etcd-encryption.key");
        Sealer::create_key_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        let first = std::fs::read(&path).unwrap();
        assert_eq!(first.len(), KEY_LEN);
        assert!(Sealer::create_key_file(&path).is_err(), "an existing key was overwritten");
        assert_eq!(std::fs::read(&path).unwrap(), first);
        let s = Sealer::load(&path, &[]).unwrap();
        assert_eq!(s.open(&s.seal(b"x", "k").unwrap(), "k").unwrap(), b"x");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Sealer::load(&path, &[]), Err(SealError::KeyMode { mode: 0o644, .. })));
        let short = dir.path().join("short.key");
        std::fs::write(&short, b"too short").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Sealer::load(&short, &[]), Err(SealError::KeyLength { len: 9, .. })));
        assert!(matches!(Sealer::load(&dir.path().join("none"), &[]), Err(SealError::KeyFile { .. })));
    }
}
