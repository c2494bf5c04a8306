//! SecAgg+ (Bell, Bonawitz, Gascón, Lepoint & Raykova, CCS 2020, "Secure Single-Server
//! Aggregation with (Poly)Logarithmic Overhead"): the coordinator learns the sum of the sites'
//! quantized updates and nothing else about any one of them, even when sites drop out at any
//! phase. Pure logic, no network: the coordinator and the site node carry these messages over
//! their existing gRPC connection.
//!
//! # The round, phase by phase
//!
//! Every party starts from the same [`RoundConfig`] (derived from the job spec, which sites
//! recompute: [`SecureAggregationSpec::check_offered`]): at most [`MAX_SITES`] participants, the
//! public seed of the sparse communication [`graph`] (each site has `k = O(log n)` neighbours;
//! the seed is [`derive_graph_seed`] of job, round and attempt), the Shamir threshold `t`
//! (`2t > k`) and the vector length.
//!
//! | phase | site sends | server relays |
//! |---|---|---|
//! | 0 advertise keys | one X25519 public key per neighbour ([`AdvertiseKeys`]) | to each site, its neighbours' keys addressed to it ([`KeysRelay`]) |
//! | 1 share keys | to each live neighbour, a ChaCha20-Poly1305 ciphertext of Shamir shares ([`ShareKeys`]) | to each site, the ciphertexts addressed to it ([`SharesRelay`]) |
//! | 2 masked input | `y = x + PRG(b) + Σ ±PRG(s_uv)` in `Z_2^64` ([`MaskedInput`]) | the survivors and the dropped ([`UnmaskRequest`]) |
//! | (consistency check, sites that sign) | per neighbour, its signature over the request it was sent and the key it advertised to that neighbour ([`SurvivorsConfirmation`]) | to each site, the request with its neighbours' signatures ([`ConfirmedRequest`]); a site needs `t` |
//! | 3 unmasking | shares of survivors' self seeds, of dropped sites' pairwise seeds ([`UnmaskResponse`]) | — |
//!
//! The server then reconstructs, subtracts the survivors' self masks and the dropped sites'
//! pairwise masks, and holds the exact sum of the survivors' inputs ([`AggregateOutput`]).
//!
//! # Typed states
//!
//! Both sides are state machines whose states are types (as in rustls): each method consumes its
//! state and returns the next, so a phase cannot be run twice or out of order — that does not
//! compile. Messages arrive as a [`ClientMessage`] (what the network decodes); a server state
//! accepts only its own phase's kind from a site it expects, once, and refuses anything else with
//! a [`SecAggError`] naming the site and what was wrong.
//!
//! A phase cannot be skipped: a site that has only advertised its keys has no way to send a masked
//! input,
//!
//! ```compile_fail
//! # use tutela_protocol::secagg::*;
//! # fn f(config: RoundConfig, relay: SharesRelay) -> Result<(), SecAggError> {
//! let (awaiting_keys, _advert) = ClientAdvertising::new(config, 0)?.advertise_keys()?;
//! awaiting_keys.masked_input(relay, &[0])?; // no such method on ClientAwaitingKeys
//! # Ok(()) }
//! ```
//!
//! nor repeated: a state is consumed by its step, so a second set of shares from the same keys
//! does not compile either,
//!
//! ```compile_fail
//! # use tutela_protocol::secagg::*;
//! # fn f(config: RoundConfig, a: KeysRelay, b: KeysRelay) -> Result<(), SecAggError> {
//! let (awaiting_keys, _advert) = ClientAdvertising::new(config, 0)?.advertise_keys()?;
//! let _first = awaiting_keys.share_keys(a)?;
//! let _second = awaiting_keys.share_keys(b)?; // use of moved value
//! # Ok(()) }
//! ```
//!
//! and the server cannot unmask before it closed the masked-input phase:
//!
//! ```compile_fail
//! # use tutela_protocol::secagg::*;
//! # fn f(server: ServerCollectingMasked) {
//! let _ = server.finish(); // finish exists only on ServerCollectingUnmask
//! # }
//! ```
//!
//! # Where this deviates from the paper, and why
//!
//! - **One X25519 key pair per neighbour, not two per site.** ring's agreement keys are ephemeral
//!   by design: single use (`agree_ephemeral` consumes the key) and never exportable, so a site's
//!   secret key cannot be Shamir-shared. Each site instead makes a fresh key pair for each
//!   neighbour; one agreement per pair gives, through HKDF-SHA256 with two labels, the pair's
//!   mask seed and its share-encryption key. What is Shamir-shared is each pairwise *mask seed*
//!   (and the self-mask seed), not a secret key: recovering a dropped site reveals exactly its
//!   seeds with the survivors, which is what the paper's reconstruction of the secret key reveals
//!   and no more. The encryption key is a different HKDF output and stays secret.
//! - **The field.** Shamir over the prime field `GF(2^61 − 1)` ([`shamir`]): a 32-byte seed is
//!   five elements. Hand-written (about a hundred lines, exhaustively tested) rather than a crate:
//!   the maintained Rust Shamir crates work over `GF(2^8)` byte by byte, which is fine too, but a
//!   prime field keeps the interpolation one loop of integer arithmetic we can read in full.
//! - **Ring.** Masks and sums live in `Z_2^64` (wrapping `u64`), the ring of the coordinator's
//!   fixed-point accumulator (`i64`, wrapping adds): the masked aggregation can fold into it.
//!
//! Sites given their identity key and the participants' certificates sign their advertised keys
//! and run the consistency check ([`signing`]): the defences against a coordinator that
//! substitutes keys or tells sites different survivor lists. The threat model and what is
//! protected: `docs/architecture.md`, section "Secure aggregation".

