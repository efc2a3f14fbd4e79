//! Disk image header checks: the declared format must match the file, and a
//! qcow2 must not point at other files (a backing file or an external data
//! file could make QEMU read host files into the guest).

use std::io::Read;
use std::path::Path;

use otherix_proto::otherix::agent::v1::ImageFormat;

use crate::AgentError;

/// Bytes of the file's head the checks read (header plus header extensions).
pub const HEAD_BYTES: usize = 64 * 1024;
/// The largest virtual disk accepted (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qcow2 header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// qcow2 header extension: full disk encryption header.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Incompatible feature bits QEMU 7.2 knows: dirty, corrupt, external data
/// file, compression type, extended L2.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_KNOWN: u64 = 0b1_1111;

/// What the header says about an accepted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format, as declared and as found.
    pub format: ImageFormat,
    /// The disk size the image describes.
    pub virtual_size: u64,
}

/// Reads the head of `path` and checks it against the declared format.
pub fn inspect_file(path: &Path, declared: ImageFormat) -> Result<ImageInfo, AgentError> {
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io("open image", e))?;
    let len = f.metadata().map_err(|e| AgentError::io("stat image", e))?.len();
    let mut head = Vec::with_capacity(HEAD_BYTES);
    (&mut f).take(HEAD_BYTES as u64).read_to_end(&mut head).map_err(|e| AgentError::io("read image header", e))?;
    check(declared, &head, len)
}

/// Checks a file's head (`head`, up to [`HEAD_BYTES`]) and length against the
/// declared format. Unspecified means qcow2.
pub fn check(declared: ImageFormat, head: &[u8], file_len: u64) -> Result<ImageInfo, AgentError> {
    match declared {
        ImageFormat::Raw => check_raw(head, file_len),
        ImageFormat::Qcow2 | ImageFormat::Unspecified => check_qcow2(head, file_len),
    }
}

/// Names a format another tool would recognise from its magic, if any.
fn foreign_format(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, QCOW2_MAGIC) {
        Some("qcow2")
    } else if at(0, b"QED\0") {
        Some("qed")
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("vdi")
    } else if at(0, b"vhdxfile") {
        Some("vhdx")
    } else if at(0, b"conectix") {
        Some("vpc")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("luks")
    } else {
        None
    }
}

fn check_raw(head: &[u8], file_len: u64) -> Result<ImageInfo, AgentError> {
    if let Some(other) = foreign_format(head) {
        return Err(AgentError::UnsupportedFormat(format!("declared raw, but the file is a {other} image")));
    }
    if file_len == 0 || !file_len.is_multiple_of(512) {
        return Err(AgentError::UnsupportedFormat(format!(
            "declared raw, but the file's size ({file_len} bytes) is not a whole number of 512-byte sectors"
        )));
    }
    if file_len > MAX_VIRTUAL_SIZE {
        return Err(AgentError::UnsupportedFormat("raw image larger than 64 TiB".into()));
    }
    Ok(ImageInfo { format: ImageFormat::Raw, virtual_size: file_len })
}

