//! Tests of the tamper-evidence core: RFC 8785 vectors, the hash chain, tamper detection, RFC 6962
//! Merkle trees and proofs, signed checkpoints.

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::json;
use tutela_audit::canonical::{canonical_json, es_number};
use tutela_audit::merkle::{
    self, audit_path, consistency_proof, empty_root, leaf_hash, node_hash, verify_consistency,
    verify_inclusion,
};
use tutela_audit::{
    Action, Chain, ChainError, Checkpoint, CheckpointError, CheckpointVerifier, Event, MerkleTree,
    ProofError, SignedCheckpoint, Timestamp, Update, VerifyError, verify_log,
};

type Hash = [u8; 32];

fn sha(data: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

fn key(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

const LOG: &str = "spiffe://consortium/audit";

// ---------------------------------------------------------------- RFC 8785

/// RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
#[test]
fn rfc8785_number_table() {
    let table: &[(u64, &str)] = &[
        (0x0000000000000000, "0"),
        (0x8000000000000000, "0"),
        (0x0000000000000001, "5e-324"),
        (0x8000000000000001, "-5e-324"),
        (0x7fefffffffffffff, "1.7976931348623157e+308"),
        (0xffefffffffffffff, "-1.7976931348623157e+308"),
        (0x4340000000000000, "9007199254740992"),
        (0xc340000000000000, "-9007199254740992"),
        (0x4430000000000000, "295147905179352830000"),
        (0x44b52d02c7e14af5, "9.999999999999997e+22"),
        (0x44b52d02c7e14af6, "1e+23"),
        (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
        (0x444b1ae4d6e2ef4e, "999999999999999700000"),
        (0x444b1ae4d6e2ef4f, "999999999999999900000"),
        (0x444b1ae4d6e2ef50, "1e+21"),
        (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
        (0x3eb0c6f7a0b5ed8d, "0.000001"),
        (0x41b3de4355555553, "333333333.3333332"),
        (0x41b3de4355555554, "333333333.33333325"),
        (0x41b3de4355555555, "333333333.3333333"),
        (0x41b3de4355555556, "333333333.3333334"),
        (0x41b3de4355555557, "333333333.33333343"),
        (0xbecbf647612f3696, "-0.0000033333333333333333"),
        (0x43143ff3c1cb0959, "1424953923781206.2"),
    ];
    for &(bits, text) in table {
        let x = f64::from_bits(bits);
        // Self-check of the vector: the text parses back to the same double (except -0).
        if bits != 0x8000000000000000 {
            assert_eq!(
                text.parse::<f64>().unwrap().to_bits(),
                bits,
                "vector {text}"
            );
        }
        assert_eq!(es_number(x), text, "bits {bits:#018x}");
        // And through a serde_json value, as payloads arrive.
        assert_eq!(canonical_json(&json!(x)), text, "json {bits:#018x}");
    }
}

#[test]
fn rfc8785_number_boundaries() {
    for (x, text) in [
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (-0.0, "0"),
        (9007199254740991.0, "9007199254740991"),
        (4.5, "4.5"),
        (2e-3, "0.002"),
        (1e30, "1e+30"),
        (1.5e300, "1.5e+300"),
    ] {
        assert_eq!(es_number(x), text, "{x:e}");
    }
    // Integers are written exactly (documented deviation above 2^53).
    assert_eq!(
        canonical_json(&json!(9007199254740991u64)),
        "9007199254740991"
    );
    assert_eq!(
        canonical_json(&json!(-9007199254740991i64)),
        "-9007199254740991"
    );
    assert_eq!(canonical_json(&json!(u64::MAX)), "18446744073709551615");
}

/// RFC 8785 §3.2.2 / §3.2.4 example.
#[test]
fn rfc8785_example_object() {
    let input = r#"{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"#;
    let v: serde_json::Value = serde_json::from_str(input).unwrap();
    assert_eq!(
        canonical_json(&v),
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
    );
}

/// RFC 8785 §3.2.3: sorting by UTF-16 code units (the emoji, a surrogate pair, sorts before U+FB33).
#[test]
fn rfc8785_key_sorting_utf16() {
    let input = r#"{
      "\u20ac": "Euro Sign",
      "\r": "Carriage Return",
      "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One",
      "\ud83d\ude00": "Emoji: Grinning Face",
      "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"
    }"#;
    let v: serde_json::Value = serde_json::from_str(input).unwrap();
    let text = canonical_json(&v);
    let order = [
        "\\r",
        "1",
        "\u{80}",
        "\u{f6}",
        "\u{20ac}",
        "\u{1f600}",
        "\u{fb33}",
    ];
    let mut pos = 0;
    for k in order {
        let at = text[pos..]
            .find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k:?} out of order in {text}"));
        pos += at + 1;
    }
}

#[test]
fn rfc8785_string_escaping() {
    let v = json!("a\u{0}\u{1f}\u{7f}\u{8}\t\n\u{c}\r\"\\/é");
    assert_eq!(
        canonical_json(&v),
        "\"a\\u0000\\u001f\u{7f}\\b\\t\\n\\f\\r\\\"\\\\/é\""
    );
}

/// Random doubles: canonical text round-trips to the same double and matches the tie rule.
#[test]
fn canonical_numbers_round_trip_random() {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..200_000 {
        let x = f64::from_bits(rng.random::<u64>());
        if !x.is_finite() {
            continue;
        }
        let text = es_number(x);
        let back: f64 = text.parse().unwrap();
        assert!(back == x, "{x:e} -> {text}");
        // Through serde_json text and back (as payloads are stored and read): same canonical form.
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&json!(x)).unwrap()).unwrap();
        assert_eq!(canonical_json(&v), text, "{x:e}");
    }
}