mod client;
pub mod encode;
pub mod graph;
mod keys;
pub mod masks;
mod messages;
mod server;
pub mod shamir;
pub mod signing;
pub mod simulate;
mod spec;
pub mod wire;

pub use client::{
    ClientAdvertising, ClientAwaitingKeys, ClientAwaitingShares, ClientAwaitingUnmask,
    ClientConfirmedSurvivors,
};
pub use graph::CommunicationGraph;
pub use messages::{
    AdvertiseKeys, AdvertisedKey, ClientMessage, ConfirmedRequest, KeysRelay, MaskedInput, Phase,
    ShareKeys, SharesRelay, SurvivorsConfirmation, UnmaskRequest, UnmaskResponse, UnmaskShare,
};
pub use server::{
    AggregateOutput, ServerCollectingConfirmations, ServerCollectingKeys, ServerCollectingMasked,
    ServerCollectingShares, ServerCollectingUnmask,
};
pub use spec::SecureAggregationSpec;

/// The most participants a round may have. [`encode`]'s grid keeps the sum of this many sites'
/// values exact in `Z_2^64` (no wrap-around), and it bounds what a site builds from a config the
/// coordinator sends (the graph is `O(n)` memory; a hostile `n` of 200,000 must be refused, not
/// built).
pub const MAX_SITES: u32 = 2048;

/// A site's position in the round's participant list, `0..n`.
pub type SiteIndex = u32;

/// Everything every party of one round agrees on before it starts. The coordinator derives it
/// from the job spec ([`SecureAggregationSpec::round_config`], the graph seed from job digest,
/// round and attempt) and sends it to each site; a site refuses one that does not
/// [`validate`](RoundConfig::validate) or that the spec does not give
/// ([`SecureAggregationSpec::check_offered`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    /// The job spec's digest: binds every key, share and ciphertext to this job.
    pub job_digest: [u8; 32],
    /// The round number within the job.
    pub round: u32,
    /// Number of participants `n`; they are indexed `0..n`.
    pub sites: u32,
    /// Neighbours per site, `k` (see [`graph`]); `n − 1` makes the graph complete.
    pub degree: u32,
    /// Shamir threshold `t`: this many of a site's neighbours recover its seeds, fewer learn
    /// nothing about them. More than half the degree (`2t > k`, checked by
    /// [`validate`](RoundConfig::validate)); with `c` neighbours colluding with the server the
    /// site stays protected while `2t > k + c`.
    pub threshold: u32,
    /// The round fails when fewer sites than this are left after any phase.
    pub min_survivors: u32,
    /// The public seed the communication graph is derived from ([`derive_graph_seed`] when the
    /// config comes from a job spec).
    pub graph_seed: [u8; 32],
    /// Length of every input vector (parameters of the model).
    pub vector_len: u64,
}

