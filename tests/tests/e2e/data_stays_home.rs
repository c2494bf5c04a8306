//! Nothing of a site's data in what leaves it, with real processes: `tutela-audit`, a coordinator
//! with `[audit]` and three nodes, two of which hold planted faults — the malformed date
//! in an anonymized dataset, and text in a numeric column of a plain one. The job completes with
//! the healthy site; the two others decline, and their reasons, as the coordinator reports and
//! stores them and as the trail keeps them, carry a code and the column, never the value or the
//! site's paths. The stores are scanned byte for byte (database files and their WALs).

use std::path::Path;
use std::time::Duration;

use tutela_e2e::consortium::{AuditPolicy, Consortium, breast_cancer_shares, job_spec};
use tutela_e2e::free_port;
use tutela_protocol::pb;

/// Every file under `dir`, concatenated (databases, WALs, journals).
fn bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(bytes_under(&path));
        } else if let Ok(b) = std::fs::read(&path) {
            out.extend(b);
        }
    }
    out
}

/// Waits (up to a minute) until a node's log has `needle`.
async fn wait_for_log(log: &Path, needle: &str) {
    for _ in 0..600 {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never said {needle:?}", log.display());
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cell_value_or_path_reaches_the_coordinator_or_the_trail() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Consortium::new(d);
    let audit_port = free_port();
    let _audit = c.start_audit(audit_port, AuditPolicy::Open);
    c.coordinator_extra = format!("[audit]\nendpoint = \"localhost:{audit_port}\"\n");
    c.start_coordinator();
    let (header, shares, _test) = breast_cancer_shares(3);

    c.start_node("st-mary", &header, &shares[0], "");
    // riverside: text where a number belongs (the file's third line, first column).
    let mut planted = shares[2].clone();
    let mut cells: Vec<String> = planted[1].split(',').map(String::from).collect();
    assert_eq!(header.split(',').next(), Some("mean_radius"));
    cells[0] = "forty-two".into();
    planted[1] = cells.join(",");
    // The node checks its data at start and offers no dataset that fails, so both sites start
    // with good data and the bad cells are planted (atomically) once each node has said its
    // dataset is ready: the first task finds them.
    c.start_node("riverside", &header, &shares[2], "");
    // general: the malformed date.
    let people = c.start_node_anonymized("general", &header, &shares[1], "");
    for site in ["riverside", "general"] {
        wait_for_log(&d.join(format!("sites/{site}/node.log")), "dataset ready").await;
    }
    let riverside_csv = d.join("sites/riverside/data.csv");
    let riverside_tmp = d.join("sites/riverside/data.csv.tmp");
    std::fs::write(
        &riverside_tmp,
        format!("{header}\n{}\n", planted.join("\n")),
    )
    .unwrap();
    std::fs::rename(&riverside_tmp, &riverside_csv).unwrap();
    let records = d.join("sites/general/records.csv");
    let text = std::fs::read_to_string(&records).unwrap();
    let dob = people[0].date_of_birth.clone();
    let bad = text.replacen(dob.as_str(), "1990-13-45", 1);
    assert_ne!(bad, text);
    let tmp = d.join("sites/general/records.csv.tmp");
    std::fs::write(&tmp, bad).unwrap();
    std::fs::rename(&tmp, &records).unwrap();

    let sites = ["st-mary", "general", "riverside"];
    let job = c
        .operator()
        .await
        .submit_job(pb::SubmitJobRequest {
            spec_toml: job_spec(1, 1, 60, &sites),
        })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job_id;
    let last = c
        .wait_for_job(&job, Duration::from_secs(240), |_| false)
        .await;
    assert_eq!(last.state, "completed", "{last:?}; logs in {}", d.display());

    // The coordinator's report of the round: the two declines, by code and column.
    let refused = &last.rounds.last().expect("a round").refused;
    let reason = |site: &str| {
        refused
            .iter()
            .find(|r| r.site == site)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("no refusal for {site}: {refused:?}"))
    };
    assert!(
        reason("general").ends_with("data.invalid_value column=date_of_birth"),
        "{}",
        reason("general")
    );
    assert!(
        reason("riverside").ends_with("data.invalid_value column=mean_radius"),
        "{}",
        reason("riverside")
    );
    // The details are in the sites' own logs.
    let general_log = std::fs::read_to_string(d.join("sites/general/node.log")).unwrap();
    assert!(general_log.contains("1990-13-45"), "{general_log}");

    // Let the trail take and checkpoint the last events, then scan both stores.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let coordinator = bytes_under(&d.join("coordinator"));
    let trail = bytes_under(&d.join("audit"));
    assert!(
        contains(&trail, "data.invalid_value"),
        "the declines are not in the trail"
    );
    let sites_dir = d.join("sites").display().to_string();
    for secret in [
        "1990-13-45",
        "forty-two",
        sites_dir.as_str(),
        "records.csv",
        "data.csv",
        people[0].name.as_str(),
        people[0].national_id.as_str(),
    ] {
        assert!(
            !contains(&coordinator, secret),
            "{secret:?} is in the coordinator's store"
        );
        assert!(
            !contains(&trail, secret),
            "{secret:?} is in the audit trail"
        );
    }
}
