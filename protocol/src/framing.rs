//! How a player's websocket frames cross the gateway to the game server's TCP port: an
//! image's `[server] framing` (see `docs/sdk.md`, "Players' connections").
//!
//! - [`Framing::Lines`]: one text frame ⇄ one line (`\n`-terminated UTF-8). The arena's.
//! - [`Framing::Frames`]: every frame, text or binary, as a [`HEADER`]-byte header — the kind
//!   ([`Kind::Text`] `0x01`, [`Kind::Binary`] `0x02`) and the payload's length (u32, big
//!   endian) — then the payload; the game answers the same way. For protobuf, flatbuffers or
//!   any binary protocol.
//! - [`Framing::Stream`]: binary frames carry the TCP byte stream unchanged, both ways, and
//!   nothing else is sent (no join line): for servers that know nothing of Berth.

use serde::{Deserialize, Serialize};

/// An image's framing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    #[default]
    Lines,
    Frames,
    Stream,
}

impl Framing {
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::Lines => "lines",
            Framing::Frames => "frames",
            Framing::Stream => "stream",
        }
    }
}

/// A frame's kind in [`Framing::Frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text = 1,
    Binary = 2,
}

/// The header's size: one kind byte and a u32 length.
pub const HEADER: usize = 5;

/// The header of a `len`-byte payload of `kind`.
pub fn header(kind: Kind, len: u32) -> [u8; HEADER] {
    let l = len.to_be_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// What a header says, or why it is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A frame of `kind` whose payload is `len` bytes.
    Frame { kind: Kind, len: u32 },
    /// A kind byte that is neither text nor binary.
    BadKind(u8),
    /// A payload longer than the limit the reader was given.
    TooLong(u32),
}

/// Reads a header, with `max` the longest payload taken.
pub fn parse_header(h: [u8; HEADER], max: u32) -> Header {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let kind = match h[0] {
        1 => Kind::Text,
        2 => Kind::Binary,
        other => return Header::BadKind(other),
    };
    if len > max {
        return Header::TooLong(len);
    }
    Header::Frame { kind, len }
}

/// One frame, header and payload, ready to write.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&header(kind, payload.len() as u32));
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_headers_are_named() {
        let f = encode(Kind::Binary, b"\x00\xffhi");
        assert_eq!(f, b"\x02\x00\x00\x00\x04\x00\xffhi");
        let h: [u8; HEADER] = f[..HEADER].try_into().expect("header");
        assert_eq!(
            parse_header(h, 16),
            Header::Frame {
                kind: Kind::Binary,
                len: 4
            }
        );
        assert_eq!(parse_header(h, 3), Header::TooLong(4));
        assert_eq!(parse_header([9, 0, 0, 0, 0], 16), Header::BadKind(9));
        assert_eq!(
            serde_json::to_string(&Framing::Stream).expect("ser"),
            "\"stream\""
        );
        assert_eq!(Framing::default(), Framing::Lines);
    }
}
