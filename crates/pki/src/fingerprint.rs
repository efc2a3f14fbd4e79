//! sha256 fingerprints: `sha256:<hex>` formatting and lenient parsing.

use sha2::{Digest, Sha256};

use crate::error::FingerprintError;

/// sha256 of `data` (for certificates: of the DER encoding).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Lower-case hex of `bytes`, no separators.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0x0f)] as char);
    }
    s
}

/// Formats a digest as `sha256:<lowercase hex>`.
pub fn format_fingerprint(digest: &[u8]) -> String {
    format!("sha256:{}", to_hex(digest))
}

/// Parses a sha256 fingerprint: optional `sha256:` prefix (any case), hex digits in either
/// case, with or without `:` between every byte pair.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], FingerprintError> {
    let t = s.trim();
    let body = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
        _ => t,
    };
    if body.is_empty() {
        return Err(FingerprintError::Empty);
    }
    if let Some(c) = body.chars().find(|c| !c.is_ascii_hexdigit() && *c != ':') {
        return Err(FingerprintError::InvalidCharacter(c));
    }
    let digits: Vec<u8> = if body.contains(':') {
        let mut v = Vec::with_capacity(64);
        for pair in body.split(':') {
            if pair.len() != 2 {
                return Err(FingerprintError::Separator);
            }
            v.extend_from_slice(pair.as_bytes());
        }
        v
    } else {
        body.as_bytes().to_vec()
    };
    if digits.len() != 64 {
        return Err(FingerprintError::Length { got: digits.len() });
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
    }
    Ok(out)
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0, // unreachable: characters are checked before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_parse_variants() {
        let d = sha256(b"otherix");
        let hex = to_hex(&d);
        assert_eq!(hex.len(), 64);
        let formatted = format_fingerprint(&d);
        assert_eq!(formatted, format!("sha256:{hex}"));

        let colon_upper = d.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        for variant in [
            formatted.clone(),
            hex.clone(),
            hex.to_uppercase(),
            format!("SHA256:{}", hex.to_uppercase()),
            colon_upper.clone(),
            format!("sha256:{colon_upper}"),
            format!("  {formatted}\n"),
        ] {
            assert_eq!(parse_fingerprint(&variant), Ok(d), "{variant}");
        }
    }

    #[test]
    fn parse_errors() {
        let hex = to_hex(&sha256(b"x"));
        assert_eq!(parse_fingerprint(""), Err(FingerprintError::Empty));
        assert_eq!(parse_fingerprint("sha256:"), Err(FingerprintError::Empty));
        assert_eq!(parse_fingerprint(&hex[..62]), Err(FingerprintError::Length { got: 62 }));
        assert_eq!(parse_fingerprint(&format!("{hex}00")), Err(FingerprintError::Length { got: 66 }));
        assert_eq!(parse_fingerprint(&format!("{}g", &hex[..63])), Err(FingerprintError::InvalidCharacter('g')));
        assert_eq!(parse_fingerprint(&format!("sha1:{hex}")), Err(FingerprintError::InvalidCharacter('s')));
        assert_eq!(parse_fingerprint(&format!("{}:{}", &hex[..3], &hex[3..])), Err(FingerprintError::Separator));
        assert_eq!(parse_fingerprint(&format!("{hex}:")), Err(FingerprintError::Separator));
        // Multi-byte UTF-8 after a short prefix must not panic on slicing.
        assert!(parse_fingerprint("sha2ü:abc").is_err());
        assert!(parse_fingerprint("ü").is_err());
    }
}
