//! A principal's certificate and key as a PKCS#12 (`.p12`) file, the form browsers and operating
//! systems import a client identity in: how a compliance officer takes their consortium
//! certificate into the browser they open the audit console with.
//!
//! The file holds the key (PKCS#8) and the chain leaf first, then the consortium CA, under one
//! friendly name; it is encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) and authenticated
//! with an HMAC-SHA256 MAC, both keyed by the passphrase, which OpenSSL 3, NSS (Chromium, Firefox)
//! and macOS/Windows import. The legacy RC2/3DES forms are not written.

/// The PBKDF2 iterations of the encryption and the MAC (OpenSSL's default is 2048; more is
/// slower to guess and still instant to import).
pub const ITERATIONS: u64 = 100_000;

/// The shortest passphrase accepted: the file carries a private key.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

/// Why a PKCS#12 file could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs12Error {
    #[error("{what}: no {label} PEM block")]
    NoPem {
        what: &'static str,
        label: &'static str,
    },
    #[error("{what}: not PEM: {why}")]
    Pem { what: &'static str, why: String },
    #[error("{what}: not an X.509 certificate: {why}")]
    Certificate { what: &'static str, why: String },
    #[error(
        "the passphrase has {got} characters; a PKCS#12 file holding a private key needs at least {MIN_PASSPHRASE_CHARS}"
    )]
    ShortPassphrase { got: usize },
    #[error("writing the PKCS#12 file: {0}")]
    Write(String),
}

/// The DER contents of every `label` block of `pem`, in order.
fn blocks(pem: &str, what: &'static str, label: &'static str) -> Result<Vec<Vec<u8>>, Pkcs12Error> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| Pkcs12Error::Pem {
            what,
            why: e.to_string(),
        })?;
        if block.label == label {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err(Pkcs12Error::NoPem { what, label });
    }
    Ok(out)
}

/// The PKCS#12 file of `cert_pem` (the leaf, then any intermediates), its `key_pem` (PKCS#8,
/// as `tutela pki issue` writes it) and the CA certificate(s) of `ca_pem`, named `friendly_name`
/// (what a browser lists the identity as), encrypted under `passphrase`.
pub fn to_pkcs12(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    friendly_name: &str,
    passphrase: &str,
) -> Result<Vec<u8>, Pkcs12Error> {
    let got = passphrase.chars().count();
    if got < MIN_PASSPHRASE_CHARS {
        return Err(Pkcs12Error::ShortPassphrase { got });
    }
    let key = blocks(key_pem, "the key", "PRIVATE KEY")?.remove(0);
    let mut chain = Vec::new();
    for (what, pem) in [
        ("the certificate", cert_pem),
        ("the CA certificate", ca_pem),
    ] {
        for der in blocks(pem, what, "CERTIFICATE")? {
            chain.push(p12_keystore::Certificate::from_der(&der).map_err(|e| {
                Pkcs12Error::Certificate {
                    what,
                    why: e.to_string(),
                }
            })?);
        }
    }
    // The local key id ties the key to its certificate: the SHA-256 of the leaf, as a stable id.
    let leaf_id = ring::digest::digest(&ring::digest::SHA256, chain[0].as_der());
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(
        friendly_name,
        p12_keystore::KeyStoreEntry::PrivateKeyChain(p12_keystore::PrivateKeyChain::new(
            key,
            leaf_id.as_ref(),
            chain,
        )),
    );
    store
        .writer(passphrase)
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(ITERATIONS)
        .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
        .mac_iterations(ITERATIONS)
        .write()
        .map_err(|e| Pkcs12Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Principal;
    use crate::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};

    /// The file reads back with the passphrase (key, leaf and CA, under the friendly name), does
    /// not with another, and OpenSSL reads it too (`openssl pkcs12 -info`, when installed).
    #[test]
    fn an_officers_identity_round_trips_and_openssl_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(
            &dir.path().join("ca"),
            "acme",
            KeyAlgorithm::EcdsaP256,
            30,
            false,
        )
        .unwrap();
        let issued = ca
            .issue(
                &Principal::User {
                    site: "st-mary".into(),
                    name: "alice".into(),
                },
                &LeafOptions::new(Validity::days_from_now(30)),
            )
            .unwrap();
        let p12 = to_pkcs12(
            &issued.cert_pem,
            &issued.key_pem,
            &ca.ca().cert_pem(),
            "alice (acme)",
            "correct horse",
        )
        .unwrap();

        let back = p12_keystore::KeyStore::from_pkcs12(&p12, "correct horse").unwrap();
        let (name, chain) = back.private_key_chain().unwrap();
        assert_eq!(name, "alice (acme)");
        assert_eq!(chain.chain().len(), 2);
        let leaf = blocks(&issued.cert_pem, "c", "CERTIFICATE")
            .unwrap()
            .remove(0);
        assert_eq!(chain.chain()[0].as_der(), leaf.as_slice());
        let key = blocks(&issued.key_pem, "k", "PRIVATE KEY")
            .unwrap()
            .remove(0);
        assert_eq!(chain.key(), key.as_slice());
        assert!(p12_keystore::KeyStore::from_pkcs12(&p12, "wrong horse").is_err());

        let e = to_pkcs12(
            &issued.cert_pem,
            &issued.key_pem,
            &ca.ca().cert_pem(),
            "a",
            "short",
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 8"), "{e}");
        let e = to_pkcs12(
            &issued.key_pem,
            &issued.key_pem,
            &ca.ca().cert_pem(),
            "a",
            "long enough",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "the certificate: no CERTIFICATE PEM block");

        let path = dir.path().join("alice.p12");
        std::fs::write(&path, &p12).unwrap();
        match std::process::Command::new("openssl")
            .args([
                "pkcs12",
                "-info",
                "-noout",
                "-passin",
                "pass:correct horse",
                "-in",
            ])
            .arg(&path)
            .output()
        {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "openssl pkcs12 -info: {text}");
                assert!(
                    text.contains("PBES2") && text.contains("AES-256-CBC"),
                    "{text}"
                );
                assert!(text.contains("MAC: sha256"), "{text}");
            }
            Err(e) => {
                eprintln!("openssl is not installed ({e}): the OpenSSL cross-check is skipped")
            }
        }
    }
}
