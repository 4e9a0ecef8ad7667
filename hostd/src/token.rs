//! hostd's credential towards the server (a host-role JWT): where it comes from, and reading
//! it again on every connect so that a renewed token file needs no restart.

use std::path::PathBuf;

/// Why the token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the server token from {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server token is empty or not a valid header value")]
    Bad,
}

impl TokenError {
    /// A short stable label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::File { .. } => "token_file",
            TokenError::Bad => "bad_token",
        }
    }
}

/// What may go into an `Authorization: Bearer` header: a JWT is base64url and dots.
pub(crate) fn is_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 8192 && t.bytes().all(|b| b.is_ascii_graphic())
}

/// Where this host's credential comes from.
#[derive(Clone, PartialEq)]
pub enum Token {
    Inline(String),
    /// Read again on every connect, so a renewed token needs no restart.
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Inline(_) => f.write_str("Inline(<redacted>)"),
            Token::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl Token {
    /// The token itself (a file's content without surrounding whitespace).
    pub fn read(&self) -> Result<String, TokenError> {
        let token = match self {
            Token::Inline(t) => t.clone(),
            Token::File(path) => std::fs::read_to_string(path)
                .map_err(|source| TokenError::File {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        if !is_token(&token) {
            return Err(TokenError::Bad);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_reread_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.jwt");
        let token = Token::File(path.clone());
        assert_eq!(token.read().map_err(|e| e.code()), Err("token_file"));
        std::fs::write(&path, "a.b.c\n").expect("write");
        assert_eq!(token.read().expect("readable"), "a.b.c");
        std::fs::write(&path, "d.e.f").expect("write");
        assert_eq!(token.read().expect("renewed"), "d.e.f");
        std::fs::write(&path, "  \n").expect("write");
        assert_eq!(token.read().map_err(|e| e.code()), Err("bad_token"));
        assert!(!format!("{:?}", Token::Inline("secret".into())).contains("secret"));
    }
}
