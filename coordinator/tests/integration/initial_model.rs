//! The first global model cannot come from anyone: a real coordinator (in process, over loopback
//! mutual TLS, certificates made at test time) asks a fake node for a job's initial model; the
//! node answers with tensors that are not the job's model (the issue's single tensor named
//! `evil`, then the honest model with a tensor more), the upload is refused at its manifest
//! naming what is wrong, nothing is stored, and the job fails instead of starting with it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::federation::meta;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::federation_client::FederationClient;
use tutela_protocol::pb::jobs_client::JobsClient;
use tutela_protocol::pki::{CaDir, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::stream::{self, MemorySource};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};
use tutela_protocol::tls::TlsFiles;

const CONSORTIUM: &str = "init";

fn spec(name: &str) -> String {
    format!(
        r#"name = "{name}"
rounds = 1
min_sites = 1
round_deadline_secs = 20
max_round_retries = 4
update_norm_bound = 50.0
sites = ["a"]

[model]
name = "mlp"
hidden = [4]

[data]
schema = "toy"

[training]
optimizer = "adam"
learning_rate = 0.01
local_epochs = 1
batch_size = 16
"#
    )
}

/// An upload of `tensors` (zeros, but `poison`'s value at its (tensor, element)) answering
/// `task`.
async fn upload(
    node: &mut FederationClient<tonic::transport::Channel>,
    task: &str,
    tensors: Vec<TensorSpec>,
    poison: Option<(usize, usize, f32)>,
) -> Result<pb::UpdateReceipt, tonic::Status> {
    let manifest = Manifest::new(
        tensors,
        BTreeMap::from([(meta::TASK.to_string(), task.to_string())]),
    )
    .unwrap();
    let data = (0..manifest.len())
        .map(|i| {
            let mut bytes = vec![0u8; manifest.byte_len(i) as usize];
            if let Some((t, e, v)) = poison
                && t == i
            {
                bytes[e * 4..e * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            Bytes::from(bytes)
        })
        .collect();
    let (frames, _) = stream::send_for_upload(MemorySource::from_parts(manifest, data).unwrap());
    node.submit_update(frames).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_initial_model_is_refused_and_the_job_does_not_start_with_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(
        &dir.path().join("ca"),
        CONSORTIUM,
        KeyAlgorithm::EcdsaP256,
        30,
        false,
    )
    .unwrap();
    for (principal, stem) in [
        (Principal::Coordinator, "coordinator"),
        (Principal::Operator { name: "op".into() }, "op"),
        (Principal::Node { site: "a".into() }, "node-a"),
    ] {
        let mut o = LeafOptions::new(Validity::days_from_now(10));
        if principal == Principal::Coordinator {
            o.dns_names = vec!["localhost".into()];
        }
        let issued = ca.issue(&principal, &o).unwrap();
        std::fs::write(ca.dir().join(format!("{stem}.crt")), &issued.cert_pem).unwrap();
        std::fs::write(ca.dir().join(format!("{stem}.key")), &issued.key_pem).unwrap();
    }
    let data_dir = dir.path().join("coordinator");
    let c = ca.dir();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\ninsecure_no_policy = true\ninsecure_no_audit = true\n\
             [tls]\nca = \"{c}/ca.crt\"\ncert = \"{c}/coordinator.crt\"\nkey = \"{c}/coordinator.key\"\ncrl = \"{c}/crl.pem\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            data = data_dir.display(),
            c = c.display(),
        ),
    )
    .unwrap();
    let config = tutela_coordinator::Config::from_file(&path).unwrap();
    let coordinator = tutela_coordinator::Coordinator::bind(config).await.unwrap();
    let addr = format!("localhost:{}", coordinator.local_addr().unwrap().port());
    let metrics = coordinator.metrics_addr().expect("[metrics] is configured");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(coordinator.serve(async move {
        let _ = stopped.await;
    }));
    let connect = |stem: &'static str| {
        let addr = addr.clone();
        let c = c.to_path_buf();
        async move {
            let tls = ClientTls::load(
                &TlsFiles::in_dir(&c, stem),
                Some(Identity::new(CONSORTIUM, Principal::Coordinator).unwrap()),
            )
            .unwrap();
            client::connect(&addr, tls).await.unwrap()
        }
    };

    let mut node = FederationClient::new(connect("node-a").await);
    let mut tasks = node
        .connect(pb::ConnectRequest {
            datasets: vec!["toy".into()],
            node_version: "fake".into(),
            device: "cpu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut jobs = JobsClient::new(connect("op").await);
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec("rogue-init"),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    // Five attempts (max_round_retries = 4): four rogue answers, then a decline.
    let honest = vec![
        TensorSpec::new("fc0.bias", DType::F32, vec![4]),
        TensorSpec::new("fc0.weight", DType::F32, vec![4, 3]),
        TensorSpec::new("out.bias", DType::F32, vec![2]),
        TensorSpec::new("out.weight", DType::F32, vec![2, 4]),
    ];
    let mut with_extra = honest.clone();
    with_extra.push(TensorSpec::new("zz.backdoor", DType::F32, vec![1]));
    let rogue = [
        (
            vec![TensorSpec::new("evil", DType::F32, vec![1])],
            None,
            "\"evil\" is not a parameter",
        ),
        (with_extra, None, "\"zz.backdoor\" is not a parameter"),
        // The job's tensors, with a NaN or an infinity among the values: every round would start
        // from a poisoned model.
        (
            honest.clone(),
            Some((1, 5, f32::NAN)),
            "tensor \"fc0.weight\" element 5 is NaN",
        ),
        (
            honest.clone(),
            Some((3, 7, f32::NEG_INFINITY)),
            "tensor \"out.weight\" element 7 is -inf",
        ),
    ];
    for (tensors, poison, expected) in rogue {
        let task = tokio::time::timeout(Duration::from_secs(30), tasks.message())
            .await
            .expect("an INITIALIZE task in time")
            .unwrap()
            .expect("the task stream is open");
        assert_eq!(task.kind, pb::TaskKind::Initialize as i32);
        let status = upload(&mut node, &task.task_id, tensors, poison)
            .await
            .expect_err("a rogue initial model is refused");
        assert!(
            status.message().contains("the initial model") && status.message().contains(expected),
            "{status:?}"
        );
    }
    // The fifth attempt: the node declines. Free text (a cell value, a path) is refused; the typed
    // refusal is taken, and only its code and column are kept, not the note after them.
    let task = tokio::time::timeout(Duration::from_secs(30), tasks.message())
        .await
        .expect("an INITIALIZE task in time")
        .unwrap()
        .expect("the task stream is open");
    for free_text in [
        "patient 4711: HIV positive",
        "/srv/hospital/patients.csv:3: \"1990-13-45\" is not a date",
        "data.invalid_value column=date of birth",
    ] {
        let status = node
            .decline_task(pb::DeclineTaskRequest {
                task_id: task.task_id.clone(),
                reason: free_text.to_string(),
            })
            .await
            .expect_err("free text is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    node.decline_task(pb::DeclineTaskRequest {
        task_id: task.task_id.clone(),
        reason: "data.invalid_value column=date_of_birth: SECRET-1990-13-45".into(),
    })
    .await
    .expect("a typed refusal is taken");

    // The job fails without a global model; nothing was stored as one.
    let started = Instant::now();
    let status = loop {
        let s = jobs
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state != "proposed" && s.state != "running" {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.state, "failed", "{status:?}");
    assert!(
        status.reason.contains("no initial model")
            && status
                .reason
                .contains("declined: data.invalid_value column=date_of_birth"),
        "{status:?}"
    );
    assert!(
        !status.reason.contains("SECRET"),
        "a site's note was kept: {status:?}"
    );
    assert!(status.model_id.is_empty(), "{status:?}");
    let stored: Vec<_> = std::fs::read_dir(data_dir.join("models"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "{stored:?}");

    // The metrics count the four refused uploads and the decline by bounded reason, and carry
    // nothing of what the node sent.
    let text = tutela_protocol::metrics::scrape(metrics).await.unwrap();
    for (series, value) in [
        (
            "tutela_coordinator_updates_refused_total{reason=\"rejected\"}",
            4,
        ),
        (
            "tutela_coordinator_updates_refused_total{reason=\"declined\"}",
            1,
        ),
        (
            "tutela_coordinator_updates_refused_total{reason=\"deadline\"}",
            0,
        ),
        ("tutela_coordinator_updates_accepted_total", 0),
        ("tutela_coordinator_jobs_ended_total{outcome=\"failed\"}", 1),
        ("tutela_coordinator_connected_nodes", 1),
    ] {
        assert!(
            text.contains(&format!("\n{series} {value}\n")),
            "{series} is not {value}:\n{text}"
        );
    }
    assert!(!text.contains("SECRET") && !text.contains("evil"), "{text}");

    drop(tasks);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
}
