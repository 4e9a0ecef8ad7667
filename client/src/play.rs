//! The player's socket to the matchmaker, `/v1/play`: hello with a token (in the message or as
//! a bearer header), queue and cancel, ping, and the server's typed messages. A client that
//! reconnects ([`PlayClient::reconnect`], with [`Backoff`](crate::Backoff) between attempts) is
//! told its state again after `welcome`; that is also how a session ticket is renewed (a
//! fresh `matched` comes with every reconnect while the session lives).

use crate::socket::{Closed, ConnectOptions, Incoming, Socket};
use crate::{Backoff, ClientError};
use berth_protocol::play::{ClientMessage, PartySpec, ServerMessage, PLAY_PROTOCOL_VERSION};
use berth_protocol::PlayerId;
use std::time::Duration;

/// How long [`PlayClient::connect`] waits for `welcome`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom a player connects.
#[derive(Debug, Clone)]
pub struct PlayConfig {
    /// `ws://HOST:PORT/v1/play`.
    pub url: String,
    /// The player's JWT.
    pub token: String,
    /// Send the token as an `Authorization: Bearer` header instead of in `hello`.
    pub token_in_header: bool,
    /// Socket options (faults, alive tracking, connect timeout); `bearer` is set from the
    /// token when `token_in_header`.
    pub socket: ConnectOptions,
}

impl PlayConfig {
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        PlayConfig {
            url: url.into(),
            token: token.into(),
            token_in_header: false,
            socket: ConnectOptions::default(),
        }
    }
}

/// What `welcome` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub player: PlayerId,
    pub ping_interval: Duration,
    pub reconnect_grace: Duration,
}

/// A player's open `/v1/play` socket.
#[derive(Debug)]
pub struct PlayClient {
    socket: Socket,
    config: Option<PlayConfig>,
    /// Set once `welcome` came.
    pub welcome: Option<Welcome>,
    nonce: u64,
}

impl PlayClient {
    /// Opens the socket without saying hello (for clients that want to send their own first
    /// message). `bearer` goes in the upgrade request's `Authorization` header.
    pub async fn open(url: &str, bearer: Option<&str>) -> Result<PlayClient, ClientError> {
        Ok(PlayClient {
            socket: Socket::connect(url, ConnectOptions::with_bearer(bearer)).await?,
            config: None,
            welcome: None,
            nonce: 0,
        })
    }

    /// Connects, says hello and returns after `welcome` (the player's state, if any, follows).
    pub async fn connect(config: PlayConfig) -> Result<PlayClient, ClientError> {
        let mut options = config.socket.clone();
        if config.token_in_header {
            options.bearer = Some(config.token.clone());
        }
        let socket = Socket::connect(&config.url, options).await?;
        let mut client = PlayClient {
            socket,
            config: None,
            welcome: None,
            nonce: 0,
        };
        let token = (!config.token_in_header).then(|| config.token.clone());
        client.config = Some(config);
        client.hello(token).await?;
        Ok(client)
    }

