//! `tutela bench authz`: what enforcement costs. Decisions per second in-process, and the
//! latency of a real RPC (Identity/WhoAmI over loopback mutual TLS) with the enforcement layer
//! on and off, each measured on its own server in the same run, interleaved in rounds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};
use tutela_protocol::tls::{ReloadingServerConfig, TlsFiles};

use crate::authz::Authorizer;
use crate::enforce::{EnforceLayer, TracingSink};

/// The results, in microseconds where a latency.
#[derive(Clone, Debug)]
pub struct AuthzBench {
    pub decisions: u64,
    pub decisions_per_sec: f64,
    pub rpcs: u64,
    pub off_p50_us: f64,
    pub off_p99_us: f64,
    pub on_p50_us: f64,
    pub on_p99_us: f64,
    pub policy_lines: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A policy of the example's shape with `sites` sites (a node pattern, an officer per site).
fn policy_text(sites: usize) -> String {
    let mut p = String::from(
        "p, operator, consortium, jobs, *, allow\n\
         p, operator, consortium, identity, read, allow\n\
         p, compliance_officer, *, jobs, approve, allow\n\
         p, auditor, *, jobs, approve, deny\n\
         p, spiffe://bench/site/*/node, site:*, federation, participate, allow\n\
         g, spiffe://bench/operator/op, operator, consortium\n\
         p2, site:*, compliance_officer, 1\n",
    );
    for i in 0..sites {
        p.push_str(&format!(
            "g, spiffe://bench/site/s{i}/user/officer, compliance_officer, site:s{i}\n"
        ));
    }
    p
}

async fn serve(
    dir: &Path,
    layer: EnforceLayer,
) -> Result<(u16, tokio::sync::oneshot::Sender<()>), Box<dyn std::error::Error>> {
    let tls = ReloadingServerConfig::load(TlsFiles::in_dir(dir, "coordinator"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let router = tutela_protocol::server::builder()
        .add_service(layer.wrap(tutela_protocol::services::identity_service()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tutela_protocol::server::serve(router, listener, tls, async {
            let _ = rx.await;
        })
        .await;
    });
    Ok((port, tx))
}

/// Runs the benchmark: `decisions` in-process decisions, and `rpcs` calls per server.
pub async fn run(
    model_conf: &str,
    sites: usize,
    decisions: u64,
    rpcs: u64,
) -> Result<AuthzBench, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("model.conf"), model_conf)?;
    let text = policy_text(sites);
    std::fs::write(d.join("policy.csv"), &text)?;
    let authz = Authorizer::load(&d.join("model.conf"), &d.join("policy.csv")).await?;

    // In-process decisions: a mix of allowed, denied by default and denied by rule.
    let requests = [
        ("spiffe://bench/operator/op", "consortium", "jobs", "submit"),
        (
            "spiffe://bench/site/s1/user/officer",
            "site:s1",
            "jobs",
            "approve",
        ),
        (
            "spiffe://bench/site/s1/node",
            "site:s1",
            "federation",
            "participate",
        ),
        ("spiffe://bench/site/s1/user/x", "site:s1", "jobs", "submit"),
    ];
    let start = Instant::now();
    let mut allowed = 0u64;
    for i in 0..decisions {
        let (s, dm, o, a) = requests[(i % 4) as usize];
        allowed += u64::from(authz.decide(s, dm, o, a).allowed);
    }
    let decisions_per_sec = decisions as f64 / start.elapsed().as_secs_f64();
    // Three of four requests are allowed; a different count means the policy did not load.
    if allowed != decisions / 4 * 3 + (decisions % 4).min(3) {
        return Err(format!("unexpected decisions: {allowed} allowed of {decisions}").into());
    }

    // Certificates for loopback mTLS.
    let ca =
        CertificateAuthority::create("bench", KeyAlgorithm::EcdsaP256, Validity::days_from_now(2))?;
    std::fs::write(d.join("ca.crt"), ca.cert_pem())?;
    let mut server = LeafOptions::new(Validity::days_from_now(1));
    server.dns_names = vec!["localhost".into()];
    for (stem, who, opts) in [
        ("coordinator", Principal::Coordinator, server),
        (
            "operator-op",
            Principal::Operator { name: "op".into() },
            LeafOptions::new(Validity::days_from_now(1)),
        ),
    ] {
        let issued = ca.issue(&who, &opts)?;
        std::fs::write(d.join(format!("{stem}.crt")), issued.cert_pem)?;
        std::fs::write(d.join(format!("{stem}.key")), issued.key_pem)?;
    }
    let (port_off, stop_off) = serve(d, EnforceLayer::off()).await?;
    let (port_on, stop_on) =
        serve(d, EnforceLayer::new(authz.clone(), Arc::new(TracingSink))).await?;
    let connect = |port: u16| {
        let files = TlsFiles::in_dir(d, "operator-op");
        async move {
            let tls = ClientTls::load(
                &files,
                Some(Identity::new("bench", Principal::Coordinator)?),
            )?;
            let ch = client::connect(&format!("localhost:{port}"), tls).await?;
            Ok::<_, Box<dyn std::error::Error>>(pb::identity_client::IdentityClient::new(ch))
        }
    };
    let mut off = connect(port_off).await?;
    let mut on = connect(port_on).await?;
    let (mut t_off, mut t_on) = (Vec::new(), Vec::new());
    // Warm-up, then interleaved rounds of 100 calls so both see the same machine load.
    for _ in 0..200 {
        off.who_am_i(pb::WhoAmIRequest::default()).await?;
        on.who_am_i(pb::WhoAmIRequest::default()).await?;
    }
    let rounds = rpcs.div_ceil(100);
    for _ in 0..rounds {
        for (client, times) in [(&mut off, &mut t_off), (&mut on, &mut t_on)] {
            for _ in 0..100 {
                let t = Instant::now();
                client.who_am_i(pb::WhoAmIRequest::default()).await?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let _ = stop_off.send(());
    let _ = stop_on.send(());
    tokio::time::sleep(Duration::from_millis(50)).await;
    t_off.sort_by(f64::total_cmp);
    t_on.sort_by(f64::total_cmp);
    Ok(AuthzBench {
        decisions,
        decisions_per_sec,
        rpcs: rounds * 100,
        off_p50_us: percentile(&t_off, 0.5),
        off_p99_us: percentile(&t_off, 0.99),
        on_p50_us: percentile(&t_on, 0.5),
        on_p99_us: percentile(&t_on, 0.99),
        policy_lines: text.lines().count(),
    })
}
