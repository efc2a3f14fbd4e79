//! File helpers shared by the Otherix binaries: directories with an exact
//! mode, and atomic writes (temp file, fsync, rename, fsync of the directory)
//! so a crash leaves either the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file operation failed on `path`.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct FileError {
    /// The path the operation was on.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError { path: path.to_path_buf(), source }
}

/// Creates `dir` (and parents) if needed and sets its mode to `mode` (e.g. 0o700).
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(dir))
}

/// Writes `contents` to `path` atomically: a temp file in the same directory created with
/// `mode`, fsync, rename over `path`, fsync of the directory.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| FileError {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd)
        .map_err(|e| FileError { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
    let tmp = dir.join(format!(".{name}.tmp-{}", rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
        // The umask may have narrowed the mode at creation; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_dir(&dir, 0o700).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let p = dir.join("k.pem");
        write_file_atomic(&p, b"one", 0o600).unwrap();
        write_file_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }
}
