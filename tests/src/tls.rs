//! Test certificates, generated per test with `rcgen`: a CA, a server certificate for
//! `127.0.0.1`/`localhost`/`::1` signed by it, and a client certificate signed by it.
//!
//! Key type: [`Pki`]; every file is PEM, in one temporary directory removed on drop.
//! Keys are ECDSA P-256 (fast to generate, accepted by Go's TLS and by rustls).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA with one server and one client certificate. See the module docs.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates everything into a fresh directory.
    pub fn generate() -> Result<Pki> {
        let dir = tempfile::Builder::new().prefix("pullbox-pki-").tempdir()?;
        let name = |cn: &str| {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            dn
        };

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name("pullbox test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server.distinguished_name = name("127.0.0.1");
        server.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server.subject_alt_names.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::default();
        client.distinguished_name = name("pullbox test client");
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key)?;

        let d = dir.path();
        fs::write(d.join("ca.pem"), ca_cert.pem())?;
        fs::write(d.join("server.pem"), server_cert.pem())?;
        fs::write(d.join("server.key"), server_key.serialize_pem())?;
        fs::write(d.join("client.pem"), client_cert.pem())?;
        fs::write(d.join("client.key"), client_key.serialize_pem())?;
        // A CA that signed nothing here: trusting it must not help.
        let other_key = KeyPair::generate()?;
        let mut other = CertificateParams::default();
        other.distinguished_name = name("unrelated CA");
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        fs::write(d.join("other-ca.pem"), other.self_signed(&other_key)?.pem())?;
        Ok(Pki { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// A CA certificate that signed none of the others.
    pub fn other_ca(&self) -> PathBuf {
        self.dir().join("other-ca.pem")
    }

    /// The server certificate and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir().join("server.pem"), self.dir().join("server.key"))
    }

    /// The client certificate and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.dir().join("client.pem"), self.dir().join("client.key"))
    }
}
