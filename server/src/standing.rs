//! Where a player stands, read from the store: what a player socket tells its player on
//! connect, after a gap in the event stream, and on its periodic check.
//!
//! Events (`matched`, `session_ended`, `dequeued`) reach a player through the replica holding
//! its socket; an event published while that replica was not subscribed (a Redis restart) or
//! while the player was away is lost. So the store is the truth, and every connection keeps a
//! [`Told`] — what it last told its player — and compares it with the store:
//!
//! - on `hello` (a fresh [`Told`]): `queue_status`, `matched` or the last session's
//!   `session_ended` (within [`crate::store::LAST_SESSION_KEPT_MS`] of its end, unless the
//!   player queued since);
//! - when the replica's event stream had a gap ([`crate::model::Event::Resync`]), and every
//!   `STATUS_EVERY` (see [`crate::play`]): only what the player has not been told yet, and a
//!   `dequeued` with reason `ticket_lost` when the ticket it was told about vanished without a
//!   match (the store lost it).
//!
//! A player may therefore hear a `session_ended` or `matched` again (on every new connection,
//! and when an event and a check cross); clients treat both as idempotent by session id.

use crate::model::{Binding, Session, SessionState};
use crate::state::Ctx;
use crate::util::now_ms;
use berth_protocol::play::ServerMessage;
use berth_protocol::DequeueReason;
use berth_protocol::{PlayerId, SessionId};

/// What one connection has told its player about where it stands.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Told {
    /// The ticket last reported queued (cleared by `dequeued`, `matched`, `session_ended`).
    queued: Option<String>,
    /// The session and the endpoint last told (a session moved to another host is told again).
    matched: Option<(SessionId, String)>,
    ended: Option<SessionId>,
}

impl Told {
    /// Notes a message on its way to the player.
    pub fn observe(&mut self, m: &ServerMessage) {
        match m {
            ServerMessage::QueueStatus { ticket, .. } => self.queued = Some(ticket.clone()),
            ServerMessage::Dequeued { .. } => self.queued = None,
            ServerMessage::Matched {
                session, endpoint, ..
            } => {
                self.queued = None;
                self.matched = Some((session.clone(), endpoint.clone()));
            }
            ServerMessage::SessionEnded { session, .. } => {
                self.queued = None;
                self.ended = Some(session.clone());
            }
            _ => {}
        }
    }

    /// Whether `m` would tell the player nothing new.
    fn knows(&self, m: &ServerMessage) -> bool {
        match m {
            ServerMessage::Matched {
                session, endpoint, ..
            } => self
                .matched
                .as_ref()
                .is_some_and(|(s, e)| s == session && e == endpoint),
            ServerMessage::SessionEnded { session, .. } => self.ended.as_ref() == Some(session),
            _ => false,
        }
    }

    /// Whether the player may be waiting to hear how something ended.
    fn waiting(&self) -> bool {
        let matched = self.matched.as_ref().map(|(s, _)| s);
        self.queued.is_some() || (matched.is_some() && matched != self.ended.as_ref())
    }
}

/// What `player` should be told now that `told` has not said, read from the store. `fresh`: a
/// new connection (tell everything there is). A store error tells nothing (the next check
/// tries again).
pub async fn standing(
    ctx: &Ctx,
    player: &PlayerId,
    told: &Told,
    fresh: bool,
) -> Vec<ServerMessage> {
    let news = match ctx.store.binding(player).await {
        Ok(Some(Binding::Queued { .. })) => queue_status(ctx, player).await,
        Ok(Some(Binding::Session { session })) => match ctx.store.session(&session).await {
            Ok(Some(s)) => session_message(ctx, &s, player, None),
            _ => None,
        },
        Ok(None) if fresh || told.waiting() => unbound(ctx, player, told).await,
        Ok(None) | Err(_) => None,
    };
    news.filter(|m| !told.knows(m)).into_iter().collect()
}