/// The communication graph's seed for one attempt of one round: SHA-256 of a label, the job
/// digest, the round and the attempt number. Derived, not drawn by the coordinator, so that a
/// site recomputes it ([`SecureAggregationSpec::check_offered`]) and the coordinator cannot grind
/// seeds until the graph surrounds a victim with sites it controls; all it can do is abort and
/// start another attempt, which every site sees (the attempt number is in the seed, hence in the
/// round's tag).
pub fn derive_graph_seed(job_digest: &[u8; 32], round: u32, attempt: u32) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"tutela-secagg-v1 graph seed\0");
    ctx.update(job_digest);
    ctx.update(&round.to_le_bytes());
    ctx.update(&attempt.to_le_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Default neighbours per site for `n` participants: the smallest even number at least
/// `3 · log2(n)`, at most `n − 1`. Bell et al. show `k = O(log n)` suffices for correctness and
/// privacy with overwhelming probability; the constant 3 follows their concrete parameter tables
/// (degree ≈ 20 at n = 100).
pub fn default_degree(sites: u32) -> u32 {
    if sites <= 1 {
        return 0;
    }
    let k = (3.0 * f64::from(sites).log2()).ceil() as u32;
    (k + (k % 2)).min(sites - 1)
}

/// Threshold `t = ⌊fraction · k⌋ + 1` (at least 1, at most `k`).
pub fn threshold_for(degree: u32, fraction: f64) -> u32 {
    ((fraction * f64::from(degree)).floor() as u32 + 1).clamp(1, degree.max(1))
}

impl RoundConfig {
    /// Checks the parameters fit together; the error says which does not.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let bad = |what: String| Err(SecAggError::Config(what));
        if self.sites < 2 || self.sites > MAX_SITES {
            return bad(format!(
                "sites must be in 2..={MAX_SITES} (the most whose sum stays exact in 64 bits), \
                 got {}",
                self.sites
            ));
        }
        if self.degree == 0 || self.degree >= self.sites {
            return bad(format!(
                "degree (neighbours per site) must be in 1..={} for {} sites, got {}",
                self.sites - 1,
                self.sites,
                self.degree
            ));
        }
        if self.degree < self.sites - 1 && self.degree % 2 == 1 {
            return bad(format!(
                "degree must be even unless the graph is complete (n − 1 = {}), got {}",
                self.sites - 1,
                self.degree
            ));
        }
        // 2t > k: a site's neighbours cannot be split into two groups that each hold t of its
        // shares, so a server cannot collect its self seed from the ones it calls survivors and
        // its pairwise seeds from the ones it calls dropped (with t ≤ k/2 a consistent survivor
        // list that "drops" t neighbours unmasks the site: Bell et al. 2020, §3).
        let min_threshold = self.degree / 2 + 1;
        if self.threshold < min_threshold || self.threshold > self.degree {
            return bad(format!(
                "threshold must be in {min_threshold}..={} (more than half the degree {}, at most \
                 the degree), got {}",
                self.degree, self.degree, self.threshold
            ));
        }
        if self.min_survivors < self.threshold || self.min_survivors > self.sites {
            return bad(format!(
                "min_survivors must be in {}..={} (at least the threshold, at most the sites), \
                 got {}",
                self.threshold, self.sites, self.min_survivors
            ));
        }
        if self.vector_len == 0 || usize::try_from(self.vector_len).is_err() {
            return bad(format!(
                "vector_len must be >= 1 and addressable, got {}",
                self.vector_len
            ));
        }
        Ok(())
    }

    /// The round's tag: SHA-256 over every field. Every message carries it, key derivation uses
    /// it as the HKDF salt and share encryption as associated data, so nothing of one round or
    /// job is accepted in another.
    pub fn tag(&self) -> RoundTag {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tutela-secagg-plus-v1\0");
        ctx.update(&self.job_digest);
        ctx.update(&self.round.to_le_bytes());
        ctx.update(&self.sites.to_le_bytes());
        ctx.update(&self.degree.to_le_bytes());
        ctx.update(&self.threshold.to_le_bytes());
        ctx.update(&self.min_survivors.to_le_bytes());
        ctx.update(&self.graph_seed);
        ctx.update(&self.vector_len.to_le_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        RoundTag(out)
    }

    pub(crate) fn len(&self) -> usize {
        // validate() checked it fits.
        usize::try_from(self.vector_len).unwrap_or(usize::MAX)
    }
}

/// A round's identity as its messages carry it ([`RoundConfig::tag`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundTag(pub [u8; 32]);

/// What went wrong in a secure aggregation round. Errors about a message name the site it came
/// from and the phase; errors that end the round say how many were needed and how many there were.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecAggError {
    #[error("secure aggregation round configuration: {0}")]
    Config(String),
    #[error(
        "message from site {site} refused: it is a {got} message, the {state} accepts only {expected}"
    )]
    OutOfPhase {
        site: SiteIndex,
        got: Phase,
        expected: Phase,
        state: &'static str,
    },
    #[error("message from site {site} refused: it belongs to another round (its tag differs)")]
    WrongRound { site: SiteIndex },
    #[error("message from site {site} in phase {phase} refused: {reason}")]
    Malformed {
        site: SiteIndex,
        phase: Phase,
        reason: String,
    },
    #[error("round failed in phase {phase}: {reason}")]
    RoundFailed { phase: Phase, reason: String },
    #[error(
        "site {site} aborts in phase {phase}: it has {live} live neighbours, fewer than the \
         threshold {threshold}, so its secrets could not be recovered"
    )]
    TooFewNeighbours {
        site: SiteIndex,
        phase: Phase,
        live: usize,
        threshold: u32,
    },
    #[error("site {site} refuses the server's request in phase {phase}: {reason}")]
    Refused {
        site: SiteIndex,
        phase: Phase,
        reason: String,
    },
    #[error("secure aggregation: {0}")]
    Crypto(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoundConfig {
        RoundConfig {
            job_digest: [7; 32],
            round: 3,
            sites: 10,
            degree: 9,
            threshold: 5,
            min_survivors: 5,
            graph_seed: [1; 32],
            vector_len: 100,
        }
    }

    #[test]
    fn default_degree_is_logarithmic_and_even() {
        assert_eq!(default_degree(2), 1);
        assert_eq!(default_degree(5), 4);
        assert_eq!(default_degree(10), 9);
        assert_eq!(default_degree(100), 20);
        assert_eq!(default_degree(1000), 30);
        assert_eq!(threshold_for(20, 0.5), 11);
        assert_eq!(threshold_for(9, 0.5), 5);
    }

    #[test]
    fn config_checks_name_the_parameter() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.sites = 200_000;
        assert!(
            matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("sites must be in 2..=2048"))
        );
        (c.sites, c.degree, c.threshold, c.min_survivors) = (MAX_SITES, 34, 18, 18);
        assert!(c.validate().is_ok());
        let mut c = config();
        c.sites = 1;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("sites")));
        let mut c = config();
        c.degree = 10;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("degree")));
        let mut c = config();
        c.degree = 5;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("even")));
        let mut c = config();
        c.threshold = 0;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("threshold")));
        // 2t > k: with k = 9, t = 4 would let a consistent server unmask a site.
        let mut c = config();
        c.threshold = 4;
        c.min_survivors = 4;
        assert!(
            matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("threshold must be in 5..=9"))
        );
        let mut c = config();
        c.threshold = 10;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("threshold")));
        let mut c = config();
        c.min_survivors = 4;
        assert!(matches!(c.validate(), Err(SecAggError::Config(m)) if m.contains("min_survivors")));
    }

    #[test]
    fn the_tag_binds_every_field() {
        let base = config().tag();
        let mut c = config();
        c.round = 4;
        assert_ne!(c.tag(), base);
        let mut c = config();
        c.graph_seed[0] ^= 1;
        assert_ne!(c.tag(), base);
        let mut c = config();
        c.vector_len += 1;
        assert_ne!(c.tag(), base);
        assert_eq!(config().tag(), base);
    }
}