// ---------------------------------------------------------------- events and the chain

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_795_000_000_000 + ms).unwrap()
}

fn build_log(n: u64) -> Vec<Event> {
    let mut chain = Chain::new();
    (0..n)
        .map(|i| {
            chain
                .append(
                    ts(i as i64),
                    format!("spiffe://consortium/site/s{}/user/officer", i % 3),
                    Action::ALL[(i % 14) as usize],
                    format!("job-{}", i / 5),
                    json!({"i": i, "note": "ok\n", "eps": 0.5, "nested": {"b": 1, "a": [true, null]}}),
                )
                .unwrap()
        })
        .collect()
}

/// Checkpoint signed by `key(1)` over the first `size` events.
fn checkpoint(events: &[Event], size: u64) -> SignedCheckpoint {
    let mut t = MerkleTree::new();
    for e in &events[..size as usize] {
        t.push_entry(&e.hash);
    }
    Checkpoint {
        tree_size: size,
        root: t.root(),
        timestamp: ts(size as i64),
        log_id: LOG.into(),
    }
    .sign(&key(1))
    .unwrap()
}

fn pk() -> Vec<u8> {
    key(1).public_key().as_ref().to_vec()
}

#[test]
fn action_names_round_trip() {
    let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "node.registered",
            "job.proposed",
            "job.approved",
            "job.rejected",
            "job.started",
            "round.completed",
            "update.refused",
            "job.completed",
            "job.failed",
            "model.published",
            "watermark.registered",
            "policy.decision",
            "certificate.issued",
            "certificate.revoked",
            "dataset.deidentified",
            "dataset.text_deidentified",
            "privacy.spent",
            "ledger.restored",
            "model.registered",
            "model.stage_changed",
            "model.initialized",
            "audit.quarantined",
            "policy.loaded",
            "statistics.published"
        ]
    );
    for a in Action::ALL {
        assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
        assert_eq!(serde_json::to_value(a).unwrap(), json!(a.as_str()));
    }
    assert!("job.deleted".parse::<Action>().is_err());
}

#[test]
fn timestamp_has_one_spelling() {
    let t: Timestamp = "2026-11-24T12:34:56.789Z".parse().unwrap();
    assert_eq!(t.to_string(), "2026-11-24T12:34:56.789Z");
    for bad in [
        "2026-11-24T12:34:56.789+00:00",
        "2026-11-24T12:34:56Z",
        "2026-11-24T12:34:56.7890Z",
        "2026-11-24t12:34:56.789z",
        "yesterday",
    ] {
        assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
    }
    assert_eq!(
        Timestamp::from_unix_millis(-1).unwrap().to_string(),
        "1969-12-31T23:59:59.999Z"
    );
    assert!(Timestamp::from_unix_millis(i64::MAX).is_err());
}

