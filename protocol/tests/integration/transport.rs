//! Mutual TLS on loopback with certificates made at test time: who is served, who is refused, and
//! how a reloaded CRL or certificate takes effect without a restart.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use time::OffsetDateTime;
use tonic::Code;
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb::WhoAmIRequest;
use tutela_protocol::pb::identity_client::IdentityClient;
use tutela_protocol::pki::{LeafOptions, Validity};

async fn who_am_i(
    tls: ClientTls,
    server: &TestServer,
    site: &str,
) -> Result<tutela_protocol::pb::WhoAmIResponse, tonic::Status> {
    let channel = channel(server.addr, tls)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    IdentityClient::new(channel)
        .who_am_i(WhoAmIRequest {
            act_for_site: site.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn valid_client_is_served_and_its_identity_reaches_the_handler() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let coordinator: Identity = "spiffe://acme/coordinator".parse().unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, Some(coordinator));

    let me = who_am_i(tls.clone(), &server, "").await.unwrap();
    assert_eq!(me.identity, "spiffe://acme/site/st-mary/node");
    assert_eq!(me.role, "node");
    assert_eq!(me.site, "st-mary");
    assert_eq!(me.consortium, "acme");
    assert_eq!(me.serial, issued.serial_hex);

    // Acting for its own site is fine.
    assert!(who_am_i(tls, &server, "st-mary").await.is_ok());
}

#[tokio::test]
async fn a_node_acting_for_another_site_is_denied_by_the_handler() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);
    let err = who_am_i(tls, &server, "general").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("spiffe://acme/site/st-mary/node may not act for site \"general\""),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let m = material(&server.files);
    let config = rustls::ClientConfig::builder_with_provider(tutela_protocol::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(m.roots.clone())
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = ClientTls {
        config: Arc::new(config),
        expect_server: None,
    };
    let err = who_am_i(tls, &server, "").await.unwrap_err();
    assert_refused(&err, "CertificateRequired");
    assert!(server.refused("no_client_cert").await >= 1.0);
    assert_eq!(server.refused("unknown_ca").await, 0.0);
}

/// Under TLS 1.3 the client learns of a refused certificate at its first request: the server's
/// alert names the reason.
fn assert_refused(err: &tonic::Status, alert: &str) {
    let text = format!("{err:?}");
    assert!(
        text.contains(&format!("received fatal alert: {alert}")),
        "expected alert {alert}, got {text}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    // Same consortium name, different key: an impostor CA.
    let rogue = common::ca(CONSORTIUM);
    let issued = rogue
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    // The client trusts the real CA for the server, but presents the rogue certificate.
    let files = write_set(
        &dir.path().join("c"),
        "client",
        &ca.cert_pem(),
        &issued,
        None,
    );
    let tls = ClientTls::load(&files, None).unwrap();
    let err = who_am_i(tls, &server, "").await.unwrap_err();
    // The rogue CA's signature does not verify under the real CA's key.
    assert_refused(&err, "DecryptError");
    assert!(server.refused("bad_certificate").await >= 1.0);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let issued = ca
        .issue(&node("st-mary"), &LeafOptions::new(expired))
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);
    let err = who_am_i(tls, &server, "").await.unwrap_err();
    assert_refused(&err, "CertificateExpired");
    assert!(server.refused("expired").await >= 1.0);
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_after_the_crl_is_reloaded_and_its_live_connection_is_cut()
{
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);

    // Served before revocation, on a connection that stays open.
    let live = channel(server.addr, tls.clone()).await.unwrap();
    let mut live_client = IdentityClient::new(live);
    live_client
        .who_am_i(WhoAmIRequest::default())
        .await
        .unwrap();

    // The CA revokes the certificate; the server reloads its CRL without a restart.
    let crl = crl_with(&ca, &[&issued.serial_hex], 2);
    std::fs::write(server.files.crl.as_ref().unwrap(), crl).unwrap();
    assert!(
        server.tls.reload().unwrap(),
        "the CRL changed, so the configuration must reload"
    );

    // A new connection is refused at the handshake.
    let err = who_am_i(tls.clone(), &server, "").await.unwrap_err();
    assert_refused(&err, "CertificateRevoked");
    assert!(server.refused("revoked").await >= 1.0);

    // The connection opened before the revocation is closed by the server.
    let mut cut = false;
    for _ in 0..50 {
        if live_client
            .who_am_i(WhoAmIRequest::default())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cut, "the revoked client's live connection must be closed");

    // Another, unrevoked client is still served.
    let other = ca
        .issue(
            &node("general"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c2"), &ca, &other, None);
    assert!(who_am_i(tls, &server, "").await.is_ok());
}

#[tokio::test]
async fn the_watcher_picks_up_a_new_crl_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let _watcher = server.tls.spawn_watcher(Duration::from_millis(50));
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);
    assert!(who_am_i(tls.clone(), &server, "").await.is_ok());
    std::fs::write(
        server.files.crl.as_ref().unwrap(),
        crl_with(&ca, &[&issued.serial_hex], 2),
    )
    .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if who_am_i(tls.clone(), &server, "").await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the watcher should have reloaded the CRL");
}

