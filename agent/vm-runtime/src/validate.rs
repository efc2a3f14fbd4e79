//! Validation of hostile input: names, ids, URLs and cache keys.

use crate::AgentError;

/// A lowercase RFC 1123 label of 1 to 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Checks a task id: 1 to 128 of `[A-Za-z0-9._:-]`, not starting with a dot
/// (it names a file in the state dir).
pub fn task_id(s: &str) -> Result<(), AgentError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
    if ok { Ok(()) } else { Err(AgentError::Validation(format!("invalid task_id {s:?}"))) }
}

/// Parses a VM id (a UUID) into its canonical lowercase hyphenated form.
pub fn vm_id(s: &str) -> Result<uuid::Uuid, AgentError> {
    uuid::Uuid::parse_str(s)
        .ok()
        .filter(|u| !u.is_nil() && s.len() == 36)
        .ok_or_else(|| AgentError::Validation(format!("vm_id {s:?} is not a UUID")))
}

/// Checks a sha256 pin and returns it lowercase; empty means no pin.
pub fn sha256_pin(s: &str) -> Result<Option<String>, AgentError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(Some(s.to_ascii_lowercase()))
    } else {
        Err(AgentError::Validation("image sha256 must be 64 hex digits".into()))
    }
}

/// A cache key: the image URL's basename, safe as a file name in the cache dir.
pub fn cache_basename(s: &str) -> Result<(), AgentError> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Validation(format!(
            "image basename {s:?} is not a safe file name (letters, digits and . _ - + ~, not starting with a dot)"
        )))
    }
}

/// A validated image URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUrl {
    /// The parsed URL.
    pub url: url::Url,
    /// The cache key: the last path segment, percent-decoded.
    pub basename: String,
}

/// Parses an image URL, checks its scheme against `allowed`, and derives the
/// cache key from its last path segment (percent-decoded, then checked, so
/// `%2e%2e%2f` cannot escape the cache dir).
pub fn image_url(raw: &str, allowed: &[String]) -> Result<ImageUrl, AgentError> {
    let url = url::Url::parse(raw).map_err(|source| AgentError::InvalidUrl { raw: raw.to_string(), source })?;
    let scheme = url.scheme();
    if !allowed.iter().any(|a| a == scheme) {
        return Err(AgentError::Validation(format!(
            "image url scheme {scheme:?} is not allowed (allowed: {})",
            allowed.join(", ")
        )));
    }
    if scheme != "file" && url.host_str().is_none_or(str::is_empty) {
        return Err(AgentError::Validation("image url has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(AgentError::Validation("image url must not carry credentials".into()));
    }
    // The raw last segment, before url's own normalisation of dot segments.
    let after_host = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let path = after_host.split(['?', '#']).next().unwrap_or("");
    let last_raw = path.rsplit('/').next().unwrap_or("");
    let decoded = percent_decode(last_raw)
        .ok_or_else(|| AgentError::Validation("image url basename is not valid UTF-8".into()))?;
    cache_basename(&decoded)?;
    let seg = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
    let seg = percent_decode(seg).unwrap_or_default();
    if seg != decoded {
        return Err(AgentError::Validation(format!("image url path {path:?} normalises to another file; refused")));
    }
    Ok(ImageUrl { url, basename: decoded })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // A '%' not followed by two hex digits is malformed: refuse it.
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemes(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn labels() {
        assert!(is_dns_label("vm-1"));
        assert!(!is_dns_label("-vm"));
        assert!(!is_dns_label("VM"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn task_ids() {
        assert!(task_id("01HZX-abc:1.2_3").is_ok());
        assert!(task_id("../x").is_err());
        assert!(task_id(".hidden").is_err());
        assert!(task_id("").is_err());
        assert!(task_id("a/b").is_err());
    }

    #[test]
    fn vm_ids() {
        assert!(vm_id("6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").is_ok());
        assert!(vm_id("6f1c1a2e3b4d4e5f8a9b0c1d2e3f4a5b").is_err());
        assert!(vm_id("00000000-0000-0000-0000-000000000000").is_err());
        assert!(vm_id("../etc").is_err());
    }

    #[test]
    fn sha_pins() {
        assert_eq!(sha256_pin("").unwrap(), None);
        assert_eq!(sha256_pin(&"AB".repeat(32)).unwrap(), Some("ab".repeat(32)));
        assert!(sha256_pin("abc").is_err());
        assert!(sha256_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn urls_and_basenames() {
        let https = schemes(&["https"]);
        let u = image_url("https://example.com/images/debian-12.qcow2?x=1", &https).unwrap();
        assert_eq!(u.basename, "debian-12.qcow2");
        assert!(image_url("http://example.com/a.qcow2", &https).is_err());
        assert!(image_url("file:///tmp/a.qcow2", &https).is_err());
        let all = schemes(&["https", "http", "file"]);
        assert_eq!(image_url("file:///tmp/a.qcow2", &all).unwrap().basename, "a.qcow2");
        for bad in [
            "http://h/..",
            "http://h/a/..",
            "http://h/%2e%2e",
            "http://h/x/..%2fetc%2fpasswd",
            "http://h/a%2f..%2f..%2fb",
            "http://h/",
            "http://h/.hidden",
            "http://h/a%00b",
            "http://user:pw@h/a.qcow2",
            "ftp://h/a.qcow2",
            "not a url",
        ] {
            assert!(image_url(bad, &all).is_err(), "{bad} accepted");
        }
    }
}