#[test]
fn event_hash_is_sha256_of_generic_canonical_json() {
    for e in build_log(20) {
        let mut v = serde_json::to_value(&e).unwrap();
        v.as_object_mut().unwrap().remove("hash");
        let generic = canonical_json(&v);
        assert_eq!(e.hash_input(), generic);
        assert_eq!(e.hash, sha(generic.as_bytes()));
    }
}

#[test]
fn event_hash_input_golden() {
    let mut chain = Chain::new();
    let e = chain
        .append(
            "2026-11-24T12:00:00.000Z".parse().unwrap(),
            "spiffe://c/operator/ann",
            Action::JobProposed,
            "job-1",
            json!({"spec_digest": "ab", "sites": ["b", "a"]}),
        )
        .unwrap();
    let expected = format!(
        r#"{{"action":"job.proposed","actor":"spiffe://c/operator/ann","payload":{{"sites":["b","a"],"spec_digest":"ab"}},"prev_hash":"{}","seq":0,"subject":"job-1","timestamp":"2026-11-24T12:00:00.000Z"}}"#,
        "0".repeat(64)
    );
    assert_eq!(e.hash_input(), expected);
    assert_eq!(e.hash, sha(expected.as_bytes()));
}

#[test]
fn chain_append_links_and_round_trips() {
    let events = build_log(50);
    assert_eq!(events[0].seq, 0);
    assert_eq!(events[0].prev_hash, [0u8; 32]);
    for w in events.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1);
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    // JSON round trip keeps every hash valid.
    let text = serde_json::to_string(&events).unwrap();
    let back: Vec<Event> = serde_json::from_str(&text).unwrap();
    assert_eq!(back, events);
    let cps = [checkpoint(&events, 10), checkpoint(&events, 50)];
    let report = verify_log(&back, &cps, &pk()).unwrap();
    assert_eq!(report.events, 50);
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.latest_checkpoint, Some(50));
    assert_eq!(report.unanchored, 0);
    assert_eq!(report.head, events[49].hash);
    // Resume continues the same chain.
    let mut chain = Chain::resume(&events[49]).unwrap();
    let e = chain
        .append(ts(100), "spiffe://c/x", Action::JobFailed, "j", json!(null))
        .unwrap();
    assert_eq!((e.seq, e.prev_hash), (50, events[49].hash));
    // Empty log verifies.
    assert_eq!(verify_log(&[], &[], &pk()).unwrap().events, 0);
}

#[test]
fn chain_refuses_bad_input() {
    let mut chain = Chain::new();
    assert!(matches!(
        chain.append(ts(0), "alice", Action::JobStarted, "j", json!({})),
        Err(ChainError::BadActor(_))
    ));
    chain
        .append(ts(5), "spiffe://c/a", Action::JobStarted, "j", json!({}))
        .unwrap();
    assert!(matches!(
        chain.append(ts(4), "spiffe://c/a", Action::JobStarted, "j", json!({})),
        Err(ChainError::TimestampBeforePrevious {
            previous_seq: 0,
            ..
        })
    ));
    let mut bad = build_log(3).pop().unwrap();
    bad.subject.push('!');
    assert_eq!(Chain::resume(&bad), Err(ChainError::BadHead { seq: 2 }));
}

// ---------------------------------------------------------------- tampering

#[test]
fn edited_payload_is_hash_mismatch_at_its_seq() {
    let mut events = build_log(30);
    events[17].payload["i"] = json!(999);
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::HashMismatch { seq: 17, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("seq 17"), "{err}");
}

#[test]
fn edited_payload_with_recomputed_hash_breaks_the_next_link() {
    let mut events = build_log(30);
    events[17].payload["i"] = json!(999);
    events[17].hash = events[17].compute_hash();
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::LinkBroken { seq: 18, .. }),
        "{err}"
    );
}

#[test]
fn deleted_row_is_a_gap() {
    let mut events = build_log(30);
    events.remove(12);
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Gap {
            expected: 12,
            found: 13
        }
    );
    assert!(err.to_string().contains("after seq 11"), "{err}");
    // Deleting the first row.
    let mut events = build_log(5);
    events.remove(0);
    assert_eq!(
        verify_log(&events, &[], &pk()).unwrap_err(),
        VerifyError::Gap {
            expected: 0,
            found: 1
        }
    );
}

