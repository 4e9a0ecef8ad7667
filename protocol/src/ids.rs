//! Newtype identifiers. Each is a short printable string: letters, digits, `-`, `_` and `.`,
//! 1 to 64 bytes, not starting with `.` (no `.`/`..`, no hidden files), so that it can be used
//! in file names, XenStore paths and log fields safely.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a valid identifier is, for messages that refuse one.
pub const ID_RULE: &str = "1-64 letters, digits, '-', '_' or '.', not starting with '.'";

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than 64 bytes")]
    TooLong { kind: &'static str },
    #[error("{kind} contains {found:?}; only letters, digits, '-', '_' and '.' are allowed")]
    BadChar { kind: &'static str, found: char },
    #[error("{kind} must not start with '.'")]
    LeadingDot { kind: &'static str },
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > 64 {
        return Err(IdError::TooLong { kind });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar { kind, found });
    }
    if s.starts_with('.') {
        return Err(IdError::LeadingDot { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($kind, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A game session: the idempotency key for activation.
    SessionId,
    "session id"
);
id_type!(
    /// One virtual machine on one host.
    VmId,
    "vm id"
);
id_type!(
    /// One hostd.
    HostId,
    "host id"
);
id_type!(
    /// One player.
    PlayerId,
    "player id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        assert_eq!(
            SessionId::new("s-1.a_b").map(String::from),
            Ok("s-1.a_b".into())
        );
    }

    #[test]
    fn rejects_path_tricks_and_empties() {
        assert!(matches!(VmId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(VmId::new("../x"), Err(IdError::BadChar { .. })));
        // A leading dot is refused for what it is (a '.' elsewhere is fine).
        let e = SessionId::new(".x").expect_err("leading dot");
        assert_eq!(e, IdError::LeadingDot { kind: "session id" });
        assert_eq!(e.to_string(), "session id must not start with '.'");
        assert!(HostId::new("..").is_err() && HostId::new("a.b").is_ok());
        assert!(matches!(
            VmId::new("a/b"),
            Err(IdError::BadChar { found: '/', .. })
        ));
        assert!(matches!(
            VmId::new("x".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn deserialising_validates() {
        let bad: Result<SessionId, _> = serde_json::from_str("\"a b\"");
        assert!(bad.is_err());
        let good: SessionId = serde_json::from_str("\"ab\"").expect("valid id");
        assert_eq!(good.as_str(), "ab");
    }
}
