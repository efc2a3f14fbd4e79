//! Resource name rules.

/// Whether `s` is a lowercase RFC 1123 label: 1 to 63 of `[a-z0-9-]`,
/// starting and ending with a letter or digit.
pub fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::is_label;

    #[test]
    fn labels() {
        for ok in ["a", "default", "fast-ssd", "0", &"a".repeat(63)] {
            assert!(is_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "ü"] {
            assert!(!is_label(bad), "{bad}");
        }
    }
}