#[test]
fn deleted_row_renumbered_is_caught() {
    let mut events = build_log(30);
    events.remove(12);
    for e in &mut events[12..] {
        e.seq -= 1;
    }
    // Renumbering without rehashing: the moved row's hash no longer matches.
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::HashMismatch { seq: 12, .. }),
        "{err}"
    );
    // Rehashing each row in place (but not relinking): the link at 12 is broken.
    for e in &mut events[12..] {
        e.hash = e.compute_hash();
    }
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::LinkBroken { seq: 12, .. }),
        "{err}"
    );
}

#[test]
fn swapped_rows_are_out_of_order() {
    let mut events = build_log(30);
    events.swap(8, 9);
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::OutOfOrder {
            position: 8,
            expected: 8,
            found: 9
        }
    );
    // Swapping contents but keeping the seq column: the row at 8 no longer hashes.
    let mut events = build_log(30);
    events.swap(8, 9);
    events[8].seq = 8;
    events[9].seq = 9;
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::HashMismatch { seq: 8, .. }),
        "{err}"
    );
    // A duplicated row.
    let mut events = build_log(10);
    events.insert(5, events[4].clone());
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::OutOfOrder {
            position: 5,
            expected: 5,
            found: 4
        }
    );
}

#[test]
fn truncated_tail_is_named() {
    let events = build_log(40);
    let cps = [checkpoint(&events, 20), checkpoint(&events, 40)];
    let err = verify_log(&events[..33], &cps, &pk()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Truncated {
            checkpoint_size: 40,
            log_len: 33
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("0..=39") && text.contains("ends at seq 32"),
        "{text}"
    );
}

#[test]
fn rewritten_history_with_recomputed_chain_fails_the_signed_root() {
    let events = build_log(40);
    let cps = [
        checkpoint(&events, 10),
        checkpoint(&events, 20),
        checkpoint(&events, 40),
    ];
    // Rewrite from seq 15 on: edit and recompute the whole chain, so hashes and links are fine.
    let mut forged = events[..15].to_vec();
    let mut chain = Chain::resume(&events[14]).unwrap();
    for e in &events[15..] {
        let payload = if e.seq == 15 {
            json!({"forged": true})
        } else {
            e.payload.clone()
        };
        forged.push(
            chain
                .append(
                    e.timestamp,
                    e.actor.clone(),
                    e.action,
                    e.subject.clone(),
                    payload,
                )
                .unwrap(),
        );
    }
    let err = verify_log(&forged, &cps, &pk()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::CheckpointRootMismatch {
            tree_size: 20,
            last_good_size: Some(10)
        }
    );
    assert!(err.to_string().contains("10..=19"), "{err}");
    // Re-signing with another key does not help: the signature fails.
    let mut resigned = cps.to_vec();
    let mut t = MerkleTree::new();
    forged[..20].iter().for_each(|e| t.push_entry(&e.hash));
    resigned[1] = Checkpoint {
        root: t.root(),
        ..cps[1].checkpoint.clone()
    }
    .sign(&key(2))
    .unwrap();
    let err = verify_log(&forged, &resigned, &pk()).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::CheckpointInvalid {
                tree_size: 20,
                why: CheckpointError::BadSignature { .. }
            }
        ),
        "{err}"
    );
}

#[test]
fn timestamp_going_back_is_named() {
    let mut events = build_log(10);
    events[6].timestamp = ts(1);
    events[6].hash = events[6].compute_hash();
    // Relink the rest so that only the timestamp is wrong.
    for i in 7..10 {
        events[i].prev_hash = events[i - 1].hash;
        events[i].hash = events[i].compute_hash();
    }
    let err = verify_log(&events, &[], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::TimestampWentBack { seq: 6, .. }),
        "{err}"
    );
}

#[test]
fn first_bad_seq_wins() {
    let mut events = build_log(30);
    events[25].payload = json!(1);
    events[7].subject = "x".into();
    let err = verify_log(&events, &[checkpoint(&build_log(30), 30)], &pk()).unwrap_err();
    assert!(
        matches!(err, VerifyError::HashMismatch { seq: 7, .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------- Merkle tree

fn entries(n: usize) -> Vec<Hash> {
    (0..n).map(|i| sha(&(i as u64).to_be_bytes())).collect()
}

fn leaves(n: usize) -> Vec<Hash> {
    entries(n).iter().map(leaf_hash).collect()
}

/// An independent MTH: bottom-up by levels, hashing pairs and promoting an odd last node, which
/// yields the same tree as RFC 6962's largest-power-of-two split.
fn naive_root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return sha(&[]);
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    node_hash(&p[0], &p[1])
                } else {
                    p[0]
                }
            })
            .collect();
    }
    level[0]
}

