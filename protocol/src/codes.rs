//! The vocabularies Berth's messages carry as strings, as types: error codes, session end
//! reasons, dequeue reasons, activation paths, substrate states and region rules.
//!
//! Each is an enum whose wire form is exactly the string it always was (`as_str()`), so the
//! protocol does not change by being typed. Two kinds:
//! - **open** vocabularies ([`ErrorCode`], [`EndReason`], [`DequeueReason`]) may grow, and a
//!   game names its own end reasons: a string no variant knows is kept as `Other(String)`
//!   rather than refused, so an older client still decodes a newer server's messages;
//! - **closed** vocabularies ([`ActivationPath`], [`SubstrateState`]) are Berth's own and
//!   complete: an unknown string is a decoding error.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Declares a wire vocabulary: the enum, `as_str()`, `Display`, `FromStr` and serde as the
/// plain string. `open` adds an `Other(String)` variant for strings it does not know.
macro_rules! vocabulary {
    (@common $name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
    (open $(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A string this version does not know, kept as it came.
            Other(String),
        }
        impl $name {
            /// Every variant this version knows (not `Other`).
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)*];
            /// The wire form.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)*
                    $name::Other(s) => s,
                }
            }
        }
        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(match s {
                    $($wire => $name::$variant,)*
                    other => $name::Other(other.to_owned()),
                })
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s.parse() {
                    Ok(v) => v,
                    Err(never) => match never {},
                }
            }
        }
        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name::from(s.as_str())
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                match $name::from(s.as_str()) {
                    $name::Other(_) => $name::Other(s),
                    known => known,
                }
            }
        }
        vocabulary!(@common $name);
    };
    (closed $(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }
        impl $name {
            /// Every variant.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// The wire form.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)*
                }
            }
        }
        impl std::str::FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)*
                    other => Err(UnknownValue {
                        what: stringify!($name),
                        value: $crate::clip(other, $crate::ECHO_MAX_CHARS).into_owned(),
                    }),
                }
            }
        }
        vocabulary!(@common $name);
    };
}

/// A string that is not one of a closed vocabulary's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

vocabulary!(open
    /// The stable `code` of every refusal a Berth service sends: the `error` messages of the
    /// player socket (`/v1/play`), the host socket (`/v1/hosts`) and the gateway (`/v1/game`),
    /// hostd's `activate_failed`, and the [`ErrorBody`](crate::api::ErrorBody) of the admin
    /// API, hostd's control API and the dev-token endpoint. `docs/protocol.md` says which
    /// boundary sends which, and what a client should do.
    ErrorCode {
        // Frames and messages, on every socket.
        BadJson = "bad_json",
        UnknownType = "unknown_type",
        BadMessage = "bad_message",
        BinaryNotSupported = "binary_not_supported",
        UnsupportedVersion = "unsupported_version",
        RateLimited = "rate_limited",
        Replaced = "replaced",
        ShuttingDown = "shutting_down",
        SlowConsumer = "slow_consumer",
        /// The listener's cap on connections (not yet past `hello`/`register` on the server;
        /// all of them on the gateway): HTTP 503 before the request is read.
        TooManyConnections = "too_many_connections",
        // Tokens (player, host and admin JWTs).
        MissingToken = "missing_token",
        ExpiredToken = "expired_token",
        EarlyToken = "early_token",
        WrongAudience = "wrong_audience",
        WrongIssuer = "wrong_issuer",
        BadAlgorithm = "bad_algorithm",
        BadSignature = "bad_signature",
        BadToken = "bad_token",
        WrongRole = "wrong_role",
        BadSubject = "bad_subject",
        // The player socket.
        ServerFull = "server_full",
        HelloTimeout = "hello_timeout",
        HelloRequired = "hello_required",
        AlreadyHello = "already_hello",
        UnknownMode = "unknown_mode",
        UnknownRegion = "unknown_region",
        /// `queue` names both a region and latencies, or neither.
        RegionOrLatencies = "region_or_latencies",
        /// `queue.latencies` is empty, too long, or has a bad region name or value.
        BadLatencies = "bad_latencies",
        BadSkill = "bad_skill",
        BadParty = "bad_party",
        PartyTooBig = "party_too_big",
        PartyFull = "party_full",
        AlreadyQueued = "already_queued",
        InSession = "in_session",
        NotQueued = "not_queued",
        StoreUnavailable = "store_unavailable",
        StoreCorrupt = "store_corrupt",
        // The admin API's session moves (`POST /v1/admin/sessions/{id}/migrate`).
        NotActive = "not_active",
        MigrationInFlight = "migration_in_flight",
        NoTarget = "no_target",
        MigrationFailed = "migration_failed",
        // The host socket.
        RegisterTimeout = "register_timeout",
        RegisterRequired = "register_required",
        WrongHost = "wrong_host",
        /// `register.region` or `zone` is not a name.
        BadRegion = "bad_region",
        AlreadyRegistered = "already_registered",
        ForeignSession = "foreign_session",
        // The gateway.
        JoinTimeout = "join_timeout",
        JoinFirst = "join_first",
        BadTicket = "bad_ticket",
        TicketExpired = "ticket_expired",
        WrongSession = "wrong_session",
        NotAPlayer = "not_a_player",
        UnknownSession = "unknown_session",
        TicketInUse = "ticket_in_use",
        GameUnreachable = "game_unreachable",
        BadFrame = "bad_frame",
        GameOver = "game_over",
        SessionMoved = "session_moved",
        // hostd's pool (`activate_failed`, the control API).
        UnknownImage = "unknown_image",
        UnknownVm = "unknown_vm",
        AtCapacity = "at_capacity",
        NotDocked = "not_docked",
        ActivationFailed = "activation_failed",
        /// hostd is draining: no new sessions (`activate_failed`; the control API's 503).
        Draining = "draining",
        // HTTP APIs (admin, control, dev tokens).
        BadRequest = "bad_request",
        BadId = "bad_id",
        BadLimit = "bad_limit",
        BadQuery = "bad_query",
        BadState = "bad_state",
        UnknownHost = "unknown_host",
        NotLive = "not_live",
        DevTokensDisabled = "dev_tokens_disabled",
        NoGateway = "no_gateway",
        BadPlayer = "bad_player",
        BadRole = "bad_role",
        CannotMint = "cannot_mint",
    }
);

