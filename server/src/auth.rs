//! Who is talking: JWTs for players, hosts and admins (one pinned algorithm, issuer, audience,
//! expiry and not-before checked), and the per-session tickets the server mints for players.

use crate::config::{Algorithm, AuthConfig};
use crate::util::now_ms;
use berth_protocol::ticket::{TicketClaims, TICKET_AUDIENCE};
use berth_protocol::{PlayerId, SessionId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Player,
    Host,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Player => "player",
            Role::Host => "host",
            Role::Admin => "admin",
        }
    }
}

fn default_role() -> Role {
    Role::Player
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default = "default_role")]
    pub role: Role,
}

/// Why a token was refused; `code()` is what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send it as a bearer header or in the hello message")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (its nbf is in the future)")]
    Early,
    #[error("token is for another audience")]
    Audience,
    #[error("token is from another issuer")]
    Issuer,
    #[error("token is signed with an algorithm this server does not accept")]
    Algorithm,
    #[error("token signature does not verify")]
    Signature,
    #[error("token is malformed")]
    Malformed,
    #[error("token's role is {found}, this needs {needed}")]
    Role {
        found: &'static str,
        needed: &'static str,
    },
    #[error("token's subject is not a valid id: {0}")]
    Subject(String),
    #[error("this server cannot mint tokens (no signing key configured)")]
    CannotMint,
    #[error("auth key: {0}")]
    Key(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "expired_token",
            AuthError::Early => "early_token",
            AuthError::Audience => "wrong_audience",
            AuthError::Issuer => "wrong_issuer",
            AuthError::Algorithm => "bad_algorithm",
            AuthError::Signature => "bad_signature",
            AuthError::Malformed => "bad_token",
            AuthError::Role { .. } => "wrong_role",
            AuthError::Subject(_) => "bad_subject",
            AuthError::CannotMint => "cannot_mint",
            AuthError::Key(_) => "bad_key",
        }
    }
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::Early,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
            ErrorKind::InvalidSignature => AuthError::Signature,
            _ => AuthError::Malformed,
        }
    }
}

/// The `alg` a token's header names, read without trusting anything else in the token.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&json).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

/// Verifies (and, with a signing key, mints) the deployment's JWTs.
pub struct Auth {
    alg: jsonwebtoken::Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    pub dev_tokens: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("alg", &self.alg).finish()
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Key(format!("{}: {e}", path.display())))
}

