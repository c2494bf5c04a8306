//! Real processes over loopback mutual TLS: the `tutela` CLI makes the consortium's PKI, the
//! `tutela-coordinator` binary serves, and a stock Python grpcio client generated from the
//! project's .proto files calls it. Then the CA revokes the client and the running coordinator,
//! told by SIGHUP, refuses it.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::*;

fn python_call(dir: &std::path::Path, addr: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new(python())
            .arg(repo_root().join("tests/python/grpc_client.py"))
            .args(["--addr", addr])
            .arg("--ca")
            .arg(dir.join("node/ca.crt"))
            .arg("--cert")
            .arg(dir.join("node/node.crt"))
            .arg("--key")
            .arg(dir.join("node/node.key"))
            .args(extra),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn python_grpcio_client_is_served_over_mtls_and_refused_once_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tutela = bin("tutela");
    run_ok(
        Command::new(&tutela)
            .args(["pki", "init", "--consortium", "acme", "--out"])
            .arg(d.join("ca")),
    );
    run_ok(
        Command::new(&tutela)
            .args(["pki", "issue", "--role", "coordinator", "--ca"])
            .arg(d.join("ca"))
            .arg("--out")
            .arg(d.join("coordinator")),
    );
    run_ok(
        Command::new(&tutela)
            .args([
                "pki", "issue", "--role", "node", "--site", "st-mary", "--ca",
            ])
            .arg(d.join("ca"))
            .arg("--out")
            .arg(d.join("node")),
    );

    let port = free_port();
    let config = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{data}"
tls_reload_secs = 3600
# Only the transport and the Python client are under test here; no casbin policy.
insecure_no_policy = true
# Nor the audit trail (a development setup on loopback).
insecure_no_audit = true
[tls]
ca = "{c}/ca.crt"
cert = "{c}/coordinator.crt"
key = "{c}/coordinator.key"
crl = "{ca}/crl.pem"
"#,
        data = d.join("coord").display(),
        c = d.join("coordinator").display(),
        ca = d.join("ca").display(),
    );
    std::fs::write(d.join("coordinator.toml"), config).unwrap();
    let coordinator = ChildGuard::spawn(
        Command::new(bin("tutela-coordinator"))
            .arg("--config")
            .arg(d.join("coordinator.toml")),
    );
    wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(20),
    );
    let addr = format!("localhost:{port}");

    let reply = python_call(d, &addr, &["--upload"]);
    assert_eq!(
        reply["identity"], "spiffe://acme/site/st-mary/node",
        "{reply}"
    );
    assert_eq!(reply["role"], "node");
    assert_eq!(reply["health"], "SERVING");

    // The Python client computed the stream digest on its own; the server agreed (or it would
    // have refused the upload), and the id is the digest Rust computes for the same tensor.
    let data: Vec<u8> = [1.0f32, -2.0, 3.5, 0.0, 1e-3, 42.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let manifest = tutela_protocol::tensor::Manifest::new(
        vec![tutela_protocol::tensor::TensorSpec::new(
            "w",
            tutela_protocol::tensor::DType::F32,
            vec![2, 3],
        )],
        Default::default(),
    )
    .unwrap();
    let mut digest = tutela_protocol::stream::StreamDigest::new(&manifest);
    digest.update(&data);
    assert_eq!(reply["model_id"], hex::encode(digest.finish()));
    assert!(
        d.join("coord/models")
            .join(format!(
                "{}.safetensors",
                reply["model_id"].as_str().unwrap()
            ))
            .exists()
    );

    // Acting for another site: refused by the handler.
    let reply = python_call(d, &addr, &["--site", "general"]);
    assert_eq!(reply["error_code"], "PERMISSION_DENIED", "{reply}");

    // Revoke the node's certificate, refresh the CRL, and tell the coordinator.
    let serial = reply_serial(d);
    run_ok(
        Command::new(&tutela)
            .args(["pki", "revoke", "--serial", &serial, "--ca"])
            .arg(d.join("ca")),
    );
    coordinator.signal("HUP");
    let mut refused = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let reply = python_call(d, &addr, &[]);
        if reply.get("error_code").is_some() {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the revoked client must be refused after SIGHUP");
    assert_eq!(refused["error_code"], "UNAVAILABLE", "{refused}");
}

/// The node certificate's serial.
fn reply_serial(d: &std::path::Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(d.join("node/node.crt")).unwrap();
    tutela_protocol::pki::serial_of_cert_der(&der).unwrap()
}
