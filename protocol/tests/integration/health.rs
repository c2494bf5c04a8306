//! The in-container probe (`tutela_protocol::health`) against a real mutual-TLS server on loopback
//! with certificates made at test time: it passes only for a server that is this very principal
//! and answers SERVING.

use crate::common;

use std::time::Duration;

use common::*;
use tutela_protocol::health::{ProbeError, probe_own_server};
use tutela_protocol::identity::Principal;

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_server_probed_with_its_own_certificate_is_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    // Listening on every address is probed on loopback.
    let listen = format!("0.0.0.0:{}", server.addr.port()).parse().unwrap();
    probe_own_server(&server.files, listen, TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_probe_answered_by_another_principal_fails_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    // The audit service's files, probing a port where the coordinator answers: the CA signed
    // both, but the probe must not take one server for the other.
    let audit = ca.issue(&Principal::Audit, &server_opts()).unwrap();
    let files = write_set(
        &dir.path().join("audit"),
        "audit",
        &ca.cert_pem(),
        &audit,
        None,
    );
    let err = probe_own_server(&files, server.addr, TIMEOUT)
        .await
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("spiffe://acme/coordinator") && text.contains("spiffe://acme/audit"),
        "{text}"
    );
}

#[tokio::test]
async fn a_probe_of_a_port_nobody_listens_on_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let files = server.files.clone();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = probe_own_server(
        &files,
        format!("127.0.0.1:{port}").parse().unwrap(),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProbeError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn a_certificate_without_a_name_to_check_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let issued = ca
        .issue(
            &Principal::Coordinator,
            &tutela_protocol::pki::LeafOptions::new(tutela_protocol::pki::Validity::days_from_now(
                1,
            )),
        )
        .unwrap();
    let files = write_set(&dir.path().join("c"), "c", &ca.cert_pem(), &issued, None);
    let err = probe_own_server(&files, "127.0.0.1:1".parse().unwrap(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::NoServerName { .. }), "{err:?}");
    assert!(err.to_string().contains("--dns"), "{err}");
}
