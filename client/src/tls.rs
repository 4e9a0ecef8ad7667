//! Which servers a Berth client trusts over TLS (`wss://`, `https://`): Mozilla's roots, built
//! in ([`Trust::roots`], the default of every socket), plus, optionally, a private CA of the
//! deployment's own ([`Trust::with_ca_file`]) — what hostd's `[server] ca`, berth-sim's `--ca`
//! and tests use. rustls with the `ring` provider; certificates are checked against the URL's
//! host name or IP address as usual.
//!
//! A [`Trust`] is cheap to clone (one shared rustls config), so thousands of sockets can share
//! one.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Why a CA file cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: not a usable CA certificate")]
    Rejected {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

impl TrustError {
    /// A short stable label.
    pub fn code(&self) -> &'static str {
        match self {
            TrustError::Read { .. } => "unreadable",
            TrustError::NoCertificate { .. } => "missing",
            TrustError::Pem { .. } => "bad_pem",
            TrustError::Rejected { .. } => "rejected",
        }
    }
}

/// The roots a client checks a server's certificate chain against.
#[derive(Clone)]
pub struct Trust {
    config: Arc<ClientConfig>,
    /// The extra CA file, for `Debug`.
    ca: Option<PathBuf>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("ca", &self.ca).finish()
    }
}

impl Default for Trust {
    fn default() -> Self {
        Trust::roots()
    }
}

impl Trust {
    /// Mozilla's roots (`webpki-roots`), as a browser or phone trusts a public server.
    pub fn roots() -> Trust {
        static ROOTS: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        let config = ROOTS.get_or_init(|| Arc::new(config(webpki_store())));
        Trust {
            config: config.clone(),
            ca: None,
        }
    }

    /// Mozilla's roots and the CA certificates in the PEM file at `path` (a private CA that
    /// signed the deployment's server and gateway certificates).
    pub fn with_ca_file(path: &Path) -> Result<Trust, TrustError> {
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TrustError::Pem {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TrustError::NoCertificate {
                path: path.to_owned(),
            });
        }
        let mut store = webpki_store();
        for cert in certs {
            store.add(cert).map_err(|source| TrustError::Rejected {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(Trust {
            config: Arc::new(config(store)),
            ca: Some(path.to_owned()),
        })
    }

    /// [`Trust::roots`], or with the CA file at `ca` when one is given.
    pub fn from_ca(ca: Option<&Path>) -> Result<Trust, TrustError> {
        ca.map_or_else(|| Ok(Trust::roots()), Trust::with_ca_file)
    }

    /// The rustls config (for an HTTPS client such as reqwest's `use_preconfigured_tls`).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The websocket connector that checks servers against these roots.
    pub fn connector(&self) -> tokio_tungstenite::Connector {
        tokio_tungstenite::Connector::Rustls(self.config.clone())
    }
}

fn webpki_store() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A client config on rustls's `ring` provider (deprecated in rustls 0.23.48 for lacking
/// post-quantum key exchange; aws-lc-rs, the alternative, needs cmake and nasm to build).
#[allow(deprecated)]
fn config(roots: RootCertStore) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Websockets and Berth's HTTP API are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// Whether a connect error is a failed TLS handshake (the server's certificate is not trusted,
/// has the wrong name, or expired; or no TLS there), and if so rustls's reason.
pub fn handshake_error(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Tls(e) => Some(e.to_string()),
        Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|e| e.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let e = Trust::with_ca_file(&dir.join("nonexistent.pem")).expect_err("no file");
        assert_eq!(e.code(), "unreadable");
        assert!(e.to_string().contains("nonexistent.pem"), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no pem here").expect("write");
        let e = Trust::with_ca_file(&empty).expect_err("no certificate");
        assert_eq!(e.code(), "missing", "{e}");
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = Trust::with_ca_file(&junk).expect_err("not a certificate");
        assert_eq!(e.code(), "rejected", "{e}");
        assert!(format!("{:?}", Trust::roots()).contains("None"));
    }
}
