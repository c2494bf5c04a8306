//! The log's Merkle tree ([`MerkleTree`]) answers proofs from its kept perfect-subtree roots in
//! O(log n): its roots, audit paths and consistency proofs must be exactly the RFC 6962
//! reference's (the slice functions), so proofs made before and after the change verify alike.

use std::time::Instant;

use tutela_audit::Hash;
use tutela_audit::merkle::{
    self, MerkleTree, ProofError, audit_path, consistency_proof, leaf_hash, verify_consistency,
    verify_inclusion,
};

fn entry(i: u64) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes()).as_ref());
    out
}

fn tree(n: u64) -> (MerkleTree, Vec<Hash>) {
    let mut t = MerkleTree::new();
    let mut leaves = Vec::with_capacity(n as usize);
    for i in 0..n {
        let e = entry(i);
        t.push_entry(&e);
        leaves.push(leaf_hash(&e));
    }
    (t, leaves)
}

#[test]
fn every_proof_up_to_130_leaves_is_the_reference_one() {
    let (t, l) = tree(130);
    assert_eq!(t.leaves(), &l[..]);
    for n in 1..=130u64 {
        let prefix = &l[..n as usize];
        let root = merkle::root(prefix);
        assert_eq!(t.root_at(n).unwrap(), root, "root of {n}");
        for m in 0..n {
            let path = t.audit_path(m, n).unwrap();
            assert_eq!(path, audit_path(m, prefix).unwrap(), "path m={m} n={n}");
            verify_inclusion(m, n, &l[m as usize], &path, &root).unwrap();
        }
        for m in 1..=n {
            let proof = t.consistency_proof(m, n).unwrap();
            assert_eq!(
                proof,
                consistency_proof(m, prefix).unwrap(),
                "consistency {m} -> {n}"
            );
            verify_consistency(m, n, &t.root_at(m).unwrap(), &root, &proof).unwrap();
        }
    }
    assert_eq!(t.root_at(0).unwrap(), merkle::empty_root());
}

#[test]
fn out_of_range_requests_are_refused_as_before() {
    let (t, _) = tree(11);
    assert_eq!(
        t.audit_path(11, 11),
        Err(ProofError::IndexOutOfRange {
            index: 11,
            size: 11
        })
    );
    assert_eq!(
        t.audit_path(3, 12),
        Err(ProofError::SizeOutOfRange {
            size: 12,
            available: 11
        })
    );
    assert_eq!(
        t.consistency_proof(0, 11),
        Err(ProofError::BadSizes { old: 0, new: 11 })
    );
    assert_eq!(
        t.consistency_proof(12, 11),
        Err(ProofError::BadSizes { old: 12, new: 11 })
    );
    assert!(matches!(
        t.root_at(12),
        Err(ProofError::SizeOutOfRange { .. })
    ));
}

/// A million-event log, a size that is not a power of two: proofs at the edges and in the
/// middle equal the reference's, verify, and each takes microseconds, not a pass over the leaves.
#[test]
fn proofs_at_a_million_events_are_the_reference_ones_and_fast() {
    let n: u64 = 1_000_003;
    let (t, l) = tree(n);
    let root = t.root();
    assert_eq!(t.root_at(n).unwrap(), root);
    // The reference is O(n) per proof: compared at a few indices only.
    for m in [0, 524_287, 524_288, n - 2] {
        let path = t.audit_path(m, n).unwrap();
        assert_eq!(path, audit_path(m, &l).unwrap(), "m={m}");
        verify_inclusion(m, n, &l[m as usize], &path, &root).unwrap();
    }
    let old = 999_999;
    let proof = t.consistency_proof(old, n).unwrap();
    assert_eq!(proof, consistency_proof(old, &l).unwrap());
    verify_consistency(old, n, &t.root_at(old).unwrap(), &root, &proof).unwrap();

    // 1,000 proofs against varying tree sizes (each a kept-node lookup per level).
    let started = Instant::now();
    for i in 0..1_000u64 {
        let size = n - i * 997;
        let m = (i * 7_919) % size;
        let path = t.audit_path(m, size).unwrap();
        verify_inclusion(m, size, &l[m as usize], &path, &t.root_at(size).unwrap()).unwrap();
    }
    let took = started.elapsed();
    // O(n) proofs took ~4 s each here in a debug build; 1,000 O(log n) ones take milliseconds.
    assert!(
        took.as_secs_f64() < 5.0,
        "1,000 proofs at 1M events took {took:?}"
    );
}