/// A player bound to nothing: how its last session ended, or that the ticket it was told
/// about is gone.
async fn unbound(ctx: &Ctx, player: &PlayerId, told: &Told) -> Option<ServerMessage> {
    let last = match ctx.store.last_session(player).await {
        Ok(Some(id)) => ctx.store.session(&id).await.ok().flatten(),
        Ok(None) => None,
        Err(_) => return None,
    };
    match (last, &told.queued) {
        (Some(s), _) if s.state == SessionState::Ended => Some(ended_message(&s)),
        (_, Some(ticket)) => Some(ServerMessage::Dequeued {
            ticket: ticket.clone(),
            reason: DequeueReason::TicketLost,
        }),
        _ => None,
    }
}

/// The player's `queue_status`, if queued.
pub async fn queue_status(ctx: &Ctx, player: &PlayerId) -> Option<ServerMessage> {
    let Ok(Some(Binding::Queued { ticket, pool })) = ctx.store.binding(player).await else {
        return None;
    };
    let tickets = ctx.store.tickets(&pool).await.ok()?;
    let t = tickets.iter().find(|t| t.id == ticket)?;
    let waited_ms = now_ms().saturating_sub(t.enqueued_ms);
    let mode = ctx.modes.get(&pool.mode);
    let window = mode.map_or(0.0, |m| m.skill.window_after(waited_ms));
    let latency_allowed_ms = t
        .latencies
        .as_ref()
        .and(mode)
        .map(|m| m.latency.allowed_after(waited_ms));
    Some(ServerMessage::QueueStatus {
        ticket,
        mode: pool.mode,
        region: pool.region,
        waited_ms,
        queued: tickets.len() as u64,
        skill_window: window,
        latency_allowed_ms,
    })
}

/// What `player` should hear about session `s`: `matched` while it is active, `session_ended`
/// once it is ending. `event` is the state an event announced (the session may have moved on
/// since); `None` when the player is told where it stands now.
pub fn session_message(
    ctx: &Ctx,
    s: &Session,
    player: &PlayerId,
    event: Option<SessionState>,
) -> Option<ServerMessage> {
    let never_ending = !s.history.iter().any(|t| t.state == SessionState::Ending);
    match (event.unwrap_or(s.state), s.state) {
        (SessionState::Active, SessionState::Active) => {
            let team = s.teams.iter().position(|t| t.contains(player))? as u32;
            let (ticket, ticket_expires_ms) = ctx
                .auth
                .ticket(
                    &s.ticket_key,
                    &s.id,
                    player,
                    ctx.config.timeouts.ticket_ttl_ms,
                )
                .map_err(|e| tracing::error!(session_id = %s.id, error = %e, "minting ticket"))
                .ok()?;
            Some(ServerMessage::Matched {
                session: s.id.clone(),
                mode: s.pool.mode.clone(),
                region: s.region().to_owned(),
                region_reason: s.region_reason.clone(),
                endpoint: s.endpoint.clone().unwrap_or_default(),
                ticket,
                ticket_expires_ms,
                deadline_ms: s.ends_by_ms,
                team,
                teams: s.teams.clone(),
            })
        }
        // Reason and results are recorded with the move to Ending, so they are there even if
        // the session is Ended by now.
        (SessionState::Ending, _) => Some(ended_message(s)),
        // Straight to Ended without Ending (never placed): tell them once, by the event.
        (SessionState::Ended, _) if event.is_some() && never_ending => Some(ended_message(s)),
        _ => None,
    }
}

fn ended_message(s: &Session) -> ServerMessage {
    ServerMessage::SessionEnded {
        session: s.id.clone(),
        reason: s.end_reason.as_deref().unwrap_or("ended").into(),
        results: s.results.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(id: &str) -> ServerMessage {
        ServerMessage::SessionEnded {
            session: SessionId::new(id).expect("id"),
            reason: "surrender".into(),
            results: serde_json::Value::Null,
        }
    }

    #[test]
    fn told_remembers_what_the_player_heard() {
        let mut told = Told::default();
        assert!(!told.waiting());
        told.observe(&ServerMessage::QueueStatus {
            ticket: "t-1".into(),
            mode: "duel".into(),
            region: "eu".into(),
            waited_ms: 0,
            queued: 1,
            skill_window: 0.0,
            latency_allowed_ms: None,
        });
        assert!(told.waiting(), "a queued player waits for news");
        told.observe(&ended("s-1"));
        assert!(!told.waiting());
        assert!(told.knows(&ended("s-1")));
        assert!(!told.knows(&ended("s-2")));
    }
}
