//! Loading identities: every error names the file and what is wrong.

mod common;

use common::*;
use livemig_tls::{TlsConfig, TlsError};

fn err(config: &TlsConfig) -> String {
    let e = config.load().unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    msg
}

#[test]
fn valid_identity_loads() {
    let pki = Pki::new("ok");
    let id = pki.host("a").load().unwrap();
    assert_eq!(id.server_name(), None);
    assert!(format!("{id:?}").contains("TlsIdentity"));
    let id = TlsConfig {
        server_name: Some("dest.example".into()),
        ..pki.host("b")
    }
    .load()
    .unwrap();
    assert_eq!(id.server_name(), Some("dest.example"));
}

#[test]
fn missing_files_are_named() {
    let pki = Pki::new("missing");
    let good = pki.host("a");
    let none = pki.dir.path().join("nope.pem");
    let msg = err(&TlsConfig {
        cert_chain: none.clone(),
        ..good.clone()
    });
    assert!(
        msg.starts_with(&format!(
            "cannot read the certificate chain file {}",
            none.display()
        )),
        "{msg}"
    );
    let msg = err(&TlsConfig {
        key: none.clone(),
        ..good.clone()
    });
    assert!(msg.starts_with("cannot read the private key file"), "{msg}");
    let msg = err(&TlsConfig {
        ca: none,
        ..good.clone()
    });
    assert!(msg.starts_with("cannot read the CA file"), "{msg}");
}

#[test]
fn swapped_files_are_explained() {
    let pki = Pki::new("swapped");
    let good = pki.host("a");
    // Key where the certificate chain belongs.
    let msg = err(&TlsConfig {
        cert_chain: good.key.clone(),
        ..good.clone()
    });
    assert!(
        msg.contains(&format!(
            "invalid certificate chain file {}",
            good.key.display()
        )) && msg.contains("no PEM CERTIFICATE block"),
        "{msg}"
    );
    // Certificate where the key belongs.
    let msg = err(&TlsConfig {
        key: good.cert_chain.clone(),
        ..good.clone()
    });
    assert!(
        msg.contains("invalid private key file") && msg.contains("no PEM PRIVATE KEY"),
        "{msg}"
    );
    // Someone else's key.
    let other = pki.host("b");
    let msg = err(&TlsConfig {
        key: other.key,
        ..good.clone()
    });
    assert!(msg.contains("does not belong"), "{msg}");
    assert!(
        msg.contains(&good.cert_chain.display().to_string()),
        "{msg}"
    );
}

#[test]
fn corrupt_files_are_explained() {
    let pki = Pki::new("corrupt");
    let good = pki.host("a");
    let bad_pem = pki.dir.path().join("bad.pem");
    std::fs::write(
        &bad_pem,
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let msg = err(&TlsConfig {
        ca: bad_pem.clone(),
        ..good.clone()
    });
    assert!(
        msg.contains("invalid CA file") && msg.contains("not valid PEM"),
        "{msg}"
    );
    // Valid PEM, but the DER inside is not a certificate.
    let junk = pki.dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let msg = err(&TlsConfig {
        ca: junk.clone(),
        ..good.clone()
    });
    assert!(
        msg.contains("invalid CA file") && msg.contains("certificate #1"),
        "{msg}"
    );
    let msg = err(&TlsConfig {
        cert_chain: junk,
        ..good.clone()
    });
    assert!(msg.contains("certificate chain"), "{msg}");
}

#[test]
fn invalid_server_name_is_refused() {
    let pki = Pki::new("sni");
    let e = TlsConfig {
        server_name: Some("not a host name".into()),
        ..pki.host("a")
    }
    .load()
    .unwrap_err();
    assert!(matches!(e, TlsError::InvalidIdentity(_)), "{e}");
    assert!(e.to_string().contains("not a host name"), "{e}");
}
