//! The one-shot deadlines of a match, in one table: each [`Timer`] kind is armed at most once
//! at a time, and the match loop asks the table which is due and when the next one is.
//! Recurring beats (pings, inputs) stay with their sockets; they are not one-shot.

use tokio::time::Instant;

/// What a match waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// One side reported the end; give the other side until then.
    EndWait,
    /// Send `queue` again (after a transient refusal).
    Requeue,
    /// `cancel` was sent; count the match as cancelled if nothing else happens by then.
    CancelUntil,
    /// A fresh ticket was asked for (through a new `/v1/play`); give up waiting then.
    AwaitingTicket,
    /// (Re)open the game socket.
    GameConnect,
    /// (Re)open `/v1/play`.
    PlayReconnect,
    /// Fault: drop the game socket.
    Drop,
    /// Fault: the app goes to the background.
    Background,
    /// Fault: the app comes back from the background.
    BackgroundUntil,
}

const KINDS: usize = 9;

/// The armed deadlines, one slot per [`Timer`].
#[derive(Debug, Default)]
pub(super) struct Timers {
    at: [Option<Instant>; KINDS],
}

impl Timers {
    /// Arms `t` for `at`, replacing any earlier arming.
    pub fn set(&mut self, t: Timer, at: Instant) {
        self.at[t as usize] = Some(at);
    }

    /// Arms `t` for `at` unless it is armed already (the first deadline wins).
    pub fn set_once(&mut self, t: Timer, at: Instant) {
        self.at[t as usize].get_or_insert(at);
    }

    /// Disarms `t`; whether it was armed.
    pub fn clear(&mut self, t: Timer) -> bool {
        self.at[t as usize].take().is_some()
    }

    pub fn get(&self, t: Timer) -> Option<Instant> {
        self.at[t as usize]
    }

    pub fn is_set(&self, t: Timer) -> bool {
        self.at[t as usize].is_some()
    }

    /// Whether `t` is armed and its deadline has come (it stays armed).
    pub fn due(&self, t: Timer, now: Instant) -> bool {
        self.get(t).is_some_and(|at| now >= at)
    }

    /// Disarms `t` if it is due; whether it was.
    pub fn take_due(&mut self, t: Timer, now: Instant) -> bool {
        self.due(t, now) && self.clear(t)
    }

    /// The earliest deadline among `kinds`, if any is armed.
    pub fn earliest(&self, kinds: &[Timer]) -> Option<Instant> {
        kinds.iter().filter_map(|&t| self.get(t)).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn arming_due_and_earliest() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = Timers::default();
        assert_eq!(t.earliest(&[Timer::EndWait, Timer::Drop]), None);
        t.set(Timer::Drop, now + 2 * s);
        t.set_once(Timer::EndWait, now + 3 * s);
        t.set_once(Timer::EndWait, now + s);
        assert_eq!(t.get(Timer::EndWait), Some(now + 3 * s));
        assert_eq!(
            t.earliest(&[Timer::EndWait, Timer::Drop]),
            Some(now + 2 * s)
        );
        assert_eq!(t.earliest(&[Timer::EndWait]), Some(now + 3 * s));
        assert!(!t.due(Timer::Drop, now + s));
        assert!(!t.take_due(Timer::Drop, now + s) && t.is_set(Timer::Drop));
        assert!(t.take_due(Timer::Drop, now + 2 * s) && !t.is_set(Timer::Drop));
        assert!(t.clear(Timer::EndWait) && !t.clear(Timer::EndWait));
        assert!(!t.due(Timer::Requeue, now + 9 * s));
    }
}
