//! TLS termination for Berth's public listeners (the server's, the gateway's): a certificate
//! chain and its private key, named in a config table as [`TlsFiles`], loaded at start-up into
//! an [`Acceptor`] that [`serve`](crate::serve) wraps every accepted connection with.
//!
//! rustls with the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1` (the listeners speak
//! HTTP/1.1 and websockets only). A file that cannot be read, holds no PEM certificate or key,
//! or a key that does not belong to the certificate fails start-up with an error that says
//! which of the two files is at fault ([`TlsError::field`]).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// A certificate and key loaded for serving ([`TlsFiles::load`]); cheap to clone.
#[derive(Clone)]
pub struct Acceptor(pub(crate) TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// A `[tls]` table: terminate TLS with this certificate chain and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a [`TlsFiles`] cannot be served with.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} in it")]
    Missing {
        field: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{path}: not a PEM {what}")]
    Pem {
        field: &'static str,
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key does not fit the certificate, or one of them is not usable")]
    Rejected(#[source] rustls::Error),
}

impl TlsError {
    /// Which key of the table is at fault: `cert` or `key`.
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::Read { field, .. }
            | TlsError::Missing { field, .. }
            | TlsError::Pem { field, .. } => field,
            TlsError::Rejected(_) => "key",
        }
    }

    /// A short stable label.
    pub fn code(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "unreadable",
            TlsError::Missing { .. } => "missing",
            TlsError::Pem { .. } => "bad_pem",
            TlsError::Rejected(_) => "rejected",
        }
    }
}

/// The crypto every Berth TLS server config uses: rustls's `ring` provider. rustls 0.23.48
/// deprecated it for lacking post-quantum key exchange; its alternative, aws-lc-rs, needs
/// cmake and nasm to build, which these machines do not have. Classical ECDHE it is.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// Both paths resolved against `base` where they are relative.
    pub fn relative_to(&mut self, base: &Path) {
        for p in [&mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Reads both files and builds the acceptor.
    pub fn load(&self) -> Result<Acceptor, TlsError> {
        let cert_pem = read(&self.cert, "cert")?;
        let key_pem = read(&self.key, "key")?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                field: "cert",
                path: self.cert.clone(),
                what: "certificate",
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::Missing {
                field: "cert",
                path: self.cert.clone(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| match source {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
                field: "key",
                path: self.key.clone(),
                what: "private key",
            },
            source => TlsError::Pem {
                field: "key",
                path: self.key.clone(),
                what: "private key",
                source,
            },
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rejected)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsError::Rejected)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
    }
}

fn read(path: &Path, field: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("cert.pem"), cert).expect("write");
        std::fs::write(dir.join("key.pem"), key).expect("write");
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    #[test]
    fn bad_files_say_which_one_is_at_fault() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let missing = TlsFiles {
            cert: dir.join("nonexistent.pem"),
            key: dir.join("key.pem"),
        };
        let e = missing.load().expect_err("no such file");
        assert_eq!((e.field(), e.code()), ("cert", "unreadable"), "{e}");
        let e = files(dir, "not pem", "").load().expect_err("no cert");
        assert_eq!((e.field(), e.code()), ("cert", "missing"), "{e}");
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = files(dir, cert, "nothing").load().expect_err("no key");
        assert_eq!((e.field(), e.code()), ("key", "missing"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_base() {
        let mut f = TlsFiles {
            cert: "c.pem".into(),
            key: "/etc/k.pem".into(),
        };
        f.relative_to(Path::new("/srv/berth"));
        assert_eq!(f.cert, Path::new("/srv/berth/c.pem"));
        assert_eq!(f.key, Path::new("/etc/k.pem"));
    }
}
