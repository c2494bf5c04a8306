//! The consortium PKI, checked the way its users will check it: x509-parser for the contents,
//! rustls/webpki for the chains and CRLs, real files for the CA directory.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use ::time::{Duration, OffsetDateTime};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, CertificateSigningRequestDer, ServerName,
    UnixTime,
};
use tutela_protocol::identity::{Identity, Principal, Role};
use tutela_protocol::pki::{
    CaDir, CertificateAuthority, Description, IssuedCertificate, KeyAlgorithm, LeafOptions,
    PkiError, Revocation, Validity, describe, describe_all, identity_of_cert_der, make_csr,
    serial_of_cert_der,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

const ALGORITHMS: [KeyAlgorithm; 2] = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca(consortium: &str, algorithm: KeyAlgorithm) -> CertificateAuthority {
    CertificateAuthority::create(consortium, algorithm, Validity::days_from_now(30)).unwrap()
}

fn principals() -> Vec<Principal> {
    vec![
        Principal::Coordinator,
        Principal::Audit,
        Principal::Node {
            site: "st-mary".into(),
        },
        Principal::User {
            site: "st-mary".into(),
            name: "alice".into(),
        },
        Principal::Operator { name: "bob".into() },
    ]
}

fn node(site: &str) -> Principal {
    Principal::Node { site: site.into() }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn server_opts(algorithm: KeyAlgorithm) -> LeafOptions {
    let mut opts = LeafOptions::new(Validity::days_from_now(10));
    opts.dns_names = vec!["localhost".into(), "Coordinator.Example.org".into()];
    opts.ip_addresses = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    opts.algorithm = algorithm;
    opts
}

fn client_verifier(ca: &CertificateAuthority, crls: &[&str]) -> Arc<dyn ClientCertVerifier> {
    let mut roots = RootCertStore::empty();
    roots.add(der(&ca.cert_pem())).unwrap();
    let crls = crls
        .iter()
        .map(|pem| CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect::<Vec<_>>();
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .unwrap()
}

fn server_verifier(ca: &CertificateAuthority) -> Arc<WebPkiServerVerifier> {
    let mut roots = RootCertStore::empty();
    roots.add(der(&ca.cert_pem())).unwrap();
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap()
}

fn verify_client(
    verifier: &Arc<dyn ClientCertVerifier>,
    issued_pem: &str,
) -> Result<(), rustls::Error> {
    verifier
        .verify_client_cert(&der(issued_pem), &[], UnixTime::now())
        .map(|_| ())
}

fn verify_server(
    ca: &CertificateAuthority,
    cert_pem: &str,
    name: &str,
) -> Result<(), rustls::Error> {
    let name = match name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(name.to_string()).unwrap(),
    };
    server_verifier(ca)
        .verify_server_cert(&der(cert_pem), &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .expect("subject key identifier")
}

fn authority_key_id(extensions: &[X509Extension<'_>]) -> Vec<u8> {
    extensions
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("authority key identifier")
}

#[test]
fn every_role_gets_its_identity_key_usages_and_validity() {
    for algorithm in ALGORITHMS {
        let ca = ca("acme", algorithm);
        let ca_der = der(&ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        for principal in principals() {
            let role = principal.role();
            let mut opts = LeafOptions::new(Validity::days_from_now(10));
            opts.algorithm = algorithm;
            let issued = ca.issue(&principal, &opts).unwrap();
            let ctx = format!("{algorithm} {}", issued.identity);
            assert_eq!(
                issued.identity,
                Identity::new("acme", principal.clone()).unwrap()
            );
            assert!(issued.key_pem.contains("BEGIN PRIVATE KEY"), "{ctx}");

            let leaf_der = der(&issued.cert_pem);
            let (_, cert) = X509Certificate::from_der(&leaf_der).unwrap();
            let uris: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect();
            assert_eq!(uris, vec![issued.identity.uri()], "{ctx}");
            assert_eq!(identity_of_cert_der(&leaf_der).unwrap(), issued.identity);

            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth, "{ctx}");
            assert_eq!(eku.server_auth, role.is_server(), "{ctx}");
            assert!(
                !eku.any && !eku.code_signing && eku.other.is_empty(),
                "{ctx}"
            );

            let ku = cert.key_usage().unwrap().unwrap();
            assert!(ku.critical, "{ctx}");
            assert!(ku.value.digital_signature(), "{ctx}");
            assert_eq!(
                ku.value.non_repudiation(),
                matches!(role, Role::User | Role::Operator),
                "{ctx}"
            );
            assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign(), "{ctx}");

            assert!(!cert.is_ca(), "{ctx}");
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(bc.critical && !bc.value.ca, "{ctx}");

            assert_eq!(
                cert.validity().not_before.to_datetime(),
                opts.validity.not_before
            );
            assert_eq!(
                cert.validity().not_after.to_datetime(),
                opts.validity.not_after
            );

            assert_eq!(serial_of_cert_der(&leaf_der).unwrap(), issued.serial_hex);
            assert_eq!(issued.serial_hex, issued.serial_hex.to_lowercase());
            assert!(!issued.serial_hex.starts_with("00"), "{ctx}");
            assert!(!issued.serial_hex.contains(':'), "{ctx}");

            assert_eq!(cert.issuer(), ca_cert.subject(), "{ctx}");
            assert_eq!(
                authority_key_id(cert.extensions()),
                subject_key_id(&ca_cert)
            );
            cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        }
    }
}

#[test]
fn serials_are_random_and_distinct() {
    let ca = ca("acme", KeyAlgorithm::EcdsaP256);
    let opts = LeafOptions::new(Validity::days_from_now(1));
    let serials: std::collections::BTreeSet<String> = (0..20)
        .map(|_| ca.issue(&node("a"), &opts).unwrap().serial_hex)
        .collect();
    assert_eq!(serials.len(), 20);
}

#[test]
fn the_ca_certificate_is_a_path_length_zero_ca_of_its_consortium() {
    for algorithm in ALGORITHMS {
        let ca = ca("acme", algorithm);
        assert_eq!(ca.consortium(), "acme");
        let ca_der = der(&ca.cert_pem());
        let (_, cert) = X509Certificate::from_der(&ca_der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert_eq!(
            cert.subject().to_string(),
            "CN=Tutela acme consortium CA, O=acme"
        );
        assert_eq!(cert.subject(), cert.issuer());
        cert.verify_signature(None).unwrap();
        let days =
            (cert.validity().not_after.to_datetime() - OffsetDateTime::now_utc()).whole_days();
        assert!((29..=30).contains(&days), "{days}");
        // The CA is not a consortium member: it names no identity.
        assert!(identity_of_cert_der(&ca_der).is_err());
    }
}

#[test]
fn leaves_verify_under_webpki_as_clients_and_servers_for_both_algorithms() {
    for algorithm in ALGORITHMS {
        let ca = ca("acme", algorithm);
        let verifier = client_verifier(&ca, &[]);
        for principal in principals() {
            // Leaf keys of the other algorithm under this CA, too.
            for leaf_alg in ALGORITHMS {
                let mut opts = LeafOptions::new(Validity::days_from_now(10));
                opts.algorithm = leaf_alg;
                let issued = ca.issue(&principal, &opts).unwrap();
                verify_client(&verifier, &issued.cert_pem)
                    .unwrap_or_else(|e| panic!("{algorithm}/{leaf_alg} {}: {e}", issued.identity));
            }
        }
        let coordinator = ca
            .issue(&Principal::Coordinator, &server_opts(algorithm))
            .unwrap();
        for name in ["localhost", "coordinator.example.org", "127.0.0.1", "::1"] {
            verify_server(&ca, &coordinator.cert_pem, name)
                .unwrap_or_else(|e| panic!("{algorithm} {name}: {e}"));
        }
        let err = verify_server(&ca, &coordinator.cert_pem, "evil.example.org").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{err:?}"
        );
        // A node certificate is for clients only: it cannot serve.
        let mut node_opts = server_opts(algorithm);
        node_opts.algorithm = algorithm;
        let node_cert = ca.issue(&node("st-mary"), &node_opts).unwrap();
        assert!(verify_server(&ca, &node_cert.cert_pem, "localhost").is_err());
    }
}

#[test]
fn expired_and_foreign_certificates_do_not_verify() {
    let acme = ca("acme", KeyAlgorithm::EcdsaP256);
    let rogue = ca("rogue", KeyAlgorithm::EcdsaP256);
    let verifier = client_verifier(&acme, &[]);

    let foreign = rogue
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let err = verify_client(&verifier, &foreign.cert_pem).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
    // The two CAs and their leaves are told apart by consortium.
    assert_ne!(acme.cert_pem(), rogue.cert_pem());
    assert_eq!(rogue.consortium(), "rogue");
    assert_eq!(
        identity_of_cert_der(&der(&foreign.cert_pem))
            .unwrap()
            .consortium,
        "rogue"
    );
    let Description::Certificate(d) = describe(&rogue.cert_pem()).unwrap() else {
        panic!("not a certificate")
    };
    assert_eq!(d.uris, vec!["spiffe://rogue".to_string()]);
    assert!(d.subject.contains("O=rogue"), "{}", d.subject);

    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let old = acme
        .issue(&node("st-mary"), &LeafOptions::new(expired))
        .unwrap();
    let err = verify_client(&verifier, &old.cert_pem).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn a_leaf_may_not_outlive_the_ca_nor_have_an_empty_validity() {
    let ca = ca("acme", KeyAlgorithm::EcdsaP256);
    let err = ca
        .issue(&node("a"), &LeafOptions::new(Validity::days_from_now(31)))
        .unwrap_err();
    assert!(matches!(err, PkiError::OutlivesCa { .. }), "{err}");
    assert!(
        err.to_string().contains("spiffe://acme/site/a/node"),
        "{err}"
    );
    // Asked for the CA's own lifetime a few seconds after it was made (the next second's
    // "30 days from now"): the leaf ends with the CA; two minutes more is still refused.
    let ca_end = x509_parser::parse_x509_certificate(ca.cert_der())
        .unwrap()
        .1
        .validity()
        .not_after
        .timestamp();
    let ca_not_after = OffsetDateTime::from_unix_timestamp(ca_end).unwrap();
    let late = Validity {
        not_before: OffsetDateTime::now_utc() - time::Duration::minutes(5),
        not_after: ca_not_after + time::Duration::seconds(3),
    };
    let leaf = ca.issue(&node("b"), &LeafOptions::new(late)).unwrap();
    let leaf_pem = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes())
        .unwrap()
        .1;
    let leaf_end = x509_parser::parse_x509_certificate(&leaf_pem.contents)
        .unwrap()
        .1
        .validity()
        .not_after
        .timestamp();
    assert_eq!(leaf_end, ca_end);
    let too_late = Validity {
        not_after: ca_not_after + time::Duration::minutes(2),
        ..late
    };
    assert!(matches!(
        ca.issue(&node("b"), &LeafOptions::new(too_late))
            .unwrap_err(),
        PkiError::OutlivesCa { .. }
    ));
    let now = OffsetDateTime::now_utc();
    let empty = Validity {
        not_before: now,
        not_after: now,
    };
    assert!(matches!(
        ca.issue(&node("a"), &LeafOptions::new(empty)).unwrap_err(),
        PkiError::EmptyValidity { .. }
    ));
    let mut bad_dns = LeafOptions::new(Validity::days_from_now(1));
    bad_dns.dns_names = vec!["not a host".into()];
    let err = ca.issue(&Principal::Coordinator, &bad_dns).unwrap_err();
    assert!(err.to_string().contains("\"not a host\""), "{err}");
    assert!(
        CertificateAuthority::create(
            "Bad Name",
            KeyAlgorithm::EcdsaP256,
            Validity::days_from_now(1)
        )
        .is_err()
    );
}

#[test]
fn a_revoked_certificate_is_listed_in_the_crl_and_refused_by_webpki() {
    for algorithm in ALGORITHMS {
        let ca = ca("acme", algorithm);
        let opts = LeafOptions::new(Validity::days_from_now(1));
        let revoked = ca.issue(&node("st-mary"), &opts).unwrap();
        let kept = ca.issue(&node("general"), &opts).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let next = now + Duration::days(7);
        let crl = ca
            .crl_pem(
                &[Revocation {
                    serial_hex: revoked.serial_hex.to_uppercase(),
                    revoked_at: now - Duration::minutes(1),
                    reason: Some("key-compromise".into()),
                }],
                42,
                now,
                next,
            )
            .unwrap();

        // x509-parser: the entry, the number, the dates, the signature, the AKI.
        let crl_der = CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap();
        let (_, parsed) = CertificateRevocationList::from_der(&crl_der).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| {
                hex::encode(r.raw_serial())
                    .trim_start_matches("00")
                    .to_string()
            })
            .collect();
        assert_eq!(serials, vec![revoked.serial_hex.clone()]);
        let entry = parsed.iter_revoked_certificates().next().unwrap();
        assert_eq!(
            entry.reason_code().unwrap().1,
            x509_parser::x509::ReasonCode::KeyCompromise
        );
        assert_eq!(
            entry.revocation_date.to_datetime(),
            now - Duration::minutes(1)
        );
        assert_eq!(parsed.crl_number().unwrap().to_string(), "42");
        assert_eq!(parsed.last_update().to_datetime(), now);
        assert_eq!(parsed.next_update().unwrap().to_datetime(), next);
        let ca_der = der(&ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        parsed.verify_signature(ca_cert.public_key()).unwrap();
        assert_eq!(
            authority_key_id(parsed.extensions()),
            subject_key_id(&ca_cert)
        );

        let Description::Crl(d) = describe(&crl).unwrap() else {
            panic!("not a CRL")
        };
        assert_eq!(d.revoked.len(), 1);
        assert_eq!(d.revoked[0].serial_hex, revoked.serial_hex);
        assert_eq!(d.revoked[0].reason.as_deref(), Some("key-compromise"));
        assert_eq!(d.next_update, Some(next));
        assert_eq!(d.crl_number.as_deref(), Some("2a"));

        // webpki: refused with the CRL, accepted without it; the other certificate still passes.
        let with_crl = client_verifier(&ca, &[&crl]);
        let err = verify_client(&with_crl, &revoked.cert_pem).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked),
            "{algorithm}"
        );
        verify_client(&with_crl, &kept.cert_pem).unwrap();
        verify_client(&client_verifier(&ca, &[]), &revoked.cert_pem).unwrap();
    }
}

#[test]
fn crl_arguments_are_checked() {
    let ca = ca("acme", KeyAlgorithm::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let err = ca.crl_pem(&[], 1, now, now).unwrap_err();
    assert!(matches!(err, PkiError::CrlPeriod { .. }), "{err}");
    let bad = |serial: &str, reason: Option<&str>| {
        ca.crl_pem(
            &[Revocation {
                serial_hex: serial.into(),
                revoked_at: now,
                reason: reason.map(str::to_string),
            }],
            1,
            now,
            now + Duration::days(1),
        )
    };
    assert!(matches!(
        bad("xyz", None).unwrap_err(),
        PkiError::BadSerial(_)
    ));
    assert!(matches!(
        bad("01", Some("stolen")).unwrap_err(),
        PkiError::UnknownReason(_)
    ));
    bad("0x3f:a1", Some("superseded")).unwrap();
    let empty = ca.crl_pem(&[], 1, now, now + Duration::days(1)).unwrap();
    let Description::Crl(d) = describe(&empty).unwrap() else {
        panic!("not a CRL")
    };
    assert!(d.revoked.is_empty());
}

#[test]
fn a_csr_is_signed_for_the_identity_the_operator_states() {
    for algorithm in ALGORITHMS {
        let ca = ca("acme", algorithm);
        let identity = Identity::new("acme", Principal::Coordinator).unwrap();
        let dns = vec!["coord.example.org".to_string()];
        let (csr, key_pem) = make_csr(&identity, algorithm, &dns).unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        assert!(key_pem.contains("BEGIN PRIVATE KEY"));

        let Description::Csr(d) = describe(&csr).unwrap() else {
            panic!("not a CSR")
        };
        assert_eq!(d.identity.as_ref(), Some(&identity));
        assert_eq!(d.dns_names, dns);
        assert!(d.signature_valid);

        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let (cert_pem, serial) = ca
            .sign_csr(
                &csr,
                &Principal::Coordinator,
                Validity::days_from_now(5),
                &dns,
                &ips,
            )
            .unwrap();
        let leaf = der(&cert_pem);
        assert_eq!(serial_of_cert_der(&leaf).unwrap(), serial);
        assert_eq!(identity_of_cert_der(&leaf).unwrap(), identity);
        // The certificate carries the CSR's key: the key that stayed behind matches it.
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            key.public_key_raw(),
            cert.public_key().subject_public_key.data.as_ref()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        verify_server(&ca, &cert_pem, "coord.example.org").unwrap();
        verify_server(&ca, &cert_pem, "10.0.0.1").unwrap();
        verify_client(&client_verifier(&ca, &[]), &cert_pem).unwrap();
    }
}

#[test]
fn a_csr_naming_someone_else_is_refused() {
    let ca = ca("acme", KeyAlgorithm::EcdsaP256);
    let v = || Validity::days_from_now(1);
    let x = Identity::new("acme", node("x")).unwrap();
    let (csr, _) = make_csr(&x, KeyAlgorithm::EcdsaP256, &[]).unwrap();

    let err = ca.sign_csr(&csr, &node("y"), v(), &[], &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "CSR carries identity spiffe://acme/site/x/node but the CA was asked to sign for spiffe://acme/site/y/node"
    );
    let err = ca
        .sign_csr(&csr, &Principal::Coordinator, v(), &[], &[])
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrIdentityMismatch { .. }), "{err}");

    // The same principal in another consortium is someone else too.
    let other = Identity::new("other", node("x")).unwrap();
    let (csr_other, _) = make_csr(&other, KeyAlgorithm::EcdsaP256, &[]).unwrap();
    let err = ca
        .sign_csr(&csr_other, &node("x"), v(), &[], &[])
        .unwrap_err();
    assert!(
        err.to_string().contains("spiffe://other/site/x/node"),
        "{err}"
    );

    // DNS names are the operator's to grant.
    let (csr_dns, _) =
        make_csr(&x, KeyAlgorithm::EcdsaP256, &["x.example.org".to_string()]).unwrap();
    let err = ca
        .sign_csr(&csr_dns, &node("x"), v(), &[], &[])
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrUngrantedSan { .. }), "{err}");
    assert!(err.to_string().contains("--dns x.example.org"), "{err}");
    ca.sign_csr(&csr_dns, &node("x"), v(), &["x.example.org".into()], &[])
        .unwrap();

    // A CSR without any identity.
    let key = rcgen::KeyPair::generate().unwrap();
    let bare = rcgen::CertificateParams::new(vec!["x.example.org".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let err = ca
        .sign_csr(&bare, &node("x"), v(), &["x.example.org".into()], &[])
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrNoIdentity { .. }), "{err}");

    // Not a CSR at all.
    let err = ca
        .sign_csr(&ca.cert_pem(), &node("x"), v(), &[], &[])
        .unwrap_err();
    assert!(matches!(err, PkiError::WrongPemLabel { .. }), "{err}");

    // A CSR whose public key was swapped after signing.
    let tampered = tamper_with_public_key(&csr);
    let err = ca
        .sign_csr(&tampered, &node("x"), v(), &[], &[])
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrSignature { .. }), "{err}");
}

