//! Websocket close codes, the same meaning on every Berth socket (`/v1/play`, `/v1/hosts`, the
//! gateway's `/v1/game`). 4000–4999 are the application's; each follows an `error` frame whose
//! code says more (see `docs/protocol.md` for what a client should do on each).

/// The other side finished normally (the game closed after `ended` or `leave`).
pub const NORMAL: u16 = 1000;
/// Going away: the server or hostd is stopping, or the session's VM is going.
pub const GOING_AWAY: u16 = 1001;
/// A text frame that is not UTF-8 (reason `invalid_utf8`).
pub const INVALID_DATA: u16 = 1007;
/// A frame over the socket's size limit.
pub const TOO_BIG: u16 = 1009;
/// The service behind could not be reached (the game server, from the gateway).
pub const UNREACHABLE: u16 = 1011;
/// The peer broke the protocol (no hello or join first, wrong version, wrong host id).
pub const PROTOCOL: u16 = 4400;
/// Authentication failed (token or ticket).
pub const AUTH: u16 = 4401;
/// No such thing here (the session is not on this host).
pub const NOT_FOUND: u16 = 4404;
/// Silent for too long (no hello or join in time, idle, no pong).
pub const TIMEOUT: u16 = 4408;
/// Another connection took over (same player, host or ticket).
pub const CONFLICT: u16 = 4409;
/// Too many messages.
pub const RATE_LIMITED: u16 = 4429;
