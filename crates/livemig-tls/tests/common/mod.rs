//! Test PKI: a CA and leaf certificates generated with rcgen, written as PEM
//! files to a per-test temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livemig::transport::{Endpoint, Transport};
use livemig_tls::{connect_tls, TlsConfig, TlsIdentity, TlsListener};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "livemig-tls-{tag}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority whose files live in a temporary directory.
pub struct Pki {
    pub dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("livemig test CA {tag}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki { dir, ca, ca_file }
    }

    /// Issues a certificate for `sans` (DNS names or IP addresses) usable
    /// both as a server and as a client; returns (chain file, key file).
    pub fn issue(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_file = self.dir.path().join(format!("{name}.crt"));
        let key_file = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_file, key_file)
    }

    /// A [`TlsConfig`] for a new host certificate valid for localhost and
    /// 127.0.0.1, trusting this CA.
    pub fn host(&self, name: &str) -> TlsConfig {
        let (cert_chain, key) = self.issue(name, &["localhost", "127.0.0.1"]);
        TlsConfig {
            cert_chain,
            key,
            ca: self.ca_file.clone(),
            server_name: None,
        }
    }

    pub fn identity(&self, name: &str) -> TlsIdentity {
        self.host(name).load().unwrap()
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn loopback() -> Endpoint {
    "tcp:127.0.0.1:0".parse().unwrap()
}

/// A connected (client, server) TLS pair over TCP loopback.
pub fn tls_pair(
    client: &TlsIdentity,
    server: &TlsIdentity,
) -> (Box<dyn Transport>, Box<dyn Transport>) {
    let l = TlsListener::bind(&loopback(), server).unwrap();
    let ep = l.local_endpoint().clone();
    let id = client.clone();
    let t = std::thread::spawn(move || connect_tls(&ep, &id, Some(TIMEOUT)).unwrap());
    let s = l.accept().unwrap();
    (t.join().unwrap(), s)
}
