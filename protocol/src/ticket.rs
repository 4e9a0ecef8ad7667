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

/// Why a ticket was refused; `code()` is the stable code sent to the client
/// (see [`crate::game::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is not a session ticket: {0}")]
    Malformed(&'static str),
    #[error("the ticket's signature does not match this session's key")]
    Signature,
    #[error("the ticket expired")]
    Expired,
    #[error("the ticket is for session {found}, not {expected}")]
    WrongSession { found: String, expected: String },
    #[error("the ticket is not for a game session (audience {0:?})")]
    Audience(String),
}

impl TicketError {
    pub fn code(&self) -> &'static str {
        use crate::game::code;
        match self {
            TicketError::Malformed(_) | TicketError::Signature | TicketError::Audience(_) => {
                code::BAD_TICKET
            }
            TicketError::Expired => code::TICKET_EXPIRED,
            TicketError::WrongSession { .. } => code::WRONG_SESSION,
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn b64(part: &str) -> Result<Vec<u8>, TicketError> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TicketError::Malformed("a part is not base64url"))
}

fn parts(token: &str) -> Result<[&str; 3], TicketError> {
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s), None) => Ok([h, p, s]),
        _ => Err(TicketError::Malformed("not three dot-separated parts")),
    }
}

/// The session a ticket names in its header (`kid`), unverified: only for picking the key.
pub fn session_of(token: &str) -> Result<SessionId, TicketError> {
    let [header, _, _] = parts(token)?;
    let header: Header = serde_json::from_slice(&b64(header)?)
        .map_err(|_| TicketError::Malformed("the header is not JSON"))?;
    let kid = header
        .kid
        .ok_or(TicketError::Malformed("the header names no session (kid)"))?;
    SessionId::new(kid).map_err(|_| TicketError::Malformed("the header's kid is not a session id"))
}

/// Signs `claims` as an HS256 JWT whose header names the session (`kid`). The server mints
/// with `jsonwebtoken`; this one serves the guest's warm-up and tests, and the tests check the
/// two agree.
pub fn mint(claims: &TicketClaims, key: &[u8]) -> String {
    use base64::Engine;
    use hmac::{Mac, SimpleHmac};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": claims.sid.as_str()});
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(&serde_json::to_vec(claims).expect("claims serialise"))
    );
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", b64(&mac.finalize().into_bytes()))
}

/// Verifies a session ticket: HS256 with `key` (the session's key, raw bytes), audience
/// [`TICKET_AUDIENCE`], not expired at `now_s` (seconds since the epoch), and bound to
/// `session`. Whether `sub` is one of the session's players is the caller's check.
pub fn verify(
    token: &str,
    key: &[u8],
    session: &SessionId,
    now_s: u64,
) -> Result<TicketClaims, TicketError> {
    use hmac::{Mac, SimpleHmac};
    let [header_b64, payload_b64, signature_b64] = parts(token)?;
    let header: Header = serde_json::from_slice(&b64(header_b64)?)
        .map_err(|_| TicketError::Malformed("the header is not JSON"))?;
    // Pinned: `none`, RS256 and friends are refused before anything else is read.
    if header.alg != "HS256" {
        return Err(TicketError::Malformed("the algorithm is not HS256"));
    }
    let signature = b64(signature_b64)?;
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|_| TicketError::Malformed("unusable key"))?;
    mac.update(header_b64.as_bytes());
    mac.update(b".");
    mac.update(payload_b64.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature)
        .map_err(|_| TicketError::Signature)?;
    let claims: TicketClaims = serde_json::from_slice(&b64(payload_b64)?)
        .map_err(|_| TicketError::Malformed("the claims are not a session ticket's"))?;
    if claims.aud != TICKET_AUDIENCE {
        return Err(TicketError::Audience(claims.aud));
    }
    if claims.exp <= now_s {
        return Err(TicketError::Expired);
    }
    if &claims.sid != session || header.kid.as_deref().is_some_and(|k| k != session.as_str()) {
        return Err(TicketError::WrongSession {
            found: claims.sid.to_string(),
            expected: session.to_string(),
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use hmac::{Mac, SimpleHmac};

    const KEY: &[u8] = b"0123456789abcdef";

    fn enc(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// Test double of the server's minting (the server uses `jsonwebtoken`; the stack tests
    /// check the two agree).
    fn forge(alg: &str, kid: &str, claims: serde_json::Value, key: &[u8]) -> String {
        let head = enc(&serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid}));
        let body = enc(&claims);
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{head}.{body}").as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{head}.{body}.{sig}")
    }

    fn claims(sid: &str, aud: &str, exp: u64) -> serde_json::Value {
        serde_json::json!({"sub":"alice","sid":sid,"aud":aud,"iss":"berth","exp":exp,"iat":1,"jti":"j1"})
    }

    fn s1() -> SessionId {
        SessionId::new("s1").expect("id")
    }

    #[test]
    fn minted_tickets_verify() {
        let claims: TicketClaims =
            serde_json::from_value(claims("s1", TICKET_AUDIENCE, 200)).expect("claims");
        let t = super::mint(&claims, KEY);
        assert_eq!(verify(&t, KEY, &s1(), 100), Ok(claims));
        assert_eq!(session_of(&t), Ok(s1()));
    }

    #[test]
    fn a_good_ticket_verifies() {
        let t = forge("HS256", "s1", claims("s1", TICKET_AUDIENCE, 200), KEY);
        assert_eq!(session_of(&t), Ok(s1()));
        let c = verify(&t, KEY, &s1(), 100).expect("valid");
        assert_eq!(c.sub.as_str(), "alice");
        assert_eq!(c.jti, "j1");
    }

    #[test]
    fn bad_tickets_are_refused_with_their_code() {
        let cases = [
            (
                forge(
                    "HS256",
                    "s1",
                    claims("s1", TICKET_AUDIENCE, 200),
                    b"other key",
                ),
                "bad_ticket",
            ),
            (
                forge("HS256", "s1", claims("s1", TICKET_AUDIENCE, 100), KEY),
                "ticket_expired",
            ),
            (
                forge("HS256", "s2", claims("s2", TICKET_AUDIENCE, 200), KEY),
                "wrong_session",
            ),
            (
                forge("HS256", "s1", claims("s2", TICKET_AUDIENCE, 200), KEY),
                "wrong_session",
            ),
            (
                forge("HS256", "s1", claims("s1", "berth", 200), KEY),
                "bad_ticket",
            ),
            (
                forge("HS384", "s1", claims("s1", TICKET_AUDIENCE, 200), KEY),
                "bad_ticket",
            ),
            ("garbage".to_owned(), "bad_ticket"),
            ("a.b.c".to_owned(), "bad_ticket"),
        ];
        for (token, code) in cases {
            let err = verify(&token, KEY, &s1(), 100).expect_err(&token);
            assert_eq!(err.code(), code, "{token}: {err}");
        }
        let none = format!(
            "{}.{}.",
            enc(&serde_json::json!({"alg":"none","kid":"s1"})),
            enc(&claims("s1", TICKET_AUDIENCE, 200))
        );
        assert_eq!(
            verify(&none, KEY, &s1(), 100).map_err(|e| e.code()),
            Err("bad_ticket")
        );
        assert!(session_of("x.y.z").is_err());
    }
}