#[test]
fn merkle_hash_prefixes() {
    let e = [7u8; 32];
    let mut b = vec![0u8];
    b.extend_from_slice(&e);
    assert_eq!(leaf_hash(&e), sha(&b));
    let mut b = vec![1u8];
    b.extend_from_slice(&[2u8; 32]);
    b.extend_from_slice(&[3u8; 32]);
    assert_eq!(node_hash(&[2u8; 32], &[3u8; 32]), sha(&b));
    assert_eq!(merkle::root(&[]), sha(&[]));
    assert_eq!(empty_root(), sha(&[]));
}

#[test]
fn merkle_roots_hand_computed_1_to_8() {
    let l = leaves(8);
    let h = |a: &Hash, b: &Hash| node_hash(a, b);
    let h01 = h(&l[0], &l[1]);
    let h23 = h(&l[2], &l[3]);
    let h45 = h(&l[4], &l[5]);
    let h67 = h(&l[6], &l[7]);
    let h0123 = h(&h01, &h23);
    let expected = [
        l[0],
        h01,
        h(&h01, &l[2]),
        h0123,
        h(&h0123, &l[4]),
        h(&h0123, &h45),
        h(&h0123, &h(&h45, &l[6])),
        h(&h0123, &h(&h45, &h67)),
    ];
    for n in 1..=8 {
        assert_eq!(merkle::root(&l[..n]), expected[n - 1], "n = {n}");
    }
}

#[test]
fn merkle_root_matches_naive_and_incremental_up_to_100() {
    let l = leaves(100);
    let mut tree = MerkleTree::new();
    for (n, e) in entries(100).iter().enumerate() {
        assert_eq!(merkle::root(&l[..n]), naive_root(&l[..n]), "n = {n}");
        assert_eq!(tree.root(), naive_root(&l[..n]), "incremental n = {n}");
        tree.push_entry(e);
    }
    assert_eq!(tree.root(), naive_root(&l));
    assert_eq!(tree.root_at(37).unwrap(), naive_root(&l[..37]));
    assert!(matches!(
        tree.root_at(101),
        Err(ProofError::SizeOutOfRange { .. })
    ));
}

#[test]
fn inclusion_proofs_up_to_64() {
    let l = leaves(64);
    for n in 1..=64u64 {
        let root = merkle::root(&l[..n as usize]);
        for m in 0..n {
            let path = audit_path(m, &l[..n as usize]).unwrap();
            verify_inclusion(m, n, &l[m as usize], &path, &root)
                .unwrap_or_else(|e| panic!("m={m} n={n}: {e}"));
            // Forged leaf.
            let forged = sha(b"forged");
            assert!(
                verify_inclusion(m, n, &forged, &path, &root).is_err(),
                "forged leaf m={m} n={n}"
            );
            // Wrong index (every other index in the tree).
            for w in 0..n {
                if w != m && l[w as usize] != l[m as usize] {
                    assert!(
                        verify_inclusion(w, n, &l[m as usize], &path, &root).is_err(),
                        "index {w} for m={m} n={n}"
                    );
                }
            }
            // Index past the end, wrong size, tampered path.
            assert!(verify_inclusion(n, n, &l[m as usize], &path, &root).is_err());
            if let Some(first) = path.first() {
                let mut p = path.clone();
                p[0] = node_hash(first, first);
                assert!(verify_inclusion(m, n, &l[m as usize], &p, &root).is_err());
                assert!(verify_inclusion(m, n, &l[m as usize], &path[1..], &root).is_err());
            }
        }
    }
    assert!(matches!(
        audit_path(5, &l[..5]),
        Err(ProofError::IndexOutOfRange { index: 5, size: 5 })
    ));
}

