//! Dataset commitments: a salted Merkle root over a dataset's canonical rows.
//!
//! A site records, for lineage, *which* data a model was trained on without revealing anything
//! about it. The commitment is the root of an RFC 6962 Merkle tree whose leaves are
//! `HMAC-SHA-256(salt, canonical row)`: the same rows in the same order under the same salt give
//! the same root; without the salt, a root (or a leaf shown in an inclusion proof) says nothing
//! about a row, not even for a low-entropy row an attacker could otherwise guess and hash. The
//! site keeps the salt (derived from its site secret, [`commitment_salt`]) and can later open the
//! commitment to an auditor by handing over the rows and the salt.
//!
//! Canonical row encoding: for each cell in column order, one type tag byte, the cell's text length
//! as a little-endian u64, then the text (UTF-8). Length prefixes make the encoding injective: no
//! two different rows encode alike, whatever their text contains.
//!
//! The tree is RFC 6962's (leaf hash `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || l || r)`,
//! the left subtree the largest power of two), built in one streaming pass with a stack of perfect
//! subtrees: memory is O(log n) whatever the dataset's size. Hand-written because it is a few lines
//! over `ring` and this library must not depend on the audit service's crate, whose Merkle module
//! serves proofs over stored events.

use ring::digest::{Context, SHA256};
use ring::hmac;

/// Cell type tags of the canonical row encoding.
pub mod tag {
    pub const NULL: u8 = 0;
    pub const INT: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const TEXT: u8 = 3;
    pub const DATE: u8 = 4;
    /// A class label, written as its class name.
    pub const LABEL: u8 = 5;
}

/// The salt of the commitments of dataset `dataset_name` at a site: HMAC-SHA-256 of the name under
/// the site secret, so that it is stable across runs (the same data gives the same root) and
/// secret (it never leaves the site unless the site opens a commitment).
pub fn commitment_salt(site_secret: &[u8], dataset_name: &str) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, site_secret);
    let tag = hmac::sign(
        &key,
        format!("tutela/dataset-commitment-salt/v1/{dataset_name}").as_bytes(),
    );
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(&[0x00]);
    c.update(leaf);
    to_array(c.finish())
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(&[0x01]);
    c.update(left);
    c.update(right);
    to_array(c.finish())
}

fn to_array(d: ring::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Builds a dataset commitment one row at a time.
pub struct CommitmentBuilder {
    key: hmac::Key,
    /// Perfect subtrees, left to right: (number of leaves, root). Sizes strictly decrease.
    stack: Vec<(u64, [u8; 32])>,
    rows: u64,
    row: Vec<u8>,
}

/// A finished commitment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetCommitment {
    pub root: [u8; 32],
    pub rows: u64,
}

impl DatasetCommitment {
    pub fn root_hex(&self) -> String {
        hex::encode(self.root)
    }
}

impl CommitmentBuilder {
    pub fn new(salt: &[u8; 32]) -> CommitmentBuilder {
        CommitmentBuilder {
            key: hmac::Key::new(hmac::HMAC_SHA256, salt),
            stack: Vec::new(),
            rows: 0,
            row: Vec::new(),
        }
    }

    /// Adds one row, given as (type tag, canonical text) cells in column order.
    pub fn push_row<'a>(&mut self, cells: impl IntoIterator<Item = (u8, &'a str)>) {
        self.row.clear();
        for (tag, text) in cells {
            self.row.push(tag);
            self.row
                .extend_from_slice(&(text.len() as u64).to_le_bytes());
            self.row.extend_from_slice(text.as_bytes());
        }
        let leaf = hmac::sign(&self.key, &self.row);
        let mut node = (1u64, leaf_hash(leaf.as_ref()));
        while let Some(&(size, left)) = self.stack.last() {
            if size != node.0 {
                break;
            }
            self.stack.pop();
            node = (size * 2, node_hash(&left, &node.1));
        }
        self.stack.push(node);
        self.rows += 1;
    }

    /// The root: the remaining perfect subtrees folded right to left, which is RFC 6962's shape
    /// (each left subtree is the largest power of two). The empty dataset's root is SHA-256 of
    /// the empty string, as in RFC 6962.
    pub fn finish(mut self) -> DatasetCommitment {
        let root = match self.stack.pop() {
            None => to_array(ring::digest::digest(&SHA256, b"")),
            Some((_, mut right)) => {
                while let Some((_, left)) = self.stack.pop() {
                    right = node_hash(&left, &right);
                }
                right
            }
        };
        DatasetCommitment {
            root,
            rows: self.rows,
        }
    }
}

