//! Failed-login rate limiting, per account and per source address, in
//! process (each replica counts its own). After `max_failures` failures
//! within `window`, further attempts are refused until the oldest failure
//! leaves the window, whether or not the password would be right.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limiter.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    max_keys: usize,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// A limiter allowing `max_failures` failures per key within `window`,
    /// tracking at most `max_keys` keys (the stalest are dropped first).
    pub fn new(max_failures: usize, window: Duration, max_keys: usize) -> Self {
        LoginLimiter {
            max_failures: max_failures.max(1),
            window,
            max_keys: max_keys.max(1),
            failures: Mutex::default(),
        }
    }

    /// `Err(retry_after)` when any key is over its limit.
    pub fn check(&self, keys: &[(&str, usize)], now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.failures.lock() else { return Ok(()) };
        let mut wait = None::<Duration>;
        for (key, factor) in keys {
            if let Some(q) = map.get_mut(*key) {
                while q.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
                    q.pop_front();
                }
                if q.len() >= self.max_failures * factor
                    && let Some(oldest) = q.front()
                {
                    let w = self.window.saturating_sub(now.duration_since(*oldest));
                    wait = Some(wait.map_or(w, |cur| cur.max(w)));
                }
            }
        }
        match wait {
            Some(w) => Err(w.max(Duration::from_secs(1))),
            None => Ok(()),
        }
    }

    /// Records one failure against every key.
    pub fn record_failure(&self, keys: &[(&str, usize)], now: Instant) {
        let Ok(mut map) = self.failures.lock() else { return };
        if map.len() >= self.max_keys {
            // Drop the keys whose last failure is oldest.
            let mut by_age: Vec<(String, Instant)> =
                map.iter().map(|(k, q)| (k.clone(), q.back().copied().unwrap_or(now))).collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(map.len() / 10 + 1) {
                map.remove(&k);
            }
        }
        for (key, factor) in keys {
            let q = map.entry((*key).to_owned()).or_default();
            q.push_back(now);
            let cap = self.max_failures * factor;
            while q.len() > cap {
                q.pop_front();
            }
        }
    }

    /// Forgets a key's failures (after a successful login).
    pub fn reset(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_recovers_after_the_window() {
        let l = LoginLimiter::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let keys = [("u:alice", 1), ("ip:1.2.3.4", 5)];
        for i in 0..3 {
            assert!(l.check(&keys, t0 + Duration::from_secs(i)).is_ok());
            l.record_failure(&keys, t0 + Duration::from_secs(i));
        }
        let wait = l.check(&keys, t0 + Duration::from_secs(3)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(57));
        assert!(l.check(&keys, t0 + Duration::from_secs(61)).is_ok());
        // Another account from the same source is not locked by alice's failures.
        assert!(l.check(&[("u:bob", 1), ("ip:1.2.3.4", 5)], t0 + Duration::from_secs(3)).is_ok());
        l.reset("u:alice");
        assert!(l.check(&[("u:alice", 1)], t0 + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn key_count_is_bounded() {
        let l = LoginLimiter::new(1, Duration::from_secs(60), 10);
        let now = Instant::now();
        for i in 0..100 {
            l.record_failure(&[(&format!("u:{i}"), 1)], now);
        }
        assert!(l.failures.lock().unwrap().len() <= 10);
    }
}
