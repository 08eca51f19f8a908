//! Exponential backoff with full jitter, for every retry loop of the agent
//! (enrollment, sessions, posts of the converger).

use std::time::Duration;

/// Exponential backoff with full jitter: 0..min(cap, base * 2^n).
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { attempt: 0, base: Duration::from_millis(200), cap: Duration::from_secs(10) }
    }
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::random_range(ms / 4..=ms.max(1)))
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(200));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
        let late: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
        assert!(late.iter().all(|d| *d >= Duration::from_millis(2500)), "{late:?}");
        assert!(late.iter().any(|d| *d != late[0]), "jitter");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