/// RFC 6962 §2.1.3's worked example: the tree of 7 leaves a..g.
#[test]
fn rfc6962_example_paths() {
    let l = leaves(7);
    let r = |a: usize, b: usize| merkle::root(&l[a..b]);
    // The audit path for d0 is [b, h, l]; for d3 [c, g, l]; for d4 [f, j, k]; for d6 [i, k].
    assert_eq!(audit_path(0, &l).unwrap(), [l[1], r(2, 4), r(4, 7)]);
    assert_eq!(audit_path(3, &l).unwrap(), [l[2], r(0, 2), r(4, 7)]);
    assert_eq!(audit_path(4, &l).unwrap(), [l[5], l[6], r(0, 4)]);
    assert_eq!(audit_path(6, &l).unwrap(), [r(4, 6), r(0, 4)]);
    // Consistency: PROOF(3, D[7]) = [c, d, g, l]; PROOF(4, D[7]) = [l]; PROOF(6, D[7]) = [i, j, k].
    assert_eq!(
        consistency_proof(3, &l).unwrap(),
        [l[2], l[3], r(0, 2), r(4, 7)]
    );
    assert_eq!(consistency_proof(4, &l).unwrap(), [r(4, 7)]);
    assert_eq!(consistency_proof(6, &l).unwrap(), [r(4, 6), l[6], r(0, 4)]);
}

#[test]
fn consistency_proofs_all_m_n_up_to_40() {
    let l = leaves(40);
    for n in 1..=40u64 {
        let new_root = merkle::root(&l[..n as usize]);
        for m in 1..=n {
            let old_root = merkle::root(&l[..m as usize]);
            let proof = consistency_proof(m, &l[..n as usize]).unwrap();
            verify_consistency(m, n, &old_root, &new_root, &proof)
                .unwrap_or_else(|e| panic!("m={m} n={n}: {e}"));
            let forged = sha(b"forged old root");
            assert!(
                verify_consistency(m, n, &forged, &new_root, &proof).is_err(),
                "forged old m={m} n={n}"
            );
            assert!(
                verify_consistency(m, n, &old_root, &forged, &proof).is_err(),
                "forged new m={m} n={n}"
            );
            if m < n {
                // A root of a different old tree of the same size.
                let mut other = l[..m as usize].to_vec();
                other[0] = sha(b"rewritten");
                assert!(
                    verify_consistency(m, n, &merkle::root(&other), &new_root, &proof).is_err()
                );
                // Mangled or shortened proofs.
                let mut p = proof.clone();
                let last = p.len() - 1;
                p[last] = forged;
                assert!(
                    verify_consistency(m, n, &old_root, &new_root, &p).is_err(),
                    "mangled m={m} n={n}"
                );
                assert!(
                    verify_consistency(m, n, &old_root, &new_root, &proof[..last]).is_err(),
                    "short m={m} n={n}"
                );
                let mut longer = proof.clone();
                longer.push(forged);
                assert!(
                    verify_consistency(m, n, &old_root, &new_root, &longer).is_err(),
                    "long m={m} n={n}"
                );
            } else {
                assert!(proof.is_empty());
            }
        }
    }
    assert!(consistency_proof(0, &l).is_err());
    assert!(consistency_proof(41, &l).is_err());
    assert!(verify_consistency(0, 3, &[0; 32], &[0; 32], &[]).is_err());
    assert!(verify_consistency(4, 3, &[0; 32], &[0; 32], &[]).is_err());
}

// ---------------------------------------------------------------- checkpoints

#[test]
fn checkpoint_signature_and_encoding() {
    let events = build_log(5);
    let cp = checkpoint(&events, 5);
    cp.verify(&pk()).unwrap();
    assert_eq!(
        cp.verify(key(2).public_key().as_ref()),
        Err(CheckpointError::BadSignature { tree_size: 5 })
    );
    let text = String::from_utf8(cp.checkpoint.signed_bytes().unwrap()).unwrap();
    assert_eq!(
        text,
        format!(
            "tutela-audit-checkpoint/v1\nlog_id {LOG}\ntree_size 5\nroot {}\ntimestamp {}\n",
            hex::encode(cp.checkpoint.root),
            cp.checkpoint.timestamp
        )
    );
    // Every field is covered by the signature.
    let mut c = cp.clone();
    c.checkpoint.tree_size = 6;
    assert!(c.verify(&pk()).is_err());
    let mut c = cp.clone();
    c.checkpoint.root[0] ^= 1;
    assert!(c.verify(&pk()).is_err());
    let mut c = cp.clone();
    c.checkpoint.timestamp = ts(99);
    assert!(c.verify(&pk()).is_err());
    let mut c = cp.clone();
    c.checkpoint.log_id = "spiffe://other/audit".into();
    assert!(c.verify(&pk()).is_err());
    // A log id that would make the encoding ambiguous is refused.
    let bad = Checkpoint {
        log_id: "a\ntree_size 9".into(),
        ..cp.checkpoint.clone()
    };
    assert!(matches!(
        bad.sign(&key(1)),
        Err(CheckpointError::BadLogId(_))
    ));
    // JSON round trip.
    let back: SignedCheckpoint =
        serde_json::from_str(&serde_json::to_string(&cp).unwrap()).unwrap();
    assert_eq!(back, cp);
    back.verify(&pk()).unwrap();
}