fn be32(h: &[u8], off: usize) -> Option<u32> {
    h.get(off..off + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(h: &[u8], off: usize) -> Option<u64> {
    h.get(off..off + 8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_be_bytes(a)
    })
}

fn check_qcow2(h: &[u8], file_len: u64) -> Result<ImageInfo, AgentError> {
    let bad = |m: &str| Err(AgentError::Qcow2HeaderInvalid(m.to_string()));
    if h.get(0..4) != Some(QCOW2_MAGIC) {
        return match foreign_format(h) {
            Some(other) => bad(&format!("declared qcow2, but the file is a {other} image")),
            None => bad("declared qcow2, but the file has no qcow2 magic (not a disk image?)"),
        };
    }
    let short = || AgentError::Qcow2HeaderInvalid("header truncated".into());
    let version = be32(h, 4).ok_or_else(short)?;
    if version != 2 && version != 3 {
        return bad(&format!("qcow2 version {version} is not supported"));
    }
    if be64(h, 8).ok_or_else(short)? != 0 {
        return bad("the image has a backing file; only self-contained images are accepted");
    }
    let cluster_bits = be32(h, 20).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return bad(&format!("cluster_bits {cluster_bits} out of range"));
    }
    let size = be64(h, 24).ok_or_else(short)?;
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return bad(&format!("virtual size {size} out of range"));
    }
    if be32(h, 32).ok_or_else(short)? != 0 {
        return bad("encrypted qcow2 images are not accepted");
    }
    let (ext_start, header_len) = if version == 3 {
        let incompat = be64(h, 72).ok_or_else(short)?;
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return bad("the image uses an external data file; only self-contained images are accepted");
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return bad("the image is marked corrupt");
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return bad(&format!("unknown incompatible features {incompat:#x}"));
        }
        let header_len = be32(h, 100).ok_or_else(short)? as usize;
        if !(104..=h.len()).contains(&header_len) {
            return bad(&format!("header length {header_len} out of range"));
        }
        (header_len, header_len)
    } else {
        (72, 72)
    };
    if file_len < header_len as u64 {
        return bad("file shorter than its header");
    }
    // Header extensions: type, length, data padded to 8 bytes, until type 0.
    let mut off = ext_start;
    loop {
        let Some(kind) = be32(h, off) else {
            return bad("header extensions run past the first 64 KiB");
        };
        if kind == 0 {
            break;
        }
        let len = be32(h, off + 4).ok_or_else(short)? as usize;
        match kind {
            EXT_DATA_FILE => {
                return bad("the image names an external data file; only self-contained images are accepted");
            }
            EXT_CRYPTO => return bad("encrypted qcow2 images are not accepted"),
            _ => {}
        }
        off = off.checked_add(8).and_then(|o| o.checked_add(len.div_ceil(8) * 8)).ok_or_else(short)?;
    }
    Ok(ImageInfo { format: ImageFormat::Qcow2, virtual_size: size })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal qcow2 v3 header of 104 bytes followed by the end extension.
    fn qcow2(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        if version == 3 {
            h[96..100].copy_from_slice(&4u32.to_be_bytes());
            h[100..104].copy_from_slice(&104u32.to_be_bytes());
        }
        h
    }

    fn code(r: Result<ImageInfo, AgentError>) -> &'static str {
        r.expect_err("should be refused").code()
    }

    #[test]
    fn accepts_plain_qcow2_v2_and_v3() {
        for v in [2, 3] {
            let info = check(ImageFormat::Qcow2, &qcow2(v), 1 << 20).unwrap();
            assert_eq!(info.virtual_size, 1 << 30);
            assert_eq!(info.format, ImageFormat::Qcow2);
        }
        assert!(check(ImageFormat::Unspecified, &qcow2(3), 1 << 20).is_ok());
    }

    #[test]
    fn refuses_backing_file() {
        let mut h = qcow2(3);
        h[8..16].copy_from_slice(&200u64.to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
    }

    #[test]
    fn refuses_external_data_file_bit_and_extension() {
        let mut h = qcow2(3);
        h[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
        let mut h = qcow2(3);
        h[104..108].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        h[108..112].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
    }

    #[test]
    fn walks_unknown_extensions() {
        let mut h = qcow2(3);
        h[104..108].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        h[108..112].copy_from_slice(&12u32.to_be_bytes());
        // 12 bytes of data padded to 16, then the end marker (zeros).
        assert!(check(ImageFormat::Qcow2, &h, 1 << 20).is_ok());
    }

    #[test]
    fn refuses_bad_versions_corrupt_encrypted_and_unknown_features() {
        assert_eq!(code(check(ImageFormat::Qcow2, &qcow2(4), 1 << 20)), "qcow2_header_invalid");
        let mut h = qcow2(3);
        h[72..80].copy_from_slice(&INCOMPAT_CORRUPT.to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
        let mut h = qcow2(3);
        h[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
        let mut h = qcow2(3);
        h[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(code(check(ImageFormat::Qcow2, &h, 1 << 20)), "qcow2_header_invalid");
        assert_eq!(code(check(ImageFormat::Qcow2, &qcow2(3)[..50], 50)), "qcow2_header_invalid");
    }

    #[test]
    fn non_images() {
        let html = b"<html><body>not found</body></html>";
        assert_eq!(code(check(ImageFormat::Qcow2, html, html.len() as u64)), "qcow2_header_invalid");
        assert_eq!(code(check(ImageFormat::Raw, html, html.len() as u64)), "unsupported_format");
        assert_eq!(code(check(ImageFormat::Raw, &qcow2(3), 1 << 20)), "unsupported_format");
        assert_eq!(code(check(ImageFormat::Raw, &[], 0)), "unsupported_format");
        let raw = vec![0u8; 4096];
        assert_eq!(check(ImageFormat::Raw, &raw, 1 << 20).unwrap().virtual_size, 1 << 20);
    }
}