impl Auth {
    pub fn new(c: &AuthConfig) -> Result<Self, AuthError> {
        let key_err = |e: jsonwebtoken::errors::Error| AuthError::Key(e.to_string());
        let (alg, decoding, encoding) = match c.algorithm {
            Algorithm::HS256 => {
                let secret = match &c.secret_file {
                    Some(p) => read(p)?,
                    None => c.secret.clone().into_bytes(),
                };
                let secret = secret.trim_ascii().to_vec();
                if secret.len() < 16 {
                    return Err(AuthError::Key(
                        "auth.secret must be at least 16 bytes (or set BERTH_AUTH_SECRET)".into(),
                    ));
                }
                (
                    jsonwebtoken::Algorithm::HS256,
                    DecodingKey::from_secret(&secret),
                    Some(EncodingKey::from_secret(&secret)),
                )
            }
            Algorithm::RS256 | Algorithm::EdDSA => {
                let pem = read(c.public_key_file.as_deref().ok_or_else(|| {
                    AuthError::Key("auth.public_key_file is needed for RS256/EdDSA".into())
                })?)?;
                let private = c.private_key_file.as_deref().map(read).transpose()?;
                if c.algorithm == Algorithm::RS256 {
                    (
                        jsonwebtoken::Algorithm::RS256,
                        DecodingKey::from_rsa_pem(&pem).map_err(key_err)?,
                        private
                            .map(|p| EncodingKey::from_rsa_pem(&p))
                            .transpose()
                            .map_err(key_err)?,
                    )
                } else {
                    (
                        jsonwebtoken::Algorithm::EdDSA,
                        DecodingKey::from_ed_pem(&pem).map_err(key_err)?,
                        private
                            .map(|p| EncodingKey::from_ed_pem(&p))
                            .transpose()
                            .map_err(key_err)?,
                    )
                }
            }
        };
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&c.issuer]);
        validation.set_audience(&[&c.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // `nbf` is optional, but checked when present, with the same leeway as `exp`.
        validation.validate_nbf = true;
        validation.leeway = 5;
        Ok(Auth {
            alg,
            decoding,
            encoding,
            validation,
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            dev_tokens: c.dev_tokens,
        })
    }

    /// Checks `token` and that it carries `role`.
    pub fn verify(&self, token: &str, role: Role) -> Result<Claims, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| self.refusal(token, e))?;
        if data.claims.role != role {
            return Err(AuthError::Role {
                found: data.claims.role.as_str(),
                needed: role.as_str(),
            });
        }
        Ok(data.claims)
    }

    /// Why `token` was refused. A header naming an algorithm the JWT library has no name for
    /// (`none`) fails to decode as a whole, so it would read as malformed: it is an algorithm
    /// this server does not accept, and says so.
    fn refusal(&self, token: &str, e: jsonwebtoken::errors::Error) -> AuthError {
        let e = AuthError::from(e);
        let foreign = header_alg(token)
            .is_some_and(|alg| alg.parse::<jsonwebtoken::Algorithm>().ok() != Some(self.alg));
        match e {
            AuthError::Malformed if foreign => AuthError::Algorithm,
            e => e,
        }
    }

    /// A player's id from a verified player token.
    pub fn verify_player(&self, token: &str) -> Result<PlayerId, AuthError> {
        let claims = self.verify(token, Role::Player)?;
        PlayerId::new(claims.sub).map_err(|e| AuthError::Subject(e.to_string()))
    }

    /// Mints a token for `sub` with `role`, valid `ttl_s` seconds.
    pub fn mint(&self, sub: &str, role: Role, ttl_s: u64) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or(AuthError::CannotMint)?;
        let now = now_ms() / 1000;
        let claims = Claims {
            sub: sub.to_owned(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: now + ttl_s,
            iat: now,
            role,
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, key)
            .map_err(|e| AuthError::Key(e.to_string()))
    }

    /// Mints a session ticket for `player` in `session`, signed with the session's key.
    pub fn ticket(
        &self,
        key_hex: &str,
        session: &SessionId,
        player: &PlayerId,
        ttl_ms: u64,
    ) -> Result<(String, u64), AuthError> {
        let key = hex::decode(key_hex).map_err(|e| AuthError::Key(e.to_string()))?;
        let now = now_ms();
        let expires_ms = now + ttl_ms;
        let claims = TicketClaims {
            sub: player.clone(),
            sid: session.clone(),
            aud: TICKET_AUDIENCE.to_owned(),
            iss: self.issuer.clone(),
            exp: expires_ms.div_ceil(1000),
            iat: now / 1000,
            jti: crate::util::random_id(),
        };
        // `kid` names the session, so a gateway holding many sessions' keys picks the right
        // one before verifying (and then checks `sid` says the same).
        let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(session.to_string());
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key))
            .map_err(|e| AuthError::Key(e.to_string()))?;
        Ok((token, expires_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth() -> Auth {
        Auth::new(&AuthConfig {
            secret: "0123456789abcdef0123".into(),
            ..AuthConfig::default()
        })
        .expect("valid config")
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn roles_expiry_audience_and_alg_none() {
        let a = auth();
        let t = a.mint("alice", Role::Player, 60).expect("mint");
        assert_eq!(a.verify_player(&t).expect("valid").as_str(), "alice");
        let e = a.verify(&t, Role::Admin).expect_err("not admin");
        assert_eq!(e.code(), "wrong_role");

        let other = Auth::new(&AuthConfig {
            secret: "0123456789abcdef0123".into(),
            audience: "someone-else".into(),
            ..AuthConfig::default()
        })
        .expect("valid");
        let t2 = other.mint("alice", Role::Player, 60).expect("mint");
        assert_eq!(
            a.verify_player(&t2).expect_err("aud").code(),
            "wrong_audience"
        );

        let now = now_ms() / 1000;
        let claims = serde_json::json!({"sub":"alice","iss":"berth","aud":"berth","exp": now + 60});
        // `alg: none` (any case) is an algorithm this server does not accept, for every role.
        for alg in ["none", "None", "NONE"] {
            let head = b64(&serde_json::json!({"alg": alg, "typ": "JWT"}));
            for (role, name) in [
                (Role::Player, "player"),
                (Role::Host, "host"),
                (Role::Admin, "admin"),
            ] {
                let claims = serde_json::json!({"sub":"alice","iss":"berth","aud":"berth",
                    "exp": now + 60, "role": name});
                let none = format!("{head}.{}.", b64(&claims));
                let e = a.verify(&none, role).expect_err("alg none");
                assert_eq!(e.code(), "bad_algorithm", "{alg} {name}: {e:?}");
            }
        }
        let no_alg = format!(
            "{}.{}.",
            b64(&serde_json::json!({"typ":"JWT"})),
            b64(&claims)
        );
        assert_eq!(
            a.verify_player(&no_alg).expect_err("no alg").code(),
            "bad_token"
        );
        assert_eq!(
            a.verify_player("").expect_err("empty").code(),
            "missing_token"
        );
        assert_eq!(
            a.verify_player("x.y.z").expect_err("junk").code(),
            "bad_token"
        );
    }

    /// Generates a key pair with the openssl CLI (Debian's `openssl`, on every machine here).
    fn keypair(dir: &std::path::Path, alg: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (private, public) = (
            dir.join(format!("{alg}.key")),
            dir.join(format!("{alg}.pub")),
        );
        let gen: &[&str] = if alg == "ed25519" {
            &["genpkey", "-algorithm", "ed25519"]
        } else {
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ]
        };
        let ok = std::process::Command::new("openssl")
            .args(gen)
            .arg("-out")
            .arg(&private)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl genpkey");
        let ok = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl pkey -pubout");
        (private, public)
    }

    #[test]
    fn rs256_and_eddsa_keys_verify_and_are_pinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tokens = Vec::new();
        for (alg, name) in [(Algorithm::RS256, "rsa"), (Algorithm::EdDSA, "ed25519")] {
            let (private, public) = keypair(dir.path(), name);
            let signer = Auth::new(&AuthConfig {
                algorithm: alg,
                public_key_file: Some(public.clone()),
                private_key_file: Some(private),
                ..AuthConfig::default()
            })
            .expect("signer");
            let verifier = Auth::new(&AuthConfig {
                algorithm: alg,
                public_key_file: Some(public),
                ..AuthConfig::default()
            })
            .expect("verify-only");
            assert_eq!(
                verifier
                    .mint("x", Role::Player, 60)
                    .expect_err("no key")
                    .code(),
                "cannot_mint"
            );
            let t = signer.mint("alice", Role::Player, 60).expect("mint");
            assert_eq!(
                verifier.verify_player(&t).expect("verifies").as_str(),
                "alice"
            );
            tokens.push((alg, t, verifier));
        }
        // Each verifier refuses the other algorithm's token, and an HS256 server refuses both.
        let hs = auth();
        for (i, (_, t, _)) in tokens.iter().enumerate() {
            let other = &tokens[1 - i].2;
            assert_eq!(
                other.verify_player(t).expect_err("pinned").code(),
                "bad_algorithm"
            );
            assert_eq!(
                hs.verify_player(t).expect_err("pinned").code(),
                "bad_algorithm"
            );
        }
    }

    fn signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .expect("encode")
    }

    #[test]
    fn not_before_is_checked_with_the_expiry_leeway() {
        let a = auth();
        let now = now_ms() / 1000;
        let token = |nbf: u64| {
            signed(&serde_json::json!({"sub":"bob","iss":"berth","aud":"berth",
                "exp": now + 7200, "nbf": nbf}))
        };
        let e = a
            .verify_player(&token(now + 3600))
            .expect_err("an hour early");
        assert_eq!(e.code(), "early_token", "{e:?}");
        assert_eq!(
            a.verify_player(&token(now + 60)).expect_err("early").code(),
            "early_token"
        );
        // Within the leeway (clocks differ a little), and in the past: valid.
        assert!(a.verify_player(&token(now + 3)).is_ok());
        assert!(a.verify_player(&token(now - 60)).is_ok());
    }

    #[test]
    fn an_hs256_secret_is_its_raw_bytes_trimmed() {
        // Valid base64, and used as the text it is (what docs/operations.md promises).
        let text = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let a = Auth::new(&AuthConfig {
            secret: format!("  {text}\n"),
            ..AuthConfig::default()
        })
        .expect("valid secret");
        let now = now_ms() / 1000;
        let claims = serde_json::json!({"sub":"bob","iss":"berth","aud":"berth","exp": now + 60});
        let sign = |key: &[u8]| {
            jsonwebtoken::encode(
                &Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(key),
            )
            .expect("encode")
        };
        assert!(a.verify_player(&sign(text.as_bytes())).is_ok());
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64");
        let e = a.verify_player(&sign(&decoded)).expect_err("not decoded");
        assert_eq!(e.code(), "bad_signature");
    }

    #[test]
    fn expired_token_is_refused() {
        let a = auth();
        let now = now_ms() / 1000;
        let claims = Claims {
            sub: "bob".into(),
            iss: "berth".into(),
            aud: "berth".into(),
            exp: now - 120,
            iat: now - 180,
            role: Role::Player,
        };
        let t = jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .expect("encode");
        assert_eq!(
            a.verify_player(&t).expect_err("expired").code(),
            "expired_token"
        );
    }
}
