//! The gateway's framings (`berth_protocol::framing`): a player's websocket frame as bytes for
//! the game's TCP port, and the game's bytes as frames for the player, for each of an image's
//! `lines`, `frames` and `stream`.
//!
//! [`GameReader`] keeps what it has read between calls, so that reading is cancel safe (a
//! `select!` branch).

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes};
use berth_protocol::framing::{self, Framing, Header, Kind, HEADER};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a game may send as one message (a line or a frame): the arena's `welcome`
/// carries its whole map.
pub const MAX_GAME_MESSAGE: usize = 1 << 20;
/// In `stream` framing, the most bytes of the game's stream one binary frame carries.
pub const STREAM_CHUNK: usize = 16 * 1024;

/// What a player's data frame becomes on the game's port, or why it is refused (`bad_frame`,
/// the connection stays open).
pub fn to_game(framing: Framing, msg: &Message, out: &mut Vec<u8>) -> Result<(), &'static str> {
    out.clear();
    match (framing, msg) {
        (Framing::Lines, Message::Text(t)) if t.as_str().contains('\n') => {
            Err("a frame is one line: no raw newline")
        }
        (Framing::Lines, Message::Text(t)) => {
            out.extend_from_slice(t.as_bytes());
            out.push(b'\n');
            Ok(())
        }
        (Framing::Lines, Message::Binary(_)) => {
            Err("this game takes text frames (JSON lines), not binary ones")
        }
        (Framing::Frames, Message::Text(t)) => {
            out.extend_from_slice(&framing::encode(Kind::Text, t.as_bytes()));
            Ok(())
        }
        (Framing::Frames, Message::Binary(b)) => {
            out.extend_from_slice(&framing::encode(Kind::Binary, b));
            Ok(())
        }
        (Framing::Stream, Message::Binary(b)) => {
            out.extend_from_slice(b);
            Ok(())
        }
        (Framing::Stream, Message::Text(_)) => {
            Err("this game takes binary frames (its byte stream), not text ones")
        }
        _ => Err("not a data frame"),
    }
}

/// The payload size of a player's data frame.
pub fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// What the join puts on the game's port first: the join line (`lines`), the join as a text
/// frame (`frames`), nothing (`stream`: the server knows nothing of Berth).
pub fn join(framing: Framing, join_json: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Lines => [join_json, b"\n"].concat(),
        Framing::Frames => framing::encode(Kind::Text, join_json),
        Framing::Stream => Vec::new(),
    }
}

/// What reading the game's side gave.
#[derive(Debug, PartialEq)]
pub enum GameRead {
    /// A message for the player.
    Message(Message),
    /// A line or frame over [`MAX_GAME_MESSAGE`].
    TooLong,
    /// Bytes that are not the image's framing (a bad kind, a text frame or line that is not
    /// UTF-8).
    Bad(&'static str),
    Closed,
}

/// The game's side of one connection.
#[derive(Debug)]
pub struct GameReader {
    framing: Framing,
    buf: Vec<u8>,
}

impl GameReader {
    pub fn new(framing: Framing) -> Self {
        GameReader {
            framing,
            buf: Vec::with_capacity(STREAM_CHUNK),
        }
    }

    /// The next message for the player. Cancel safe.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> GameRead {
        loop {
            if let Some(read) = self.take() {
                return read;
            }
            self.buf.reserve(STREAM_CHUNK);
            match rd.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return self.last_line().unwrap_or(GameRead::Closed),
                Ok(_) => {}
            }
        }
    }

    /// A whole message off the front of the buffer, if there is one.
    fn take(&mut self) -> Option<GameRead> {
        match self.framing {
            Framing::Lines => self.take_line(),
            Framing::Frames => self.take_frame(),
            Framing::Stream if self.buf.is_empty() => None,
            Framing::Stream => {
                let n = self.buf.len().min(STREAM_CHUNK);
                let chunk: Vec<u8> = self.buf.drain(..n).collect();
                Some(GameRead::Message(Message::Binary(Bytes::from(chunk))))
            }
        }
    }

    /// In `lines`, a last line the game closed without its newline.
    fn last_line(&mut self) -> Option<GameRead> {
        if self.framing != Framing::Lines || self.buf.is_empty() {
            return None;
        }
        self.buf.push(b'\n');
        self.take_line()
    }

    fn take_line(&mut self) -> Option<GameRead> {
        loop {
            let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
                return (self.buf.len() > MAX_GAME_MESSAGE).then_some(GameRead::TooLong);
            };
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            if line.len() > MAX_GAME_MESSAGE {
                return Some(GameRead::TooLong);
            }
            if !line.is_empty() {
                return Some(text(line));
            }
        }
    }

    fn take_frame(&mut self) -> Option<GameRead> {
        let head: [u8; HEADER] = self.buf.get(..HEADER)?.try_into().ok()?;
        match framing::parse_header(head, MAX_GAME_MESSAGE as u32) {
            Header::BadKind(_) => Some(GameRead::Bad("a frame's kind must be 1 or 2")),
            Header::TooLong(_) => Some(GameRead::TooLong),
            Header::Frame { kind, len } => {
                let end = HEADER + len as usize;
                if self.buf.len() < end {
                    return None;
                }
                let payload: Vec<u8> = self.buf.drain(..end).skip(HEADER).collect();
                Some(match kind {
                    Kind::Text => text(payload),
                    Kind::Binary => GameRead::Message(Message::Binary(Bytes::from(payload))),
                })
            }
        }
    }
}