#[test]
fn checkpoint_verifier_follows_consistent_growth() {
    let events = build_log(40);
    let mut tree = MerkleTree::new();
    events.iter().for_each(|e| tree.push_entry(&e.hash));
    let mut v = CheckpointVerifier::new(&pk(), LOG);
    assert_eq!(
        v.update(&checkpoint(&events, 7), &[]),
        Ok(Update::First { tree_size: 7 })
    );
    for (from, to) in [(7u64, 8u64), (8, 21), (21, 32), (32, 40)] {
        let proof = tree.consistency_proof(from, to).unwrap();
        assert_eq!(
            v.update(&checkpoint(&events, to), &proof),
            Ok(Update::Advanced { from, to })
        );
    }
    assert_eq!(
        v.update(&checkpoint(&events, 40), &[]),
        Ok(Update::Unchanged { tree_size: 40 })
    );
    assert_eq!(
        v.update(&checkpoint(&events, 30), &[]),
        Err(CheckpointError::Rollback {
            latest: 40,
            offered: 30
        })
    );
    // Restored from what it saved, it still checks the signature.
    let saved = v.latest().unwrap().clone();
    assert!(CheckpointVerifier::restore(&pk(), saved.clone()).is_ok());
    assert!(CheckpointVerifier::restore(key(2).public_key().as_ref(), saved).is_err());
}

#[test]
fn checkpoint_verifier_refuses_rewritten_history() {
    let events = build_log(40);
    let mut v = CheckpointVerifier::new(&pk(), LOG);
    v.update(&checkpoint(&events, 20), &[]).unwrap();
    let held = v.latest().unwrap().clone();

    // The log operator (holding the signing key) rewrites seq 5 and recomputes everything.
    let mut forged = events.clone();
    forged[5].payload = json!({"forged": true});
    let mut chain = Chain::resume(&forged[4]).unwrap();
    for slot in &mut forged[5..40] {
        let e = slot.clone();
        *slot = chain
            .append(e.timestamp, e.actor, e.action, e.subject, e.payload)
            .unwrap();
    }
    let mut forged_tree = MerkleTree::new();
    forged.iter().for_each(|e| forged_tree.push_entry(&e.hash));
    let proof = forged_tree.consistency_proof(20, 40).unwrap();
    let err = v.update(&checkpoint(&forged, 40), &proof).unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::Inconsistent {
                old: 20,
                new: 40,
                ..
            }
        ),
        "{err}"
    );
    // A proof from the honest tree does not help either.
    let mut honest = MerkleTree::new();
    events.iter().for_each(|e| honest.push_entry(&e.hash));
    let proof = honest.consistency_proof(20, 40).unwrap();
    assert!(v.update(&checkpoint(&forged, 40), &proof).is_err());
    // Same size, different root: a split view.
    assert_eq!(
        v.update(&checkpoint(&forged, 20), &[]),
        Err(CheckpointError::Fork { tree_size: 20 })
    );
    // Signed by someone else.
    let other = Checkpoint {
        ..checkpoint(&events, 40).checkpoint
    }
    .sign(&key(2))
    .unwrap();
    assert!(matches!(
        v.update(&other, &proof),
        Err(CheckpointError::BadSignature { .. })
    ));
    // Another log's checkpoint.
    let wrong_log = Checkpoint {
        log_id: "spiffe://other/audit".into(),
        ..checkpoint(&events, 40).checkpoint
    }
    .sign(&key(1))
    .unwrap();
    assert!(matches!(
        v.update(&wrong_log, &proof),
        Err(CheckpointError::WrongLog { .. })
    ));
    // Nothing was accepted.
    assert_eq!(v.latest(), Some(&held));
    // The honest extension is still accepted.
    assert_eq!(
        v.update(&checkpoint(&events, 40), &proof),
        Ok(Update::Advanced { from: 20, to: 40 })
    );
}
