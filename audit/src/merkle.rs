//! RFC 6962 §2.1 Merkle tree hashes (unchanged in RFC 9162 §2.1), inclusion proofs and
//! consistency proofs, over the audit events' hashes.
//!
//! Terms: the tree's *entries* are the events' 32-byte hashes; an entry's *leaf hash* is
//! `SHA-256(0x00 || entry)` ([`leaf_hash`]); an interior node is `SHA-256(0x01 || left || right)`
//! ([`node_hash`]). The two prefixes keep a leaf from ever being passed off as a node (second
//! preimage protection, RFC 6962 §2.1). For n entries, MTH splits at k, the largest power of two
//! strictly less than n. The empty tree's hash is SHA-256 of the empty string.
//!
//! Functions over slices take *leaf hashes* (already prefixed with 0x00) and are the RFC's recursive
//! definition, O(n) hashes per proof: the reference. [`MerkleTree`] (what the log serves proofs
//! from) keeps every perfect subtree's root and answers the same proofs in O(log n) kept nodes;
//! [`Frontier`] gives the root of a growing tree in O(log n) per appended leaf, which is what
//! [`crate::verify_log`] streams with.

use crate::{Hash, sha256};

/// `SHA-256(0x00 || entry)` (RFC 6962 §2.1).
pub fn leaf_hash(entry: &Hash) -> Hash {
    let mut buf = [0u8; 33];
    buf[1..].copy_from_slice(entry);
    sha256(&buf)
}

/// `SHA-256(0x01 || left || right)` (RFC 6962 §2.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = 1;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    sha256(&buf)
}

/// MTH({}) = SHA-256() (RFC 6962 §2.1).
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The largest power of two strictly less than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1usize << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH over `leaves` (leaf hashes), by the RFC's recursive definition.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Why a proof could not be produced or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size {size} exceeds the {available} leaves held")]
    SizeOutOfRange { size: u64, available: u64 },
    #[error("a consistency proof needs 0 < old size ({old}) <= new size ({new})")]
    BadSizes { old: u64, new: u64 },
    #[error("proof has {got} hashes; a proof for these sizes has {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("consistency proof has the wrong number of hashes ({got}) for sizes {old} -> {new}")]
    MalformedConsistency { got: usize, old: u64, new: u64 },
    #[error("proof does not lead to the given root")]
    RootMismatch,
    #[error("proof does not lead to the given old root")]
    OldRootMismatch,
}

/// PATH(m, D[n]) (RFC 6962 §2.1.1): the audit path for leaf `m` in the tree of `leaves`, deepest
/// sibling first.
pub fn audit_path(m: u64, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    let n = leaves.len();
    let mi = usize::try_from(m)
        .ok()
        .filter(|&mi| mi < n)
        .ok_or(ProofError::IndexOutOfRange {
            index: m,
            size: n as u64,
        })?;
    let mut path = Vec::new();
    path_rec(mi, leaves, &mut path);
    Ok(path)
}

fn path_rec(m: usize, leaves: &[Hash], path: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path_rec(m, &leaves[..k], path);
        path.push(root(&leaves[k..]));
    } else {
        path_rec(m - k, &leaves[k..], path);
        path.push(root(&leaves[..k]));
    }
}

/// PROOF(m, D[n]) (RFC 6962 §2.1.2): the consistency proof between the first `m` leaves and all of
/// `leaves`. Empty when m = n; refused when m = 0 (every tree extends the empty one, and RFC 9162
/// §2.1.4 defines proofs only for 0 < m).
pub fn consistency_proof(m: u64, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    let n = leaves.len();
    let mi = usize::try_from(m).unwrap_or(usize::MAX);
    if m == 0 || mi > n {
        return Err(ProofError::BadSizes {
            old: m,
            new: n as u64,
        });
    }
    let mut proof = Vec::new();
    subproof(mi, leaves, true, &mut proof);
    Ok(proof)
}

