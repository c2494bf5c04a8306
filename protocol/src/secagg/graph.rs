//! The sparse communication graph: which sites exchange keys, mask pairwise and hold each other's
//! shares.
//!
//! A Harary graph `H(k, n)` over a random permutation of the sites (as Flower's SecAgg+ does):
//! the public seed fixes a permutation (Fisher–Yates driven by ChaCha20 keyed with the seed, exact
//! uniform draws), the sites sit on a ring in that order, and each is joined to the `k / 2` sites
//! on either side. Every site has exactly `k` neighbours, the relation is symmetric, and because
//! the order is fresh per round and attempt (the seed is [`derive_graph_seed`](super::derive_graph_seed)
//! of job digest, round and attempt, which every site recomputes) neither a site nor the
//! coordinator can choose whom it neighbours. `k = n − 1` is the complete graph (the original SecAgg).

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::SiteIndex;

/// Each site's neighbours, sorted. Built by [`CommunicationGraph::harary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommunicationGraph {
    neighbours: Vec<Vec<SiteIndex>>,
}

impl CommunicationGraph {
    /// `H(k, n)` over the permutation the seed fixes. `k` must be even and below `n − 1`, or
    /// `n − 1` (complete); [`RoundConfig::validate`](super::RoundConfig::validate) checks it.
    pub fn harary(sites: u32, degree: u32, seed: &[u8; 32]) -> Self {
        let n = sites as usize;
        let mut neighbours = vec![Vec::new(); n];
        if degree + 1 >= sites {
            for (u, list) in neighbours.iter_mut().enumerate() {
                *list = (0..sites).filter(|&v| v as usize != u).collect();
            }
            return CommunicationGraph { neighbours };
        }
        let mut rng = ChaCha20Rng::from_seed(*seed);
        let mut order: Vec<SiteIndex> = (0..sites).collect();
        for i in (1..n).rev() {
            let j = below(&mut rng, i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let half = (degree / 2) as usize;
        for (pos, &u) in order.iter().enumerate() {
            for step in 1..=half {
                let right = order[(pos + step) % n];
                let left = order[(pos + n - step) % n];
                neighbours[u as usize].push(right);
                neighbours[u as usize].push(left);
            }
        }
        for list in &mut neighbours {
            list.sort_unstable();
            list.dedup();
        }
        CommunicationGraph { neighbours }
    }

    /// Site `u`'s neighbours, sorted (empty for an index out of range).
    pub fn neighbours(&self, u: SiteIndex) -> &[SiteIndex] {
        self.neighbours
            .get(u as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn are_neighbours(&self, u: SiteIndex, v: SiteIndex) -> bool {
        self.neighbours(u).binary_search(&v).is_ok()
    }

    pub fn sites(&self) -> u32 {
        self.neighbours.len() as u32
    }
}

/// Uniform in `0..m` (`m ≥ 1`), exact: Lemire's multiply-and-reject.
fn below(rng: &mut ChaCha20Rng, m: u64) -> u64 {
    loop {
        let prod = u128::from(rng.next_u64()) * u128::from(m);
        if (prod as u64) >= m.wrapping_neg() % m {
            return (prod >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_has_exactly_k_neighbours_and_the_relation_is_symmetric() {
        for (n, k) in [(10, 4), (100, 20), (7, 6), (5, 2), (64, 12)] {
            let g = CommunicationGraph::harary(n, k, &[n as u8; 32]);
            for u in 0..n {
                let list = g.neighbours(u);
                assert_eq!(list.len(), k as usize, "n={n} k={k} u={u}");
                assert!(!list.contains(&u));
                for &v in list {
                    assert!(g.are_neighbours(v, u));
                }
            }
        }
    }

    #[test]
    fn the_seed_fixes_the_graph() {
        let a = CommunicationGraph::harary(50, 10, &[1; 32]);
        assert_eq!(a, CommunicationGraph::harary(50, 10, &[1; 32]));
        assert_ne!(a, CommunicationGraph::harary(50, 10, &[2; 32]));
    }

    #[test]
    fn complete_when_k_is_n_minus_one() {
        let g = CommunicationGraph::harary(10, 9, &[0; 32]);
        assert_eq!(g.neighbours(3), &[0, 1, 2, 4, 5, 6, 7, 8, 9]);
    }
}
