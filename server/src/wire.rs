//! What the player and host websockets share: decoding a frame into a protocol message with a
//! stable error code, and the bearer header. The socket toolkit they share with hostd's gateway
//! (first frame, close frames, read errors, the flood guard) is `berth-net`'s, re-exported here.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, Utf8Bytes, WebSocketUpgrade};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use berth_net::Seat;
use berth_protocol::{clip, DETAIL_MAX_CHARS};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use berth_net::{
    close_after_read_error, close_frame, first_frame, send_close, First, INVALID_UTF8,
};
/// Close codes (shared with hostd's gateway).
pub use berth_protocol::close;
pub use berth_protocol::rate::{Flood, Verdict};

/// Why a text frame is not a message; `code()` is sent to the peer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("binary frames are not supported; send JSON text frames")]
    Binary,
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("unknown message type: {0}")]
    UnknownType(String),
    #[error("not a valid message: {0}")]
    Message(String),
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::Binary => "binary_not_supported",
            FrameError::Json(_) => "bad_json",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::Message(_) => "bad_message",
        }
    }
}

/// Decodes a text frame as `T` (an internally tagged protocol enum). serde's text may quote
/// the frame (an unknown type or field whole), so it is clipped.
pub fn decode<T: DeserializeOwned>(text: &str) -> Result<T, FrameError> {
    serde_json::from_str(text).map_err(|e| {
        let msg = clip(&e.to_string(), DETAIL_MAX_CHARS).into_owned();
        if e.is_syntax() || e.is_eof() {
            return FrameError::Json(msg);
        }
        if msg.starts_with("unknown variant") || msg.contains("missing field `type`") {
            FrameError::UnknownType(msg)
        } else {
            FrameError::Message(msg)
        }
    })
}

pub fn text<T: Serialize>(msg: &T) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(msg).expect("protocol types always serialise"),
    ))
}

/// What a websocket endpoint (`/v1/play`, `/v1/hosts`) takes from its upgrade request: the
/// upgrade, the bearer token if any, and the connection's listener seat (held until the
/// peer's first message is accepted, see `berth_net::serve`).
pub struct Upgrade {
    pub ws: WebSocketUpgrade,
    pub bearer: Option<String>,
    pub seat: Seat,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ws = WebSocketUpgrade::from_request_parts(parts, state).await?;
        let Ok(seat) = Seat::from_request_parts(parts, state).await;
        Ok(Upgrade {
            ws,
            bearer: bearer(&parts.headers),
            seat,
        })
    }
}

/// `Authorization: Bearer <token>`, if present.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::play::ClientMessage;

    #[test]
    fn frame_errors_have_stable_codes() {
        let code = |t: &str| decode::<ClientMessage>(t).expect_err("bad").code();
        assert_eq!(code("{not json"), "bad_json");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"mode":"duel"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"queue","mode":3}"#), "bad_message");
        assert_eq!(
            code(r#"{"type":"ping","nonce":1,"extra":2}"#),
            "bad_message"
        );
        // serde quotes an unknown type whole: the message does not.
        let huge = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
        let e = decode::<ClientMessage>(&huge).expect_err("unknown type");
        assert_eq!(e.code(), "unknown_type");
        assert!(e.to_string().len() < 300, "{} bytes", e.to_string().len());
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer abc".parse().expect("header"));
        assert_eq!(bearer(&h).as_deref(), Some("abc"));
        h.insert("authorization", "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&h), None);
    }
}