    /// Connects again with the same config, retrying with `backoff` until `attempts` failed
    /// (a refusal of the token is not retried). The old socket is closed first.
    pub async fn reconnect(
        self,
        backoff: &mut Backoff,
        attempts: u32,
    ) -> Result<PlayClient, ClientError> {
        let config = self.config.clone().ok_or(ClientError::NoConfig)?;
        let _ = self.socket.close(Duration::from_secs(2)).await;
        let mut tried = 0;
        loop {
            match PlayClient::connect(config.clone()).await {
                Ok(c) => {
                    backoff.reset();
                    return Ok(c);
                }
                Err(e) if e.is_final() => return Err(e),
                Err(e) => {
                    tried += 1;
                    if tried >= attempts {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Sends `hello` and waits for `welcome` (or the refusal).
    pub async fn hello(&mut self, token: Option<String>) -> Result<Welcome, ClientError> {
        self.send(&ClientMessage::Hello {
            v: PLAY_PROTOCOL_VERSION,
            token,
        })
        .await?;
        match self.recv_within(WELCOME_TIMEOUT).await? {
            ServerMessage::Welcome {
                player,
                ping_interval_ms,
                reconnect_grace_ms,
                ..
            } => {
                let welcome = Welcome {
                    player,
                    ping_interval: Duration::from_millis(ping_interval_ms),
                    reconnect_grace: Duration::from_millis(reconnect_grace_ms),
                };
                self.welcome = Some(welcome.clone());
                Ok(welcome)
            }
            ServerMessage::Error { code, message } => Err(ClientError::Refused { code, message }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, m: &ClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(m).expect("protocol types always serialise");
        self.raw(text).await
    }

    /// Sends a text frame as it is (for clients that test the server's answers to bad input).
    pub async fn raw(&mut self, text: String) -> Result<(), ClientError> {
        if self.socket.send_text(text).await {
            Ok(())
        } else {
            Err(ClientError::Gone)
        }
    }

    /// Sends a binary frame (the server refuses them: for tests of that).
    pub async fn raw_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        if self.socket.send_binary(bytes).await {
            Ok(())
        } else {
            Err(ClientError::Gone)
        }
    }

    /// Asks for a match in `mode` and `region`, optionally with a party and a skill rating.
    pub async fn queue(
        &mut self,
        mode: &str,
        region: &str,
        party: Option<PartySpec>,
        skill: Option<f64>,
    ) -> Result<(), ClientError> {
        self.send(&queue(mode, region, party, skill)).await
    }

    /// Leaves the queue.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.send(&ClientMessage::Cancel {}).await
    }

    /// Sends `ping` with the next nonce and returns it (the `pong` comes as a message).
    pub async fn ping(&mut self) -> Result<u64, ClientError> {
        self.nonce += 1;
        self.send(&ClientMessage::Ping { nonce: self.nonce })
            .await
            .map(|()| self.nonce)
    }

    /// The next server message (5 s at most).
    pub async fn recv(&mut self) -> Result<ServerMessage, ClientError> {
        self.recv_within(Duration::from_secs(5)).await
    }

    /// The next server message within `within`; binary frames are skipped; a close is
    /// [`ClientError::Closed`].
    pub async fn recv_within(&mut self, within: Duration) -> Result<ServerMessage, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let item = tokio::time::timeout_at(deadline, self.socket.recv())
                .await
                .map_err(|_| ClientError::Timeout(within))?;
            match item {
                Incoming::Text(t) => {
                    return serde_json::from_str(&t).map_err(|e| ClientError::Decode {
                        text: t.chars().take(200).collect(),
                        error: e.to_string(),
                    })
                }
                Incoming::Binary(_) => continue,
                Incoming::Closed(c) => return Err(ClientError::Closed(c)),
            }
        }
    }

    /// Skips messages until one matches `want` (`queue_status` updates come and go).
    pub async fn until(
        &mut self,
        within: Duration,
        want: impl Fn(&ServerMessage) -> bool,
    ) -> Result<ServerMessage, ClientError> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv_within(left).await?;
            if want(&m) {
                return Ok(m);
            }
        }
    }

    /// Reads until the server closes (5 s at most); the close frame, if one came.
    pub async fn closed(&mut self) -> Result<Option<Closed>, ClientError> {
        let wait = Duration::from_secs(5);
        tokio::time::timeout(wait, async {
            loop {
                if let Incoming::Closed(c) = self.socket.recv().await {
                    return Ok(c.frame.then_some(c));
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout(wait))?
    }

    /// The next raw item off the socket, with no timeout; cancel-safe, so a client can wait
    /// on it in a `select!` beside its own timers.
    pub async fn next_item(&mut self) -> Incoming {
        self.socket.recv().await
    }

    /// Closes politely.
    pub async fn close(self) -> Result<(), ClientError> {
        self.socket.close(Duration::from_secs(5)).await
    }

    /// Drops the connection with no close handshake.
    pub fn kill(self) {
        self.socket.kill()
    }
}

/// A `queue` message for one named region.
pub fn queue(
    mode: &str,
    region: &str,
    party: Option<PartySpec>,
    skill: Option<f64>,
) -> ClientMessage {
    ClientMessage::Queue {
        mode: mode.into(),
        region: Some(region.into()),
        latencies: None,
        party,
        skill,
    }
}

/// A `queue` message with the round trips measured to each region (milliseconds, from timing
/// the probes `GET /v1/regions` lists): the match is played in the region best for its group.
pub fn queue_by_latency(
    mode: &str,
    latencies: std::collections::BTreeMap<String, u32>,
    party: Option<PartySpec>,
    skill: Option<f64>,
) -> ClientMessage {
    ClientMessage::Queue {
        mode: mode.into(),
        region: None,
        latencies: Some(latencies),
        party,
        skill,
    }
}