vocabulary!(open
    /// Why a session ended (`session_ended.reason`, the admin API's `end_reason`). The
    /// variants are Berth's own reasons; a game's own reason (the arena's `score_limit`,
    /// `time_limit`, `surrender`, `forfeit`, `abandoned`, or any other game's) travels as
    /// `Other`.
    EndReason {
        /// The game ended without naming a reason.
        GameOver = "game_over",
        /// An operator ended it.
        Admin = "admin",
        /// It reached its deadline.
        Deadline = "deadline",
        /// The VM died or stopped answering.
        VmFailed = "vm_failed",
        /// The host came back without the session's VM.
        VmLost = "vm_lost",
        /// The host stopped heartbeating.
        HostLost = "host_lost",
        /// No host could run it.
        PlacementFailed = "placement_failed",
        /// The game server's process died after activation.
        GameCrashed = "game_crashed",
        /// The game server stopped calling the SDK's `health`.
        GameUnhealthy = "game_unhealthy",
    }
);

impl EndReason {
    /// Whether the game ended the session (`game_over` or a reason of its own), rather than
    /// Berth (an operator, a deadline, a failure of the VM, the host or placement).
    pub fn is_the_games(&self) -> bool {
        matches!(self, EndReason::GameOver | EndReason::Other(_))
    }

    /// A game's own reason: empty means it named none (`game_over`).
    pub fn from_game(reason: &str) -> Self {
        if reason.is_empty() {
            EndReason::GameOver
        } else {
            EndReason::from(reason)
        }
    }
}

vocabulary!(open
    /// Why a ticket left the queue (`dequeued.reason`).
    DequeueReason {
        Cancelled = "cancelled",
        MaxWait = "max_wait",
        Away = "away",
        ModeRemoved = "mode_removed",
        /// The store lost the ticket (a restart without persistence).
        TicketLost = "ticket_lost",
    }
);

vocabulary!(closed
    /// How a session's VM came to run it (`activated.path`, the control API's `path`, the
    /// `active` transition's note in a session's history).
    ActivationPath {
        /// A warm clone, restored and pre-warmed ahead, got the identity.
        Warm = "warm",
        /// A clone restored from the docked substrate on demand.
        Substrate = "substrate",
        /// Booted from the image (no substrate).
        Cold = "cold",
        /// A VM an earlier hostd left running, taken over after a restart.
        Adopted = "adopted",
        /// Migrated live from another host (its VM moved here running).
        Migrated = "migrated",
        /// The server learnt of it from the host's register (the `activated` was lost).
        Reconciled = "reconciled",
    }
);

vocabulary!(closed
    /// Where an image's substrate is on a host (hostd's `/v1/status`).
    SubstrateState {
        Missing = "missing",
        Priming = "priming",
        Docked = "docked",
        Failed = "failed",
    }
);

vocabulary!(closed
    /// How a match's region was chosen.
    RegionRule {
        /// The players queued for that region by name.
        Named = "named",
        /// The players queued with latencies: of the regions every player reaches within the
        /// allowed latency, the one with the group's lowest worst latency.
        Latency = "latency",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_are_the_plain_strings() {
        assert_eq!(
            serde_json::to_string(&ErrorCode::RateLimited).expect("ser"),
            r#""rate_limited""#
        );
        let c: ErrorCode = serde_json::from_str(r#""in_session""#).expect("de");
        assert_eq!(c, ErrorCode::InSession);
        assert_eq!(ActivationPath::Warm.to_string(), "warm");
        assert_eq!(
            serde_json::from_str::<SubstrateState>(r#""docked""#).expect("de"),
            SubstrateState::Docked
        );
    }

    #[test]
    fn open_vocabularies_keep_unknown_strings() {
        let r: EndReason = serde_json::from_str(r#""score_limit""#).expect("de");
        assert_eq!(r, EndReason::Other("score_limit".into()));
        assert_eq!(serde_json::to_string(&r).expect("ser"), r#""score_limit""#);
        assert_eq!(EndReason::from_game(""), EndReason::GameOver);
        assert_eq!(EndReason::from_game("admin"), EndReason::Admin);
        assert_eq!(ErrorCode::from("nope").as_str(), "nope");
    }

    #[test]
    fn closed_vocabularies_refuse_unknown_strings() {
        let e = serde_json::from_str::<ActivationPath>(r#""teleported""#).expect_err("closed");
        assert!(
            e.to_string()
                .contains("unknown ActivationPath `teleported`"),
            "{e}"
        );
    }

    #[test]
    fn every_known_value_round_trips() {
        for c in ErrorCode::KNOWN {
            assert_eq!(&c.as_str().parse::<ErrorCode>().expect("parse"), c);
        }
        for r in EndReason::KNOWN {
            assert_eq!(&EndReason::from(r.as_str()), r);
        }
        for p in ActivationPath::ALL {
            assert_eq!(&p.as_str().parse::<ActivationPath>().expect("parse"), p);
        }
        for s in SubstrateState::ALL {
            assert_eq!(&s.as_str().parse::<SubstrateState>().expect("parse"), s);
        }
    }
}
