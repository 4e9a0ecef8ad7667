//! Certificates made at test time, so TLS tests need no files in the repository and no
//! network: [`TestCa::new`] makes a private CA and a server certificate it signed for
//! `localhost` and `127.0.0.1`, and writes them as PEM files into a temporary folder (removed
//! with the `TestCa`). Serve with [`TestCa::files`] (the server's and the gateway's `[tls]`
//! table); trust with [`TestCa::trust`] or the file at [`TestCa::ca`] (hostd's `[server] ca`,
//! berth-sim's `--ca`). Two `TestCa`s do not trust each other.

use berth_client::Trust;
use berth_net::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A private CA and a server certificate for `localhost`/`127.0.0.1`, as PEM files.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    /// SHA-256 of the server key's SubjectPublicKeyInfo, base64.
    spki: String,
}

impl TestCa {
    /// Makes the CA and the server certificate and writes `ca.pem`, `cert.pem` (the server's
    /// chain: its certificate, then the CA's) and `key.pem`.
    pub fn new() -> anyhow::Result<TestCa> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Berth test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer)?;
        let dir = tempfile::Builder::new().prefix("berth-tls-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        std::fs::write(
            dir.path().join("cert.pem"),
            format!("{}{}", cert.pem(), ca_cert.pem()),
        )?;
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem())?;
        let spki = {
            use base64::Engine as _;
            use rcgen::PublicKeyData as _;
            use sha2::Digest as _;
            let hash = sha2::Sha256::digest(key.subject_public_key_info());
            base64::engine::general_purpose::STANDARD.encode(hash)
        };
        Ok(TestCa { dir, spki })
    }

    /// The server key's pin (SHA-256 of its SubjectPublicKeyInfo, base64): what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes, to trust this server and no other.
    pub fn spki(&self) -> &str {
        &self.spki
    }

    /// The CA certificate (PEM): what a client is told to trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server's `[tls]` table: its certificate chain and key.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.path().join("cert.pem"),
            key: self.dir.path().join("key.pem"),
        }
    }

    /// A client's trust: Mozilla's roots and this CA.
    pub fn trust(&self) -> Trust {
        Trust::with_ca_file(&self.ca()).expect("the test CA is a valid PEM certificate")
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
