//! Reflex (`games/reflex/README.md`), as a bot plays it: after each `go` it taps, a human-like
//! reaction time later (now and then the wrong arrow), and it pings with `t`. Reflex's
//! messages are told apart from the arena's by their types (`round`, `go`, `point`, `over`,
//! `waiting`) and by `welcome`'s `"game":"reflex"`.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// A reaction time is drawn from this range.
const REACTION_MS: (u64, u64) = (180, 450);
/// How often a tap goes to the wrong arrow.
const WRONG_RATE: f64 = 0.05;
const DIRS: [&str; 4] = ["left", "right", "up", "down"];
/// When no tap is pending, the next beat is at most this far (the ping's own time rules).
const IDLE: Duration = Duration::from_secs(3600);

/// A Reflex message the bot acts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Msg {
    Welcome {
        player: String,
    },
    Round,
    Go {
        n: u64,
        dir: String,
    },
    Over,
    Pong {
        t: u64,
    },
    /// `point`, `waiting`, or an error: nothing to do.
    Other,
}

/// The Reflex message in `text`; `None` when it is not one of Reflex's (the arena's).
pub(crate) fn parse(text: &str) -> Option<Msg> {
    let v: Value = serde_json::from_str(text).ok()?;
    Some(match v.get("type")?.as_str()? {
        "welcome" if v.get("game").and_then(Value::as_str) == Some("reflex") => Msg::Welcome {
            player: v.get("player")?.as_str()?.to_owned(),
        },
        "round" => Msg::Round,
        "go" => Msg::Go {
            n: v.get("n")?.as_u64()?,
            dir: v.get("dir")?.as_str()?.to_owned(),
        },
        "over" => Msg::Over,
        "pong" if v.get("t").is_some() => Msg::Pong {
            t: v.get("t")?.as_u64()?,
        },
        "point" | "waiting" => Msg::Other,
        _ => return None,
    })
}

/// A bot's Reflex match: the tap it is about to make.
#[derive(Debug, Default)]
pub(crate) struct Reflex {
    tap: Option<(Instant, String)>,
}

impl Reflex {
    /// `go` for round `n`: schedules the tap; returns when it is due.
    pub fn on_go(&mut self, n: u64, dir: &str, now: Instant, rng: &mut fastrand::Rng) -> Instant {
        let at = now + Duration::from_millis(rng.u64(REACTION_MS.0..=REACTION_MS.1));
        let dir = if rng.f64() < WRONG_RATE {
            DIRS[rng.usize(..DIRS.len())]
        } else {
            dir
        };
        let tap = json!({"type": "tap", "n": n, "dir": dir}).to_string();
        self.tap = Some((at, tap));
        at
    }

    /// The tap line, once it is due.
    pub fn due(&mut self, now: Instant) -> Option<String> {
        match &self.tap {
            Some((at, _)) if *at <= now => self.tap.take().map(|(_, t)| t),
            _ => None,
        }
    }

    /// When the bot next has something to send.
    pub fn next(&self, now: Instant) -> Instant {
        self.tap.as_ref().map_or(now + IDLE, |(at, _)| *at)
    }
}

/// A ping carrying `t`, echoed in Reflex's `pong`.
pub(crate) fn ping(t: u64) -> String {
    json!({"type": "ping", "t": t}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflex_messages_are_told_from_the_arenas() {
        let welcome = r#"{"type":"welcome","game":"reflex","player":"alice","team":0}"#;
        assert_eq!(
            parse(welcome),
            Some(Msg::Welcome {
                player: "alice".into()
            })
        );
        assert_eq!(
            parse(r#"{"type":"go","n":2,"dir":"up"}"#),
            Some(Msg::Go {
                n: 2,
                dir: "up".into()
            })
        );
        assert_eq!(parse(r#"{"type":"round","n":1}"#), Some(Msg::Round));
        assert_eq!(parse(r#"{"type":"over","winner":null}"#), Some(Msg::Over));
        assert_eq!(parse(r#"{"type":"pong","t":9}"#), Some(Msg::Pong { t: 9 }));
        assert_eq!(parse(r#"{"type":"point","n":1}"#), Some(Msg::Other));
        // The arena's messages are not Reflex's.
        assert_eq!(parse(r#"{"type":"welcome","player":"a","map":{}}"#), None);
        assert_eq!(parse(r#"{"type":"pong","nonce":3}"#), None);
        assert_eq!(parse(r#"{"type":"state","tick":1}"#), None);
        assert_eq!(parse("not json"), None);
    }

    #[test]
    fn a_go_is_answered_by_one_tap_a_reaction_time_later() {
        let mut r = Reflex::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let now = Instant::now();
        assert!(r.next(now) >= now + IDLE);
        let at = r.on_go(3, "left", now, &mut rng);
        let ms = (at - now).as_millis() as u64;
        assert!((REACTION_MS.0..=REACTION_MS.1).contains(&ms), "{ms} ms");
        assert_eq!(r.next(now), at);
        assert_eq!(r.due(now), None, "not yet");
        let tap: Value = serde_json::from_str(&r.due(at).expect("due")).expect("json");
        assert_eq!(
            (tap["type"].as_str(), tap["n"].as_u64()),
            (Some("tap"), Some(3))
        );
        assert!(DIRS.contains(&tap["dir"].as_str().expect("a dir")));
        assert_eq!(r.due(at), None, "one tap a go");
        // Mostly the right arrow.
        let right = (0..200)
            .filter(|_| {
                r.on_go(1, "down", now, &mut rng);
                r.due(now + IDLE).is_some_and(|t| t.contains("\"down\""))
            })
            .count();
        assert!(right > 170, "{right} of 200 right");
    }
}
