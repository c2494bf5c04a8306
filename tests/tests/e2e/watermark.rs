//! Watermarking at publication end to end: a coordinator with the consortium's watermark key
//! runs a job whose spec has a `[watermark]` section; the model it publishes is the watermarked
//! one (`watermark.registered` before `model.published`, the key's commitment and never the key
//! in the trail), and `tutela model verify-watermark` matches a renamed, reordered, re-serialized
//! copy of it to its registry entry and lineage (job, sites) while the unmarked aggregate and
//! another key are not matched. A job with `[watermark]` at a coordinator without a key is
//! refused at submission. `tutela audit verify` passes over it all.

use std::process::Command;
use std::time::Duration;

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::{bin, free_port, run_ok};
use tutela_protocol::checkpoint::{SafetensorsReader, SafetensorsWriter};
use tutela_protocol::pb;

/// `file` rewritten with its tensors renamed, in reverse order, as bf16.
fn disguised_copy(file: &std::path::Path, out: &std::path::Path) {
    let mut r = SafetensorsReader::open(file).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = r
        .names()
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let (s, v) = r.read_f32(&n).unwrap();
            (format!("layer_{i}.w"), s, v)
        })
        .collect();
    tensors.reverse();
    let declared: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), safetensors::Dtype::BF16, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(out, &declared, None).unwrap();
    for (n, _, v) in &tensors {
        let bytes = tutela_protocol::checkpoint::from_f32(safetensors::Dtype::BF16, v).unwrap();
        w.write_next(n, &bytes).unwrap();
    }
    w.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_model_is_watermarked_registered_and_verified_against_the_trail() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    let certs = c.certs();
    let key = d.join("watermark.key");
    run_ok(
        Command::new(bin("tutela"))
            .args(["model", "watermark-key", "--output"])
            .arg(&key),
    );
    let sites = ["st-mary", "general", "riverside"];
    let spec = format!("{}\n[watermark]\n", job_spec(2, 3, 60, &sites));

    // Without a key, a job asking for a watermark is refused at submission.
    c.start_coordinator();
    let refused = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
        })
        .await
        .expect_err("no key: refused");
    assert!(refused.message().contains("key_file"), "{refused:?}");

    c.coordinator_extra = format!(
        "[audit]\nendpoint = \"localhost:{audit_port}\"\n[watermark]\nkey_file = \"{}\"\n",
        key.display()
    );
    c.start_coordinator();
    let (header, shares, _test) = breast_cancer_shares(3);
    for (site, rows) in sites.iter().zip(&shares) {
        c.start_node(site, &header, rows, "");
    }
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest { spec_toml: spec })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id;
    let last = c
        .wait_for_job(&job, Duration::from_secs(300), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());
    let published = last.model_id.clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let source = |cmd: &mut Command| {
        cmd.arg("--audit")
            .arg(format!("localhost:{audit_port}"))
            .arg("--tls-dir")
            .arg(&certs)
            .arg("--stem")
            .arg("operator-op");
    };
    let mut log_cmd = Command::new(bin("tutela"));
    log_cmd.args(["audit", "log", "--json"]);
    source(&mut log_cmd);
    let out = run_ok(&mut log_cmd);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seq_of = |action: &str| {
        events
            .iter()
            .find(|e| e["action"] == action && e["subject"] == published.as_str())
            .unwrap_or_else(|| panic!("no {action} for {published}: {events:#?}"))
    };
    let registered = seq_of("watermark.registered");
    let p = &registered["payload"];
    assert_eq!(p["job"], job.as_str());
    assert_eq!(p["scheme"], "spread_spectrum_v1");
    let key_hex = std::fs::read_to_string(&key).unwrap();
    assert!(
        !out.stdout.is_empty() && !String::from_utf8_lossy(&out.stdout).contains(key_hex.trim())
    );
    assert!(registered["seq"].as_u64() < seq_of("model.published")["seq"].as_u64());
    let source_digest = p["source_digest"].as_str().unwrap().to_string();
    assert_ne!(source_digest, published);
    // The unmarked aggregate's digest is in the trail, but the coordinator never serves it
    // (review 2026-12-07: `ModelExchange.Download` handed it to any caller); the published,
    // marked model it serves.
    let mut models_client =
        pb::model_exchange_client::ModelExchangeClient::new(c.operator_channel().await);
    let refused = models_client
        .download(pb::DownloadRequest {
            model_id: source_digest.clone(),
        })
        .await
        .err()
        .expect("the unmarked source was served");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("never served"), "{refused}");
    models_client
        .download(pb::DownloadRequest {
            model_id: published.clone(),
        })
        .await
        .expect("the published model is served");
    // The registry's version of the job is the published (marked) model, never its source.
    let listed = pb::registry_client::RegistryClient::new(c.operator_channel().await)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let digests: Vec<&str> = listed
        .models
        .iter()
        .flat_map(|m| m.versions.iter().map(|v| v.model_digest.as_str()))
        .collect();
    assert!(digests.contains(&published.as_str()), "{listed:?}");
    assert!(!digests.contains(&source_digest.as_str()), "{listed:?}");
    let completed = events
        .iter()
        .find(|e| e["action"] == "job.completed" && e["subject"] == job.as_str())
        .unwrap();
    assert_eq!(completed["payload"]["model_digest"], published.as_str());

    // A renamed, reordered, bf16 copy of the published model is matched to its entry.
    let copy = d.join("leaked.safetensors");
    disguised_copy(std::path::Path::new(&last.model_path), &copy);
    let mut verify = Command::new(bin("tutela"));
    verify
        .args(["model", "verify-watermark"])
        .arg(&copy)
        .arg("--key")
        .arg(&key);
    source(&mut verify);
    let out = run_ok(&mut verify);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("tutela model verify-watermark (leaked copy):\n{text}");
    assert!(text.contains("DETECTED"), "{text}");
    assert!(text.contains(&job) && text.contains(&published), "{text}");
    for site in sites {
        assert!(text.contains(site), "{text}");
    }

    // The unmarked aggregate, and the right file under another key: not detected (status 1).
    let models = d.join("coordinator").join("models");
    let mut unmarked = Command::new(bin("tutela"));
    unmarked
        .args(["model", "verify-watermark"])
        .arg(models.join(format!("{source_digest}.safetensors")))
        .arg("--key")
        .arg(&key);
    source(&mut unmarked);
    let out = unmarked.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not detected"),
        "{out:?}"
    );
    let other_key = d.join("other.key");
    run_ok(
        Command::new(bin("tutela"))
            .args(["model", "watermark-key", "--output"])
            .arg(&other_key),
    );
    let mut other = Command::new(bin("tutela"));
    other
        .args(["model", "verify-watermark"])
        .arg(&copy)
        .arg("--key")
        .arg(&other_key);
    source(&mut other);
    let out = other.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none under this key"),
        "{out:?}"
    );

    let mut check = Command::new(bin("tutela"));
    check.args(["audit", "verify"]);
    source(&mut check);
    let out = run_ok(&mut check);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: "));
}