/// SUBPROOF(m, D[n], b) (RFC 6962 §2.1.2).
fn subproof(m: usize, leaves: &[Hash], b: bool, proof: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !b {
            proof.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], b, proof);
        proof.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, proof);
        proof.push(root(&leaves[..k]));
    }
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2): `leaf_hash` is leaf `leaf_index` of the tree of
/// size `tree_size` whose root is `root`.
pub fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    leaf_hash: &Hash,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if leaf_index >= tree_size {
        return Err(ProofError::IndexOutOfRange {
            index: leaf_index,
            size: tree_size,
        });
    }
    let expected = inclusion_path_len(leaf_index, tree_size);
    if path.len() != expected {
        return Err(ProofError::WrongLength {
            got: path.len(),
            expected,
        });
    }
    let (mut fnode, mut snode) = (leaf_index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in path {
        if snode == 0 {
            return Err(ProofError::WrongLength {
                got: path.len(),
                expected,
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength {
            got: path.len(),
            expected,
        });
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The length of PATH(m, D[n]): one hash per level of the leaf's branch.
fn inclusion_path_len(mut m: u64, n: u64) -> usize {
    // Walk the RFC's split: each level below the root contributes one sibling.
    let (mut size, mut len) = (n, 0usize);
    while size > 1 {
        let k = 1u64 << (63 - (size - 1).leading_zeros());
        if m < k {
            size = k;
        } else {
            m -= k;
            size -= k;
        }
        len += 1;
    }
    len
}

/// Verifies a consistency proof (RFC 9162 §2.1.4.2): the tree of size `new_size` with root
/// `new_root` extends the tree of size `old_size` with root `old_root`. For equal sizes the proof
/// must be empty and the roots equal.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::BadSizes {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                expected: 0,
            });
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    // Step 1: an empty proof cannot be right for old < new.
    if proof.is_empty() {
        return Err(ProofError::MalformedConsistency {
            got: 0,
            old: old_size,
            new: new_size,
        });
    }
    // Step 2: if old_size is a power of two, the old root is itself a node of the new tree and
    // the proof omits it; prepend it.
    let mut path: Vec<&Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(old_root);
    }
    path.extend(proof.iter());
    // Steps 3-4.
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    // Step 5.
    let (mut fr, mut sr) = (*path[0], *path[0]);
    // Step 6.
    for c in &path[1..] {
        if snode == 0 {
            return Err(ProofError::MalformedConsistency {
                got: proof.len(),
                old: old_size,
                new: new_size,
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    // Step 7.
    if snode != 0 {
        return Err(ProofError::MalformedConsistency {
            got: proof.len(),
            old: old_size,
            new: new_size,
        });
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a growing tree: the roots of its maximal perfect subtrees, largest first.
/// Appending is amortised O(1) hashes and the root is O(log n), because for n leaves RFC 6962's
/// split makes the tree exactly those perfect subtrees joined right to left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    nodes: Vec<Hash>,
    size: u64,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut s = self.size;
        // Each trailing 1 bit of the old size is a perfect subtree of equal height to merge with.
        while s & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => node = node_hash(&left, &node),
                None => break,
            }
            s >>= 1;
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// MTH of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(last) => it.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}

/// An in-memory Merkle tree over event hashes, with every complete perfect subtree's root kept,
/// so that a root, an audit path or a consistency proof of any prefix costs O(log n) stored nodes
/// and at most O(log² n) fresh hashes, never a pass over the leaves.
///
/// Why this is enough: RFC 6962's split makes every left part of every (sub)tree a perfect
/// subtree of 2^h leaves starting at a multiple of 2^h, and every right part either such a
/// subtree or a smaller tree that splits the same way. `levels[h][i]` is the root of leaves
/// `i·2^h .. (i+1)·2^h`, kept as soon as its last leaf arrives (amortised one hash per append),
/// so a proof reads one kept node per level of its leaf's branch and hashes together only the
/// right edges of non-perfect right parts. The proofs are the RFC's, node for node: the
/// slice functions above stay the reference the tests compare with.
///
/// Memory: about two hashes per event (64 bytes), 64 MB at a million events.
#[derive(Clone, Debug, Default)]
pub struct MerkleTree {
    /// `levels[0]` are the leaf hashes; `levels[h][i]` the root of the i-th perfect subtree of
    /// 2^h leaves.
    levels: Vec<Vec<Hash>>,
    frontier: Frontier,
}

impl MerkleTree {
    pub fn new() -> MerkleTree {
        MerkleTree::default()
    }

    /// Appends an entry (an event hash); stores its leaf hash and every perfect subtree it
    /// completes.
    pub fn push_entry(&mut self, entry: &Hash) {
        let leaf = leaf_hash(entry);
        self.frontier.push(leaf);
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut h = 0;
        // A level of even length just completed a pair: its parent is complete too.
        while self.levels[h].len() % 2 == 0 {
            let n = self.levels[h].len();
            let parent = node_hash(&self.levels[h][n - 2], &self.levels[h][n - 1]);
            if self.levels.len() == h + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[h + 1].push(parent);
            h += 1;
        }
    }

    /// The right edge of the tree, to compute the root after more entries without pushing them.
    pub fn frontier(&self) -> &Frontier {
        &self.frontier
    }

    pub fn len(&self) -> u64 {
        self.frontier.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn leaves(&self) -> &[Hash] {
        self.levels.first().map_or(&[], |l| l.as_slice())
    }

    /// The root over all leaves.
    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    fn check_size(&self, n: u64) -> Result<(), ProofError> {
        if n > self.len() {
            return Err(ProofError::SizeOutOfRange {
                size: n,
                available: self.len(),
            });
        }
        Ok(())
    }

    /// MTH of leaves `lo .. lo + n` (n ≥ 1), a range the RFC's split produces: `lo` is a
    /// multiple of the largest power of two not above n.
    fn range_root(&self, lo: u64, n: u64) -> Hash {
        if n.is_power_of_two() {
            let h = n.trailing_zeros() as usize;
            return self.levels[h][(lo >> h) as usize];
        }
        let k = split(n as usize) as u64;
        node_hash(&self.range_root(lo, k), &self.range_root(lo + k, n - k))
    }

    /// The root over the first `n` leaves.
    pub fn root_at(&self, n: u64) -> Result<Hash, ProofError> {
        self.check_size(n)?;
        Ok(match n {
            0 => empty_root(),
            n => self.range_root(0, n),
        })
    }

    /// PATH(m, D[n]) (RFC 6962 §2.1.1), deepest sibling first.
    pub fn audit_path(&self, m: u64, n: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(n)?;
        if m >= n {
            return Err(ProofError::IndexOutOfRange { index: m, size: n });
        }
        // The RFC's recursion from the top, collecting siblings root-first.
        let (mut lo, mut size, mut m) = (0u64, n, m);
        let mut path = Vec::new();
        while size > 1 {
            let k = split(size as usize) as u64;
            if m < k {
                path.push(self.range_root(lo + k, size - k));
                size = k;
            } else {
                path.push(self.range_root(lo, k));
                lo += k;
                m -= k;
                size -= k;
            }
        }
        path.reverse();
        Ok(path)
    }

    /// PROOF(m, D[n]) (RFC 6962 §2.1.2).
    pub fn consistency_proof(&self, m: u64, n: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(n)?;
        if m == 0 || m > n {
            return Err(ProofError::BadSizes { old: m, new: n });
        }
        // SUBPROOF(m, D[lo..lo+size], b), unrolled: siblings collected root-first.
        let (mut lo, mut size, mut m, mut b) = (0u64, n, m, true);
        let mut proof = Vec::new();
        loop {
            if m == size {
                if !b {
                    proof.push(self.range_root(lo, size));
                }
                break;
            }
            let k = split(size as usize) as u64;
            if m <= k {
                proof.push(self.range_root(lo + k, size - k));
                size = k;
            } else {
                proof.push(self.range_root(lo, k));
                lo += k;
                m -= k;
                size -= k;
                b = false;
            }
        }
        proof.reverse();
        Ok(proof)
    }
}
