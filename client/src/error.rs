//! What can go wrong for a client.

use crate::socket::Closed;
use berth_protocol::ErrorCode;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad url or header: {0}")]
    BadUrl(String),
    #[error("nothing within {0:?}")]
    Timeout(Duration),
    #[error("the server answered the upgrade with HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("connecting failed")]
    Connect(#[source] tokio_tungstenite::tungstenite::Error),
    /// The TLS handshake failed: the server's certificate is not trusted (see
    /// [`Trust`](crate::tls::Trust)), names another host, or expired.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("the socket is gone")]
    Gone,
    #[error("closed by the peer ({closed:?})", closed = .0)]
    Closed(Closed),
    #[error("refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("an undecodable message ({error}): {text}")]
    Decode { text: String, error: String },
    #[error("unexpected: {0}")]
    Unexpected(String),
    #[error("this client was opened without a config to reconnect with")]
    NoConfig,
}

impl ClientError {
    /// Retrying the same thing cannot help: the token was refused, the server's certificate is
    /// not trusted, or the server answered the upgrade with a client error (4xx).
    pub fn is_final(&self) -> bool {
        match self {
            ClientError::Refused { .. }
            | ClientError::NoConfig
            | ClientError::BadUrl(_)
            | ClientError::Tls(_) => true,
            ClientError::Http { status, .. } => (400..500).contains(status),
            _ => false,
        }
    }

    /// A short stable label for reports and metrics.
    pub fn code(&self) -> String {
        match self {
            ClientError::BadUrl(_) => "bad_url".into(),
            ClientError::Timeout(_) => "timeout".into(),
            ClientError::Http { status, .. } => format!("http_{status}"),
            ClientError::Connect(_) => "refused".into(),
            ClientError::Tls(_) => "tls".into(),
            ClientError::Gone => "gone".into(),
            ClientError::Closed(_) => "closed".into(),
            ClientError::Refused { code, .. } => code.to_string(),
            ClientError::Decode { .. } => "undecodable".into(),
            ClientError::Unexpected(_) => "unexpected".into(),
            ClientError::NoConfig => "no_config".into(),
        }
    }
}
