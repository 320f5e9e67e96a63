//! Loading a certificate chain, its private key and the CA into a
//! [`TlsIdentity`] usable on both sides of a migration.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use livemig::transport::Endpoint;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::TlsError;

/// ALPN protocol name both sides offer and require, so that a certificate
/// issued by the same CA for some other TLS service cannot be used to talk
/// to a migration endpoint by accident.
pub(crate) const ALPN: &[u8] = b"livemig";

/// Where to find this host's TLS identity.
///
/// Every host both sends guests (acting as the TLS client) and receives them
/// (acting as the TLS server) with the same identity, so its certificate
/// should carry both the `serverAuth` and the `clientAuth` extended key
/// usages (or none at all), and a subject alternative name (DNS name or IP
/// address) that peers connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with this host's certificate first, then any intermediate
    /// certificates.
    pub cert_chain: PathBuf,
    /// PEM file with the private key of the first certificate (PKCS#8,
    /// PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    /// PEM file with the CA certificate(s) that peers' certificates must
    /// chain to. Use a CA dedicated to migration: any certificate it signed
    /// can send or receive guests.
    pub ca: PathBuf,
    /// The name to check the server's certificate against when connecting.
    /// `None` uses the host part of a `tcp:HOST:PORT` endpoint; required for
    /// `unix:PATH` endpoints.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// Loads the files; same as [`TlsIdentity::load`].
    pub fn load(&self) -> Result<TlsIdentity, TlsError> {
        TlsIdentity::load(self)
    }
}

/// A loaded TLS identity: this host's certificate and key, the CA peers must
/// chain to, and the ready-made rustls configurations for both roles.
///
/// Only TLS 1.3 is offered, with the cipher suites of rustls' `ring`
/// provider. Both roles require the peer's certificate: the server verifies
/// that the client's certificate chains to the CA (any CA-signed certificate
/// is accepted), the client additionally checks the server's certificate
/// against the expected server name. Sessions are never resumed: every
/// connection performs a full handshake with certificates.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct TlsIdentity {
    pub(crate) client: Arc<ClientConfig>,
    pub(crate) server: Arc<ServerConfig>,
    server_name: Option<String>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

const CHAIN: &str = "certificate chain";
const KEY: &str = "private key";
const CA: &str = "CA";

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::InvalidFile {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads every `CERTIFICATE` block of a PEM file.
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem_bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| invalid(what, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            what,
            path,
            "no PEM CERTIFICATE block found (is this the right file?)",
        ));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem_bytes = read_file(KEY, path)?;
    if let Ok(md) = std::fs::metadata(path) {
        let mode = md.permissions().mode();
        if mode & 0o077 != 0 {
            log::warn!(
                "private key file {} is accessible to group or others (mode {:o})",
                path.display(),
                mode & 0o777
            );
        }
    }
    PrivateKeyDer::from_pem_slice(&pem_bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid(
            KEY,
            path,
            "no PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block found",
        ),
        other => invalid(KEY, path, format!("not valid PEM: {other}")),
    })
}

impl TlsIdentity {
    /// Loads and checks the files named by `config` and builds the TLS
    /// configurations. Errors name the file and what is wrong with it.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let chain = load_certs(CHAIN, &config.cert_chain)?;
        let key = load_key(&config.key)?;
        let ca_certs = load_certs(CA, &config.ca)?;

        let mut roots = RootCertStore::empty();
        for (i, cert) in ca_certs.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                let why = match e {
                    rustls::Error::InvalidCertificate(e) => e.to_string(),
                    other => other.to_string(),
                };
                invalid(
                    CA,
                    &config.ca,
                    format!("certificate #{} is not a usable trust anchor: {why}", i + 1),
                )
            })?;
        }
        let roots = Arc::new(roots);

        if let Some(name) = &config.server_name {
            ServerName::try_from(name.as_str()).map_err(|e| {
                TlsError::InvalidIdentity(format!(
                    "server_name '{name}' is not a valid DNS name or IP address: {e}"
                ))
            })?;
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = &[&rustls::version::TLS13];
        let setup = |e: rustls::Error| TlsError::InvalidIdentity(e.to_string());
        let key_err = |e: rustls::Error| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::InvalidIdentity(format!(
                "the private key in {} does not belong to the first certificate in {}",
                config.key.display(),
                config.cert_chain.display()
            )),
            rustls::Error::InvalidCertificate(e) => invalid(
                CHAIN,
                &config.cert_chain,
                format!("the first certificate is unusable: {e}"),
            ),
            other => invalid(KEY, &config.key, other.to_string()),
        };

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| invalid(CA, &config.ca, e.to_string()))?;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(setup)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(key_err)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        // Never resume: every connection presents and verifies certificates.
        // Tickets the server sends are still counted: the first one tells
        // the client that the server accepted its certificate.
        client.resumption = Resumption::disabled();

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| invalid(CA, &config.ca, e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(setup)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(key_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // One ticket, sent once the client's certificate and Finished were
        // verified; the client waits for it (see `crate::stream`).
        server.send_tls13_tickets = 1;

        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: config.server_name.clone(),
        })
    }

    /// The configured server name override, if any.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The name to check the certificate of the server at `endpoint`
    /// against: the configured server name, else the host part of a TCP
    /// endpoint (without brackets for IPv6).
    pub fn server_name_for(&self, endpoint: &Endpoint) -> Result<String, TlsError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        match endpoint {
            Endpoint::Tcp(addr) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                Ok(host.to_string())
            }
            _ => Err(TlsError::ServerName {
                endpoint: endpoint.to_string(),
                reason: "only a TCP endpoint has a host name; set server_name to a name in the \
                         server's certificate"
                    .into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(server_name: Option<&str>) -> TlsIdentity {
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        let server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: server_name.map(String::from),
        }
    }

    #[test]
    fn server_name_defaults_to_host() {
        let ep = |s: &str| s.parse::<Endpoint>().unwrap();
        let i = id(None);
        assert_eq!(
            i.server_name_for(&ep("tcp:localhost:1")).unwrap(),
            "localhost"
        );
        assert_eq!(
            i.server_name_for(&ep("tcp:10.0.0.1:1")).unwrap(),
            "10.0.0.1"
        );
        assert_eq!(i.server_name_for(&ep("tcp:[::1]:1")).unwrap(), "::1");
        let e = i.server_name_for(&ep("unix:/x.sock")).unwrap_err();
        assert!(e.to_string().contains("set server_name"), "{e}");
        let i = id(Some("dest.example"));
        assert_eq!(
            i.server_name_for(&ep("tcp:10.0.0.1:1")).unwrap(),
            "dest.example"
        );
        assert_eq!(
            i.server_name_for(&ep("unix:/x.sock")).unwrap(),
            "dest.example"
        );
        assert!(format!("{i:?}").contains("dest.example"));
    }
}
