//! The token bucket every Berth socket limits its peer's messages with (the server's
//! `/v1/play` and `/v1/hosts`, hostd's gateway): `rate` per second, bursts up to `burst`; and
//! the flood guard built on it, which closes a connection that keeps sending past the limit.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// Starts full at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        RateLimit {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the flood guard says of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the limit: refuse this message (`rate_limited`), keep the connection.
    Refused,
    /// Over the limit once too often: refuse it and close (4429).
    Close,
}

/// A [`RateLimit`] that counts refusals ("strikes"): more than `max_strikes` of them, each
/// within `forgiven_after` of the last, and the connection should close. A quiet spell
/// forgives the strikes, so only a sustained flood closes.
#[derive(Debug, Clone)]
pub struct Flood {
    limit: RateLimit,
    max_strikes: u32,
    forgiven_after: Duration,
    strikes: u32,
    last_strike: Instant,
}

impl Flood {
    pub fn new(
        rate: u32,
        burst: u32,
        max_strikes: u32,
        forgiven_after: Duration,
        now: Instant,
    ) -> Self {
        Flood {
            limit: RateLimit::new(rate, burst, now),
            max_strikes,
            forgiven_after,
            strikes: 0,
            last_strike: now,
        }
    }

    /// Counts one message at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.strikes > 0 && now.saturating_duration_since(self.last_strike) > self.forgiven_after
        {
            self.strikes = 0;
        }
        if self.limit.allow(now) {
            return Verdict::Allowed;
        }
        self.strikes += 1;
        self.last_strike = now;
        if self.strikes > self.max_strikes {
            Verdict::Close
        } else {
            Verdict::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sustained_flood_closes_and_a_quiet_spell_forgives() {
        let t0 = Instant::now();
        let forgive = Duration::from_secs(10);
        let mut f = Flood::new(10, 2, 3, forgive, t0);
        assert_eq!(f.check(t0), Verdict::Allowed);
        assert_eq!(f.check(t0), Verdict::Allowed);
        for _ in 0..3 {
            assert_eq!(f.check(t0), Verdict::Refused);
        }
        assert_eq!(f.check(t0), Verdict::Close);
        // Two strikes close a guard allowing one, unless a quiet spell came between them.
        let later = t0 + forgive + Duration::from_secs(1);
        let mut f = Flood::new(1, 1, 1, forgive, t0);
        assert_eq!(f.check(t0), Verdict::Allowed);
        assert_eq!(f.check(t0), Verdict::Refused);
        assert_eq!(f.check(later), Verdict::Allowed);
        assert_eq!(f.check(later), Verdict::Refused);
        let mut g = Flood::new(1, 1, 1, forgive, t0);
        assert_eq!(g.check(t0), Verdict::Allowed);
        assert_eq!(g.check(t0), Verdict::Refused);
        assert_eq!(g.check(t0 + Duration::from_millis(1)), Verdict::Close);
    }

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 2, t0);
        assert!(r.allow(t0) && r.allow(t0));
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_millis(100)));
        assert!(!r.allow(t0 + Duration::from_millis(100)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(60);
        assert!(r.allow(later) && r.allow(later) && !r.allow(later));
    }
}