#[tokio::test]
async fn a_broken_crl_file_keeps_the_previous_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let crl_path = server.files.crl.clone().unwrap();
    std::fs::write(&crl_path, "not a crl").unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(
        err.to_string().contains(&crl_path.display().to_string()),
        "{err}"
    );
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);
    assert!(who_am_i(tls, &server, "").await.is_ok());
}

#[tokio::test]
async fn a_renewed_server_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let renewed = ca.issue(&Principal::Coordinator, &server_opts()).unwrap();
    std::fs::write(&server.files.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&server.files.key, &renewed.key_pem).unwrap();
    assert!(server.tls.reload().unwrap());

    // Look at the certificate the server presents now.
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let files = write_set(
        &dir.path().join("c"),
        "client",
        &ca.cert_pem(),
        &issued,
        None,
    );
    let config = tutela_protocol::tls::client_config(&material(&files)).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let leaf = &stream.get_ref().1.peer_certificates().unwrap()[0];
    assert_eq!(
        tutela_protocol::pki::serial_of_cert_der(leaf).unwrap(),
        renewed.serial_hex
    );
}

#[tokio::test]
async fn a_client_refuses_a_server_with_the_wrong_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    // The server is the audit service, but the node expects the coordinator.
    let server = start_server(dir.path(), &ca, Principal::Audit).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let coordinator: Identity = "spiffe://acme/coordinator".parse().unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, Some(coordinator));
    let err = channel(server.addr, tls).await.unwrap_err();
    let chain = format!("{:?}", anyhow_chain(&err));
    assert!(
        chain.contains("not the expected spiffe://acme/coordinator"),
        "{chain}"
    );
}

fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}

#[tokio::test]
async fn a_certificate_of_another_consortium_signed_by_a_trusted_ca_is_refused() {
    // A site trusts two consortia's CAs in one bundle; a node of the other consortium must still
    // not get into this one.
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let other = common::ca("globex");
    let issued = ca.issue(&Principal::Coordinator, &server_opts()).unwrap();
    let bundle = format!("{}{}", ca.cert_pem(), other.cert_pem());
    let files = write_set(&dir.path().join("server"), "server", &bundle, &issued, None);
    init_crypto();
    let tls = tutela_protocol::tls::ReloadingServerConfig::load(files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tutela_protocol::server::builder()
        .add_service(tutela_protocol::services::identity_service());
    let metrics = tutela_protocol::metrics::prometheus::Registry::new();
    tokio::spawn(tutela_protocol::server::serve_with_metrics(
        router,
        listener,
        tls,
        tutela_protocol::metrics::TlsMetrics::register(&metrics).unwrap(),
        std::future::pending(),
    ));

    let foreign = other
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let cfiles = write_set(&dir.path().join("c"), "client", &bundle, &foreign, None);
    let channel = channel(addr, ClientTls::load(&cfiles, None).unwrap())
        .await
        .unwrap();
    let err = IdentityClient::new(channel)
        .who_am_i(WhoAmIRequest::default())
        .await
        .unwrap_err();
    assert_refused(&err, "AccessDenied");
    // Counted as an identity this service does not take, not as an unknown CA (the server's
    // accept task may count a moment after the client saw the alert).
    let counted = "tutela_tls_handshakes_refused_total{reason=\"wrong_identity\"} 1\n";
    let mut text = String::new();
    for _ in 0..100 {
        text = tutela_protocol::metrics::render(&metrics).unwrap();
        if text.contains(counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains(counted), "{text}");
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let ca = ca(CONSORTIUM);
    let server = start_server(dir.path(), &ca, Principal::Coordinator).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.path().join("c"), &ca, &issued, None);
    let ch = channel(server.addr, tls).await.unwrap();

    let status = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "tutela.v1.Identity".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "tutela.v1.Identity",
        "tutela.v1.ModelExchange",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}
