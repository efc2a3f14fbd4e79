//! AIP-158 pagination for every List RPC: `page_size` (0 means
//! [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]), an opaque `page_token`
//! that continues after the last item of the previous page, and
//! `next_page_token` (empty on the last page). A token is bound to the
//! request's other parameters: reusing it with different filters is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use otherix_errors::ApiError;
use sha2::{Digest, Sha256};

/// Items per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of a list, with what the response needs.
#[derive(Debug)]
pub struct Paged<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// The token of the next page, empty on the last.
    pub next_page_token: String,
    /// How many items all pages hold.
    pub total_size: i32,
}

/// A fingerprint of the request's other parameters (filters, the listed
/// parent), so a token cannot be replayed against another query.
pub fn query(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    otherix_auth::token::hex(&h.finalize()[..8])
}

fn bad_token() -> ApiError {
    ApiError::invalid_field("page_token", "page_token is not a token this list issued for these parameters")
}

/// The order of a list by its unique key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Ascending (names).
    Asc,
    /// Descending (time-ordered ids, newest first).
    Desc,
}

/// Cuts one page out of `items`, which must be in `order` of the unique `key`.
pub fn page<T>(
    items: Vec<T>,
    order: Order,
    key: impl Fn(&T) -> String,
    page_size: i32,
    page_token: &str,
    query: &str,
) -> Result<Paged<T>, ApiError> {
    let size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n < 0 => return Err(ApiError::invalid_field("page_size", "page_size must not be negative")),
        n => usize::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
    };
    let after = if page_token.is_empty() {
        None
    } else {
        let raw = URL_SAFE_NO_PAD.decode(page_token).map_err(|_| bad_token())?;
        let text = String::from_utf8(raw).map_err(|_| bad_token())?;
        let (q, last) = text.split_once('\0').ok_or_else(bad_token)?;
        if q != query {
            return Err(bad_token());
        }
        Some(last.to_owned())
    };
    let total_size = i32::try_from(items.len()).unwrap_or(i32::MAX);
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|t| {
            after.as_deref().is_none_or(|a| match order {
                Order::Asc => key(t).as_str() > a,
                Order::Desc => key(t).as_str() < a,
            })
        })
        .collect();
    let next_page_token = if rest.len() > size {
        rest.truncate(size);
        let last = rest.last().map(&key).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(format!("{query}\0{last}"))
    } else {
        String::new()
    };
    Ok(Paged { items: rest, next_page_token, total_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_every_item_once_and_tokens_are_bound_to_the_query() {
        let items: Vec<String> = (0..7).map(|i| format!("n{i}")).collect();
        let q = query(&["ready"]);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let p = page(items.clone(), Order::Asc, Clone::clone, 3, &token, &q).unwrap();
            assert_eq!(p.total_size, 7);
            seen.extend(p.items);
            if p.next_page_token.is_empty() {
                break;
            }
            token = p.next_page_token;
        }
        assert_eq!(seen, items);
        let mut rev = items.clone();
        rev.reverse();
        let p1 = page(rev.clone(), Order::Desc, Clone::clone, 4, "", &q).unwrap();
        let p2 = page(rev.clone(), Order::Desc, Clone::clone, 4, &p1.next_page_token, &q).unwrap();
        assert_eq!([p1.items, p2.items].concat(), rev);
        let first = page(items.clone(), Order::Asc, Clone::clone, 3, "", &q).unwrap();
        let other = query(&["gone"]);
        assert!(page(items.clone(), Order::Asc, Clone::clone, 3, &first.next_page_token, &other).is_err());
        assert!(page(items.clone(), Order::Asc, Clone::clone, 3, "not-base64!", &q).is_err());
        assert!(page(items.clone(), Order::Asc, Clone::clone, -1, "", &q).is_err());
        assert_eq!(page(items.clone(), Order::Asc, Clone::clone, 0, "", &q).unwrap().items.len(), 7);
        assert_eq!(
            page((0..2000).collect::<Vec<u32>>(), Order::Asc, |i| format!("{i:05}"), 5000, "", &q).unwrap().items.len(),
            1000
        );
    }
}
