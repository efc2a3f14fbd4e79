//! Login rate limiting, per account and per source address, in process
//! (each replica counts its own).
//!
//! An attempt is *reserved* before the password is checked: the reservation
//! counts as a failure from the start, so parallel attempts cannot all pass
//! the check before any of them is counted. A login that succeeds gives its
//! reservation back (and clears the account's failures); one that was never
//! tried (the hashing pool was full) gives it back too. After `max_failures`
//! reserved or failed attempts within `window` (times a key's factor),
//! further attempts are refused until the oldest leaves the window, whether
//! or not the password would be right.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limiter.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    max_keys: usize,
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// One reserved attempt against a set of keys; hand it back with
/// [`LoginLimiter::settle`]. Dropped unsettled, it stays counted as a failure.
#[derive(Debug)]
#[must_use = "settle the reservation with the attempt's outcome"]
pub struct Reservation {
    keys: Vec<String>,
    at: Instant,
}

/// How a reserved attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Wrong credentials: the attempt stays counted.
    Failed,
    /// Logged in: the first key's (the account's) failures are forgotten and
    /// the attempt no longer counts against the other keys.
    Succeeded,
    /// The password was never checked: the attempt no longer counts.
    NotTried,
}

impl LoginLimiter {
    /// A limiter allowing `max_failures` attempts per key within `window`,
    /// tracking at most `max_keys` keys (the stalest are dropped first).
    pub fn new(max_failures: usize, window: Duration, max_keys: usize) -> Self {
        LoginLimiter {
            max_failures: max_failures.max(1),
            window,
            max_keys: max_keys.max(1),
            attempts: Mutex::default(),
        }
    }

    /// Reserves one attempt against every key (`(key, factor)`: a key may
    /// count `factor` times `max_failures`), atomically: either every key has
    /// room and each counts the attempt, or none does and `Err(retry_after)`
    /// says when the fullest key has room again.
    pub fn reserve(&self, keys: &[(&str, usize)], now: Instant) -> Result<Reservation, Duration> {
        // A poisoned lock only means another thread panicked mid-update; the
        // map is still a valid map, and failing open here would lift the limit.
        let mut map = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wait = None::<Duration>;
        for (key, factor) in keys {
            if let Some(q) = map.get_mut(*key) {
                while q.front().is_some_and(|t| now.saturating_duration_since(*t) >= self.window) {
                    q.pop_front();
                }
                if q.len() >= self.max_failures.saturating_mul(*factor)
                    && let Some(oldest) = q.front()
                {
                    let w = self.window.saturating_sub(now.saturating_duration_since(*oldest));
                    wait = Some(wait.map_or(w, |cur| cur.max(w)));
                }
            }
        }
        if let Some(w) = wait {
            return Err(w.max(Duration::from_secs(1)));
        }
        if map.len() + keys.len() > self.max_keys {
            // Drop the keys whose last attempt is oldest.
            let mut by_age: Vec<(String, Instant)> =
                map.iter().map(|(k, q)| (k.clone(), q.back().copied().unwrap_or(now))).collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(map.len() / 10 + keys.len()) {
                map.remove(&k);
            }
        }
        for (key, _) in keys {
            map.entry((*key).to_owned()).or_default().push_back(now);
        }
        Ok(Reservation { keys: keys.iter().map(|(k, _)| (*k).to_owned()).collect(), at: now })
    }

    /// Settles a reservation with the attempt's outcome.
    pub fn settle(&self, r: Reservation, outcome: Outcome) {
        if outcome == Outcome::Failed {
            return;
        }
        let mut map = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, key) in r.keys.iter().enumerate() {
            if i == 0 && outcome == Outcome::Succeeded {
                map.remove(key);
                continue;
            }
            if let Some(q) = map.get_mut(key) {
                if let Some(pos) = q.iter().rposition(|t| *t == r.at) {
                    q.remove(pos);
                }
                if q.is_empty() {
                    map.remove(key);
                }
            }
        }
    }

    /// How many attempts a key holds now (for tests and diagnostics).
    pub fn count(&self, key: &str) -> usize {
        self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).map_or(0, VecDeque::len)
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
            let r = l.reserve(&keys, t0 + Duration::from_secs(i)).unwrap();
            l.settle(r, Outcome::Failed);
        }
        let wait = l.reserve(&keys, t0 + Duration::from_secs(3)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(57));
        // A refused reservation counts nowhere.
        assert_eq!(l.count("ip:1.2.3.4"), 3);
        let r = l.reserve(&keys, t0 + Duration::from_secs(61)).unwrap();
        l.settle(r, Outcome::Succeeded);
        assert_eq!(l.count("u:alice"), 0);
        // Another account from the same source is not locked by alice's failures.
        assert!(l.reserve(&[("u:bob", 1), ("ip:1.2.3.4", 5)], t0 + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn parallel_attempts_are_counted_before_they_finish() {
        // The old limiter checked before and counted after: every attempt in
        // flight passed the check. Reservations hold the slot from the start.
        let l = std::sync::Arc::new(LoginLimiter::new(10, Duration::from_secs(900), 1000));
        let now = Instant::now();
        let held: Vec<_> = (0..40)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || l.reserve(&[("u:victim", 1), ("ip:a", 5)], now).ok())
            })
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(held.len(), 10);
        // From one address across many accounts: at most 5 x 10.
        let mut granted = 0;
        for i in 0..150 {
            if let Ok(r) = l.reserve(&[(&format!("u:{i}"), 1), ("ip:b", 5)], now) {
                granted += 1;
                l.settle(r, Outcome::Failed);
            }
        }
        assert_eq!(granted, 50);
    }

    #[test]
    fn untried_and_successful_attempts_give_their_slot_back() {
        let l = LoginLimiter::new(2, Duration::from_secs(60), 100);
        let now = Instant::now();
        let keys = [("u:a", 1), ("ip:x", 5)];
        let r = l.reserve(&keys, now).unwrap();
        l.settle(r, Outcome::NotTried);
        assert_eq!((l.count("u:a"), l.count("ip:x")), (0, 0));
        let r = l.reserve(&keys, now).unwrap();
        l.settle(r, Outcome::Failed);
        let r = l.reserve(&keys, now + Duration::from_millis(1)).unwrap();
        l.settle(r, Outcome::Succeeded);
        // The account forgets; the address keeps the failure, not the success.
        assert_eq!((l.count("u:a"), l.count("ip:x")), (0, 1));
    }

    #[test]
    fn key_count_is_bounded() {
        let l = LoginLimiter::new(1, Duration::from_secs(60), 10);
        let now = Instant::now();
        for i in 0..100 {
            let r = l.reserve(&[(&format!("u:{i}"), 1)], now).unwrap();
            l.settle(r, Outcome::Failed);
        }
        assert!(l.attempts.lock().unwrap().len() <= 10);
    }
}