/// A text message, if `bytes` are UTF-8.
fn text(bytes: Vec<u8>) -> GameRead {
    match String::from_utf8(bytes) {
        Ok(s) => GameRead::Message(Message::Text(Utf8Bytes::from(s))),
        Err(_) => GameRead::Bad("a text frame or line must be UTF-8"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_msg(s: &str) -> Message {
        Message::Text(Utf8Bytes::from(s.to_owned()))
    }

    fn bin_msg(b: &[u8]) -> Message {
        Message::Binary(Bytes::from(b.to_vec()))
    }

    async fn read_all(framing: Framing, input: &[u8]) -> Vec<GameRead> {
        let mut r = GameReader::new(framing);
        let mut rd = input;
        let mut out = Vec::new();
        loop {
            match r.next(&mut rd).await {
                GameRead::Closed => return out,
                other => {
                    let stop = !matches!(other, GameRead::Message(_));
                    out.push(other);
                    if stop {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn player_frames_become_the_images_framing_or_are_refused() {
        let mut out = Vec::new();
        to_game(Framing::Lines, &text_msg("{\"a\":1}"), &mut out).expect("line");
        assert_eq!(out, b"{\"a\":1}\n");
        assert!(to_game(Framing::Lines, &text_msg("a\nb"), &mut out).is_err());
        assert!(to_game(Framing::Lines, &bin_msg(b"x"), &mut out).is_err());
        to_game(Framing::Frames, &bin_msg(b"\x00\x01"), &mut out).expect("frame");
        assert_eq!(out, b"\x02\x00\x00\x00\x02\x00\x01");
        to_game(Framing::Frames, &text_msg("hi"), &mut out).expect("frame");
        assert_eq!(out, b"\x01\x00\x00\x00\x02hi");
        to_game(Framing::Stream, &bin_msg(b"\x00\x00\x00\x00"), &mut out).expect("bytes");
        assert_eq!(out, b"\x00\x00\x00\x00");
        assert!(to_game(Framing::Stream, &text_msg("hi"), &mut out).is_err());
        assert_eq!(join(Framing::Stream, b"{}"), b"");
        assert_eq!(join(Framing::Lines, b"{}"), b"{}\n");
        assert_eq!(join(Framing::Frames, b"{}"), b"\x01\x00\x00\x00\x02{}");
    }

    #[tokio::test]
    async fn the_games_bytes_become_frames_for_the_player() {
        // Empty lines are skipped; a last line without its newline still counts.
        assert_eq!(
            read_all(Framing::Lines, b"a\n\r\n\nb\r\nc").await,
            [
                GameRead::Message(text_msg("a")),
                GameRead::Message(text_msg("b")),
                GameRead::Message(text_msg("c"))
            ]
        );
        let long = vec![b'x'; MAX_GAME_MESSAGE + 1];
        assert_eq!(read_all(Framing::Lines, &long).await, [GameRead::TooLong]);
        let mut input = framing::encode(Kind::Text, b"hi");
        input.extend(framing::encode(Kind::Binary, b"\xff\x00"));
        assert_eq!(
            read_all(Framing::Frames, &input).await,
            [
                GameRead::Message(text_msg("hi")),
                GameRead::Message(bin_msg(b"\xff\x00"))
            ]
        );
        assert_eq!(
            read_all(Framing::Frames, b"\x07\x00\x00\x00\x00").await,
            [GameRead::Bad("a frame's kind must be 1 or 2")]
        );
        assert_eq!(
            read_all(Framing::Frames, &framing::encode(Kind::Text, b"\xff")).await,
            [GameRead::Bad("a text frame or line must be UTF-8")]
        );
        assert_eq!(
            read_all(Framing::Frames, b"\x02\x7f\x00\x00\x00").await,
            [GameRead::TooLong]
        );
        // A frame cut short by the game's close is not delivered.
        assert_eq!(
            read_all(Framing::Frames, b"\x02\x00\x00\x00\x09abc").await,
            []
        );
        let stream = read_all(Framing::Stream, &[7u8; STREAM_CHUNK + 10]).await;
        assert_eq!(stream.len(), 2);
        assert_eq!(
            stream[1],
            GameRead::Message(bin_msg(&[7u8; 10])),
            "the stream in chunks of at most STREAM_CHUNK"
        );
    }
}