/// Flips one bit of the CSR's public key, leaving its structure (and signature) intact.
fn tamper_with_public_key(csr_pem: &str) -> String {
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let key = {
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec()
    };
    let at = der.windows(key.len()).position(|w| w == key).unwrap() + key.len() - 1;
    der[at] ^= 1;
    pem("CERTIFICATE REQUEST", &der)
}

fn pem(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            b64.push(if i <= c.len() {
                char::from(A[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn self_signed_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

#[test]
fn identity_of_cert_der_wants_exactly_one_spiffe_uri() {
    let dns_only = self_signed_with_sans(vec![rcgen::SanType::DnsName(
        "x.example.org".to_string().try_into().unwrap(),
    )]);
    let err = identity_of_cert_der(&dns_only).unwrap_err();
    assert!(matches!(err, PkiError::NoIdentity { .. }), "{err}");

    let no_san = self_signed_with_sans(vec![]);
    assert!(matches!(
        identity_of_cert_der(&no_san).unwrap_err(),
        PkiError::NoIdentity { .. }
    ));

    let two = self_signed_with_sans(vec![
        uri("spiffe://acme/site/a/node"),
        uri("spiffe://acme/site/b/node"),
    ]);
    let err = identity_of_cert_der(&two).unwrap_err();
    assert!(
        matches!(err, PkiError::ManyIdentities { count: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("spiffe://acme/site/b/node"),
        "{err}"
    );

    let https = self_signed_with_sans(vec![uri("https://acme/site/a/node")]);
    assert!(matches!(
        identity_of_cert_der(&https).unwrap_err(),
        PkiError::BadIdentity { .. }
    ));
    let unknown = self_signed_with_sans(vec![uri("spiffe://acme/site/a/printer")]);
    assert!(matches!(
        identity_of_cert_der(&unknown).unwrap_err(),
        PkiError::BadIdentity { .. }
    ));

    let one = self_signed_with_sans(vec![uri("spiffe://acme/operator/bob")]);
    assert_eq!(
        identity_of_cert_der(&one).unwrap(),
        Identity::new("acme", Principal::Operator { name: "bob".into() }).unwrap()
    );
    assert!(identity_of_cert_der(b"not a certificate").is_err());
    assert!(serial_of_cert_der(b"not a certificate").is_err());
}

#[test]
fn a_ca_reloaded_from_pem_signs_as_the_original() {
    for algorithm in ALGORITHMS {
        let original = ca("acme", algorithm);
        let reloaded =
            CertificateAuthority::from_pem(&original.cert_pem(), &original.key_pem()).unwrap();
        assert_eq!(reloaded.consortium(), "acme");
        assert_eq!(reloaded.cert_pem(), original.cert_pem());
        assert_eq!(reloaded.not_after(), original.not_after());
        let issued = reloaded
            .issue(
                &node("st-mary"),
                &LeafOptions::new(Validity::days_from_now(1)),
            )
            .unwrap();
        verify_client(&client_verifier(&original, &[]), &issued.cert_pem).unwrap();
        // Its CRLs are accepted by verifiers that trust the original.
        let now = OffsetDateTime::now_utc();
        let crl = reloaded
            .crl_pem(
                &[Revocation {
                    serial_hex: issued.serial_hex.clone(),
                    revoked_at: now,
                    reason: None,
                }],
                7,
                now,
                now + Duration::days(1),
            )
            .unwrap();
        let err =
            verify_client(&client_verifier(&original, &[&crl]), &issued.cert_pem).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        );
    }

    // A key that is not the CA's, a leaf posing as a CA, garbage.
    let a = ca("acme", KeyAlgorithm::EcdsaP256);
    let b = ca("acme", KeyAlgorithm::EcdsaP256);
    let err = CertificateAuthority::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    let leaf: IssuedCertificate = a
        .issue(&node("x"), &LeafOptions::new(Validity::days_from_now(1)))
        .unwrap();
    let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
    assert!(CertificateAuthority::from_pem("", &a.key_pem()).is_err());
    assert!(CertificateAuthority::from_pem(&a.cert_pem(), "junk").is_err());
    let two = format!("{}{}", a.cert_pem(), b.cert_pem());
    assert!(matches!(
        CertificateAuthority::from_pem(&two, &a.key_pem()).unwrap_err(),
        PkiError::TooManyPemBlocks { count: 2, .. }
    ));
    // Debug output never shows the key.
    assert!(!format!("{a:?}").contains("PRIVATE"));
    assert!(!format!("{leaf:?}").contains("PRIVATE"));
}

#[test]
fn describe_reads_chains_crls_and_csrs() {
    let ca = ca("acme", KeyAlgorithm::Ed25519);
    let issued = ca
        .issue(&Principal::Audit, &server_opts(KeyAlgorithm::Ed25519))
        .unwrap();
    let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
    let all = describe_all(&chain).unwrap();
    assert_eq!(all.len(), 2);
    let Description::Certificate(leaf) = &all[0] else {
        panic!("not a certificate")
    };
    assert_eq!(leaf.identity.as_ref(), Some(&issued.identity));
    assert_eq!(leaf.serial_hex, issued.serial_hex);
    assert_eq!(leaf.dns_names, vec!["localhost", "coordinator.example.org"]);
    assert_eq!(leaf.ip_addresses.len(), 2);
    assert_eq!(leaf.key_usages, vec!["digitalSignature"]);
    assert_eq!(leaf.extended_key_usages, vec!["serverAuth", "clientAuth"]);
    assert_eq!(leaf.key_algorithm, "Ed25519");
    assert!(!leaf.is_ca);
    assert_eq!(leaf.sha256_fingerprint.len(), 32 * 3 - 1);
    let text = all[0].to_string();
    for needle in [
        "spiffe://acme/audit",
        &issued.serial_hex,
        "serverAuth",
        "localhost",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let Description::Certificate(root) = &all[1] else {
        panic!("not a certificate")
    };
    assert!(root.is_ca);
    assert_eq!(root.path_len, Some(0));
    assert!(all[1].to_string().contains("CA certificate"));

    assert!(matches!(describe("").unwrap_err(), PkiError::NoPem { .. }));
    let err = describe(&issued.key_pem).unwrap_err();
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
}

#[test]
fn a_ca_directory_records_revokes_and_publishes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let store = CaDir::init(&dir, "acme", KeyAlgorithm::EcdsaP256, 30, false).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store.key_path()), 0o600);
    assert_eq!(mode(&dir), 0o700);
    for f in ["ca.crt", "ca.key", "index.json", "crl.pem"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let crl_of = |store: &CaDir| {
        let Description::Crl(d) =
            describe(&std::fs::read_to_string(store.crl_path()).unwrap()).unwrap()
        else {
            panic!("crl.pem is not a CRL")
        };
        d
    };
    let first = crl_of(&store);
    assert!(first.revoked.is_empty());
    assert_eq!(first.crl_number.as_deref(), Some("1"));

    // A second init refuses, naming the key, and changes nothing.
    let key_before = std::fs::read(store.key_path()).unwrap();
    let err = CaDir::init(&dir, "acme", KeyAlgorithm::EcdsaP256, 30, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} already exists; pass --force to overwrite",
            dir.join("ca.key").display()
        )
    );
    assert_eq!(std::fs::read(store.key_path()).unwrap(), key_before);

    let store = CaDir::open(&dir).unwrap();
    let a = store
        .issue(&node("a"), &LeafOptions::new(Validity::days_from_now(5)))
        .unwrap();
    let x = Identity::new("acme", node("x")).unwrap();
    let (csr, _) = make_csr(&x, KeyAlgorithm::Ed25519, &[]).unwrap();
    let (_, b_serial) = store
        .sign_csr(&csr, &node("x"), Validity::days_from_now(5), &[], &[])
        .unwrap();
    let index = store.index().unwrap();
    assert_eq!(index.consortium, "acme");
    let serials: Vec<&str> = index
        .certificates
        .iter()
        .map(|e| e.serial.as_str())
        .collect();
    assert_eq!(serials, vec![a.serial_hex.as_str(), b_serial.as_str()]);
    assert_eq!(index.certificates[1].identity, "spiffe://acme/site/x/node");

    // Revoke by a colon-separated upper-case serial.
    let typed = a
        .serial_hex
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let entry = store.revoke(&typed, Some("superseded")).unwrap();
    assert_eq!(entry.serial, a.serial_hex);
    let crl = crl_of(&store);
    assert_eq!(crl.crl_number.as_deref(), Some("2"));
    assert_eq!(crl.revoked.len(), 1);
    assert_eq!(crl.revoked[0].serial_hex, a.serial_hex);
    assert_eq!(crl.revoked[0].reason.as_deref(), Some("superseded"));

    let err = store.revoke(&a.serial_hex, None).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyRevoked { .. }), "{err}");
    let err = store.revoke("3fa1", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "serial 3fa1 is not in the CA index {}",
            dir.join("index.json").display()
        )
    );
    assert!(matches!(
        store.revoke("01", Some("stolen")).unwrap_err(),
        PkiError::UnknownReason(_)
    ));

    // The published CRL, and crl.pem with it, is a newer one; webpki refuses the revoked cert.
    let out = tmp.path().join("published.crl");
    let pem = store.write_crl(&out, 3, false).unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), pem);
    assert_eq!(crl_of(&store).crl_number.as_deref(), Some("3"));
    let err = store.write_crl(&out, 3, false).unwrap_err();
    assert!(matches!(err, PkiError::Exists { .. }), "{err}");
    assert_eq!(
        store.index().unwrap().next_crl_number,
        4,
        "a refused write burns no number"
    );
    store.write_crl(&out, 3, true).unwrap();
    let verifier = client_verifier(store.ca(), &[&std::fs::read_to_string(&out).unwrap()]);
    assert_eq!(
        verify_client(&verifier, &a.cert_pem).unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );

    // --force makes a new CA; the old index goes with the old CA.
    let old_cert = std::fs::read(store.cert_path()).unwrap();
    let fresh = CaDir::init(&dir, "acme", KeyAlgorithm::Ed25519, 30, true).unwrap();
    assert_ne!(std::fs::read(fresh.cert_path()).unwrap(), old_cert);
    assert!(fresh.index().unwrap().certificates.is_empty());
    assert_eq!(mode(&fresh.key_path()), 0o600);

    // Not a CA directory.
    let err = CaDir::open(tmp.path()).unwrap_err();
    assert!(matches!(err, PkiError::NotACaDir { .. }), "{err}");
}

#[test]
fn a_damaged_or_foreign_index_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CaDir::init(tmp.path(), "acme", KeyAlgorithm::EcdsaP256, 30, false).unwrap();
    std::fs::write(store.index_path(), "{ not json").unwrap();
    let err = CaDir::open(tmp.path()).unwrap_err();
    assert!(matches!(err, PkiError::BadIndex { .. }), "{err}");
    assert!(err.to_string().contains("index.json"), "{err}");

    let other = tempfile::tempdir().unwrap();
    CaDir::init(other.path(), "other", KeyAlgorithm::EcdsaP256, 30, false).unwrap();
    std::fs::copy(other.path().join("index.json"), store.index_path()).unwrap();
    let err = CaDir::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("\"other\""), "{err}");
}
