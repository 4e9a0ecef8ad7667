//! Reconnect delays: exponential, with jitter so that many clients dropped at once (a server
//! restart, a cell tower) do not come back in lockstep. `docs/protocol.md` recommends 250 ms
//! doubling to 10 s, ±20 %.

use std::time::Duration;

/// Delays for successive reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    cap: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    /// 250 ms doubling to 10 s, ±20 %.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(10), 0)
    }
}

impl Backoff {
    /// From `start`, doubling per attempt, never above `cap`; `seed` seeds the jitter.
    pub fn new(start: Duration, cap: Duration, seed: u64) -> Self {
        Backoff {
            start,
            cap,
            attempt: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.start, self.cap, self.attempt, self.rng.f64());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to the first delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `start` doubled `attempt` times, spread by `jitter` (0..1 maps to -20 %..+20 %), at most
/// `cap`.
pub fn delay(start: Duration, cap: Duration, attempt: u32, jitter: f64) -> Duration {
    let base = start.saturating_mul(1u32 << attempt.min(20)).min(cap);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap() {
        let (start, cap) = (Duration::from_millis(250), Duration::from_secs(4));
        assert_eq!(delay(start, cap, 0, 0.5), Duration::from_millis(250));
        assert_eq!(delay(start, cap, 2, 0.5), Duration::from_millis(1000));
        assert_eq!(delay(start, cap, 2, 0.0), Duration::from_millis(800));
        assert_eq!(delay(start, cap, 2, 1.0), Duration::from_millis(1200));
        assert_eq!(delay(start, cap, 30, 1.0), cap);
        let mut b = Backoff::new(start, cap, 7);
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(200) && first <= Duration::from_millis(300));
        b.next_delay();
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(300));
    }
}