/// The commitment of an anonymized table: every kept column of every row.
pub fn commit_table(salt: &[u8; 32], table: &crate::anonymize::Table) -> DatasetCommitment {
    use crate::anonymize::Value;
    let mut builder = CommitmentBuilder::new(salt);
    let mut texts: Vec<(u8, String)> = Vec::new();
    for row in &table.rows {
        texts.clear();
        texts.extend(row.iter().map(|v| {
            let tag = match v {
                Value::Null => tag::NULL,
                Value::Int(_) => tag::INT,
                Value::Float(_) => tag::FLOAT,
                Value::Text(_) => tag::TEXT,
                Value::Date(_) => tag::DATE,
            };
            (tag, v.canonical())
        }));
        builder.push_row(texts.iter().map(|(t, s)| (*t, s.as_str())));
    }
    builder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962's recursive definition, from all leaves at once: the reference the streaming
    /// builder is checked against.
    fn reference_root(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => to_array(ring::digest::digest(&SHA256, b"")),
            1 => leaves[0],
            n => {
                // the largest power of two strictly below n
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn leaves(salt: &[u8; 32], rows: &[Vec<&str>]) -> Vec<[u8; 32]> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
        rows.iter()
            .map(|r| {
                let mut bytes = Vec::new();
                for c in r {
                    bytes.push(tag::TEXT);
                    bytes.extend_from_slice(&(c.len() as u64).to_le_bytes());
                    bytes.extend_from_slice(c.as_bytes());
                }
                leaf_hash(hmac::sign(&key, &bytes).as_ref())
            })
            .collect()
    }

    fn commit(salt: &[u8; 32], rows: &[Vec<&str>]) -> DatasetCommitment {
        let mut b = CommitmentBuilder::new(salt);
        for r in rows {
            b.push_row(r.iter().map(|c| (tag::TEXT, *c)));
        }
        b.finish()
    }

    #[test]
    fn streaming_root_is_rfc6962_for_every_size() {
        let salt = [7u8; 32];
        let owned: Vec<String> = (0..70).map(|i| format!("row{i}")).collect();
        for n in 0..owned.len() {
            let rows: Vec<Vec<&str>> = owned[..n].iter().map(|s| vec![s.as_str(), "x"]).collect();
            let c = commit(&salt, &rows);
            assert_eq!(c.rows, n as u64);
            assert_eq!(c.root, reference_root(&leaves(&salt, &rows)), "n = {n}");
        }
    }

    #[test]
    fn same_data_and_salt_same_root_anything_else_differs() {
        let salt = commitment_salt(b"site secret of hospital a, 32+ bytes", "breast_cancer");
        let rows = vec![vec!["a", "1"], vec!["b", "2"], vec!["c", "3"]];
        let root = commit(&salt, &rows).root;
        assert_eq!(root, commit(&salt, &rows).root);
        // another salt (another site secret, or another dataset name)
        let other = commitment_salt(b"site secret of hospital b, 32+ bytes", "breast_cancer");
        assert_ne!(root, commit(&other, &rows).root);
        assert_ne!(
            salt,
            commitment_salt(b"site secret of hospital a, 32+ bytes", "mnist")
        );
        // a changed cell, reordered rows, a dropped row
        assert_ne!(
            root,
            commit(&salt, &[vec!["a", "1"], vec!["b", "2"], vec!["c", "4"]]).root
        );
        assert_ne!(
            root,
            commit(&salt, &[vec!["b", "2"], vec!["a", "1"], vec!["c", "3"]]).root
        );
        assert_ne!(root, commit(&salt, &[vec!["a", "1"], vec!["b", "2"]]).root);
        // cell boundaries matter: ["ab", ""] is not ["a", "b"]
        assert_ne!(
            commit(&salt, &[vec!["ab", ""]]).root,
            commit(&salt, &[vec!["a", "b"]]).root
        );
    }

    #[test]
    fn table_commitment_distinguishes_types() {
        use crate::anonymize::{Schema, Table, Value};
        let schema =
            Schema::from_toml("[[column]]\nname = \"a\"\nrole = \"feature\"\ntype = \"text\"\n")
                .unwrap();
        let t = |v: Value| Table {
            schema: schema.clone(),
            rows: vec![vec![v]],
        };
        let salt = [1u8; 32];
        assert_ne!(
            commit_table(&salt, &t(Value::Text("1".into()))).root,
            commit_table(&salt, &t(Value::Int(1))).root
        );
    }
}
