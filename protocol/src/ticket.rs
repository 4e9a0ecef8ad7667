//! Session tickets: short-lived JWTs (HS256) bound to one session and one player, signed with
//! that session's own key. The server mints them; the host gateway and the game server check
//! them with the key hostd injected at activation (so a VM can only check its own tickets).
//! The JWT header's `kid` is the session id, so a holder of many sessions' keys (the gateway)
//! picks the key first, then verifies, then checks that `sid` agrees.

use crate::ids::{PlayerId, SessionId};
use serde::{Deserialize, Serialize};

/// `aud` of every session ticket.
pub const TICKET_AUDIENCE: &str = "berth-ticket";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// The player.
    pub sub: PlayerId,
    /// The session.
    pub sid: SessionId,
    pub aud: String,
    pub iss: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    pub iat: u64,
    /// Unique per ticket, so a gateway can tell a replay from a reconnect.
    pub jti: String,
}
