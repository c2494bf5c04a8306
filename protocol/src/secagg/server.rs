//! The server's (coordinator's) side of a SecAgg+ round: one state per phase collecting the
//! sites' messages, closed by the coordinator when every expected site answered or the phase's
//! deadline passed.
//!
//! ```text
//! ServerCollectingKeys --close--> ServerCollectingShares --close--> ServerCollectingMasked
//!   --close--> ServerCollectingUnmask --finish--> AggregateOutput
//! ```
//!
//! Each `receive` takes a [`ClientMessage`] as the network decoded it and refuses, naming the site:
//! a message of another phase (late or early), of another round, from a site that is not expected
//! in this phase (it dropped earlier, or is not a participant), a second message from a site, and
//! content that does not fit the graph or the round. A refused message changes nothing. Each
//! `close` fails the round, with the counts, when fewer than `min_survivors` sites are left.
//!
//! What the server keeps of an update: [`ServerCollectingMasked`] folds each masked input into one
//! running sum in `Z_2^64` as it arrives and keeps nothing else of it
//! ([`ServerCollectingMasked::stored_sum`] is all there is), so memory does not grow with the
//! number of sites and no single site's input is ever stored unmasked.

use std::collections::{BTreeMap, BTreeSet};

use super::graph::CommunicationGraph;
use super::keys::TAG_LEN;
use super::masks::{self, Sign};
use super::messages::{
    AdvertisedKey, ClientMessage, ConfirmedRequest, KeysRelay, Phase, SharesRelay, UnmaskRequest,
    UnmaskShare,
};
use super::shamir::{self, Share};
use super::{RoundConfig, RoundTag, SecAggError, SiteIndex};

#[derive(Debug)]
struct ServerCore {
    config: RoundConfig,
    tag: RoundTag,
    graph: CommunicationGraph,
    threads: usize,
}

impl ServerCore {
    /// The checks every message passes first: its phase, its round, its sender is expected and
    /// has not answered yet.
    fn admit(
        &self,
        msg: &ClientMessage,
        expected: Phase,
        state: &'static str,
        expected_sites: Option<&BTreeSet<SiteIndex>>,
        answered: impl Fn(SiteIndex) -> bool,
    ) -> Result<(), SecAggError> {
        let site = msg.site();
        if msg.phase() != expected {
            return Err(SecAggError::OutOfPhase {
                site,
                got: msg.phase(),
                expected,
                state,
            });
        }
        let round = match msg {
            ClientMessage::AdvertiseKeys(m) => &m.round,
            ClientMessage::ShareKeys(m) => &m.round,
            ClientMessage::MaskedInput(m) => &m.round,
            ClientMessage::Confirm(m) => &m.round,
            ClientMessage::Unmask(m) => &m.round,
        };
        if *round != self.tag {
            return Err(SecAggError::WrongRound { site });
        }
        let malformed = |reason: &str| SecAggError::Malformed {
            site,
            phase: expected,
            reason: reason.into(),
        };
        if site >= self.config.sites {
            return Err(malformed("the site is not a participant of this round"));
        }
        if let Some(sites) = expected_sites
            && !sites.contains(&site)
        {
            return Err(malformed(
                "the site dropped out in an earlier phase (its message came too late)",
            ));
        }
        if answered(site) {
            return Err(malformed(
                "the site already sent its message for this phase",
            ));
        }
        Ok(())
    }

    fn need(&self, phase: Phase, have: usize, what: &str) -> Result<(), SecAggError> {
        let min = self.config.min_survivors as usize;
        if have >= min {
            Ok(())
        } else {
            Err(SecAggError::RoundFailed {
                phase,
                reason: format!(
                    "only {have} of {} sites {what}, fewer than the minimum of {min}",
                    self.config.sites
                ),
            })
        }
    }
}

/// Phase 0: collecting each site's public keys.
#[derive(Debug)]
pub struct ServerCollectingKeys {
    core: ServerCore,
    advertised: BTreeMap<SiteIndex, BTreeMap<SiteIndex, AdvertisedKey>>,
}

impl ServerCollectingKeys {
    /// The server of the round `config` describes.
    pub fn new(config: RoundConfig) -> Result<Self, SecAggError> {
        config.validate()?;
        let graph = CommunicationGraph::harary(config.sites, config.degree, &config.graph_seed);
        Ok(ServerCollectingKeys {
            core: ServerCore {
                tag: config.tag(),
                config,
                graph,
                threads: masks::default_threads(),
            },
            advertised: BTreeMap::new(),
        })
    }

    /// Threads for unmasking (default: the machine's parallelism).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.core.threads = threads.max(1);
        self
    }

    pub fn config(&self) -> &RoundConfig {
        &self.core.config
    }

    /// Accepts a site's [`AdvertiseKeys`](super::AdvertiseKeys): exactly one key per neighbour.
    pub fn receive(&mut self, msg: ClientMessage) -> Result<(), SecAggError> {
        let core = &self.core;
        core.admit(
            &msg,
            Phase::AdvertiseKeys,
            "server collecting keys",
            None,
            |s| self.advertised.contains_key(&s),
        )?;
        let ClientMessage::AdvertiseKeys(m) = msg else {
            return Ok(());
        };
        let count = m.keys.len();
        let keys: BTreeMap<SiteIndex, AdvertisedKey> =
            m.keys.into_iter().map(|k| (k.peer, k)).collect();
        let expected = core.graph.neighbours(m.site);
        if keys.len() != count || !keys.keys().copied().eq(expected.iter().copied()) {
            return Err(SecAggError::Malformed {
                site: m.site,
                phase: Phase::AdvertiseKeys,
                reason: format!(
                    "it must advertise exactly one key for each of its {} neighbours, it sent {} \
                     for other or repeated sites",
                    expected.len(),
                    count
                ),
            });
        }
        self.advertised.insert(m.site, keys);
        Ok(())
    }

    /// Ends phase 0: the relays of keys, one per site that advertised.
    pub fn close(self) -> Result<(ServerCollectingShares, Vec<KeysRelay>), SecAggError> {
        let core = self.core;
        core.need(
            Phase::AdvertiseKeys,
            self.advertised.len(),
            "advertised keys",
        )?;
        let relays = self
            .advertised
            .keys()
            .map(|&u| KeysRelay {
                round: core.tag,
                to: u,
                keys: core
                    .graph
                    .neighbours(u)
                    .iter()
                    .filter_map(|v| {
                        let key = self.advertised.get(v)?.get(&u)?;
                        Some(AdvertisedKey {
                            peer: *v,
                            ..key.clone()
                        })
                    })
                    .collect(),
            })
            .collect();
        let advertised = self.advertised.into_keys().collect();
        Ok((
            ServerCollectingShares {
                core,
                advertised,
                ciphertexts: BTreeMap::new(),
            },
            relays,
        ))
    }
}

/// Phase 1: collecting each site's sealed shares.
#[derive(Debug)]
pub struct ServerCollectingShares {
    core: ServerCore,
    advertised: BTreeSet<SiteIndex>,
    ciphertexts: BTreeMap<SiteIndex, BTreeMap<SiteIndex, Vec<u8>>>,
}

impl ServerCollectingShares {
    /// Accepts a site's [`ShareKeys`](super::ShareKeys): one ciphertext for each of at least `t`
    /// of its neighbours that advertised keys.
    pub fn receive(&mut self, msg: ClientMessage) -> Result<(), SecAggError> {
        let core = &self.core;
        core.admit(
            &msg,
            Phase::ShareKeys,
            "server collecting shares",
            Some(&self.advertised),
            |s| self.ciphertexts.contains_key(&s),
        )?;
        let ClientMessage::ShareKeys(m) = msg else {
            return Ok(());
        };
        let malformed = |reason: String| SecAggError::Malformed {
            site: m.site,
            phase: Phase::ShareKeys,
            reason,
        };
        let mut sealed = BTreeMap::new();
        for (to, ct) in m.ciphertexts {
            if !core.graph.are_neighbours(m.site, to) || !self.advertised.contains(&to) {
                return Err(malformed(format!(
                    "it sealed shares for site {to}, which is not a neighbour that advertised keys"
                )));
            }
            if ct.len() < TAG_LEN {
                return Err(malformed(format!(
                    "its ciphertext for site {to} is {} bytes, shorter than an authentication tag",
                    ct.len()
                )));
            }
            if sealed.insert(to, ct).is_some() {
                return Err(malformed(format!("it sealed shares for site {to} twice")));
            }
        }
        if sealed.len() < core.config.threshold as usize {
            return Err(malformed(format!(
                "it shared with {} neighbours, fewer than the threshold {}",
                sealed.len(),
                core.config.threshold
            )));
        }
        self.ciphertexts.insert(m.site, sealed);
        Ok(())
    }

    /// Ends phase 1: each site that shared gets the ciphertexts addressed to it.
    pub fn close(self) -> Result<(ServerCollectingMasked, Vec<SharesRelay>), SecAggError> {
        let core = self.core;
        core.need(
            Phase::ShareKeys,
            self.ciphertexts.len(),
            "shared their keys",
        )?;
        let shared: BTreeSet<SiteIndex> = self.ciphertexts.keys().copied().collect();
        // Who receives whose shares: exactly the pairwise masks each site will apply.
        let mut relayed_from: BTreeMap<SiteIndex, BTreeSet<SiteIndex>> =
            shared.iter().map(|&v| (v, BTreeSet::new())).collect();
        let mut inboxes: BTreeMap<SiteIndex, Vec<(SiteIndex, Vec<u8>)>> = BTreeMap::new();
        for (from, sealed) in self.ciphertexts {
            for (to, ct) in sealed {
                if let Some(set) = relayed_from.get_mut(&to) {
                    set.insert(from);
                    inboxes.entry(to).or_default().push((from, ct));
                }
            }
        }
        let relays = shared
            .iter()
            .map(|&v| SharesRelay {
                round: core.tag,
                to: v,
                ciphertexts: inboxes.remove(&v).unwrap_or_default(),
            })
            .collect();
        let len = core.config.len();
        Ok((
            ServerCollectingMasked {
                core,
                shared,
                relayed_from,
                sum: vec![0; len],
                received: BTreeSet::new(),
            },
            relays,
        ))
    }
}

/// Phase 2: folding masked inputs into the running sum.
pub struct ServerCollectingMasked {
    core: ServerCore,
    shared: BTreeSet<SiteIndex>,
    relayed_from: BTreeMap<SiteIndex, BTreeSet<SiteIndex>>,
    sum: Vec<u64>,
    received: BTreeSet<SiteIndex>,
}

impl std::fmt::Debug for ServerCollectingMasked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerCollectingMasked({} of {} inputs folded)",
            self.received.len(),
            self.shared.len()
        )
    }
}

impl ServerCollectingMasked {
    /// Folds a site's [`MaskedInput`](super::MaskedInput) into the sum (wrapping).
    pub fn receive(&mut self, msg: ClientMessage) -> Result<(), SecAggError> {
        self.core.admit(
            &msg,
            Phase::MaskedInput,
            "server collecting masked inputs",
            Some(&self.shared),
            |s| self.received.contains(&s),
        )?;
        let ClientMessage::MaskedInput(m) = msg else {
            return Ok(());
        };
        if m.masked.len() != self.sum.len() {
            return Err(SecAggError::Malformed {
                site: m.site,
                phase: Phase::MaskedInput,
                reason: format!(
                    "its masked input has {} elements, the round's vector length is {}",
                    m.masked.len(),
                    self.sum.len()
                ),
            });
        }
        for (s, y) in self.sum.iter_mut().zip(&m.masked) {
            *s = s.wrapping_add(*y);
        }
        self.received.insert(m.site);
        Ok(())
    }

    /// Everything the server holds of the inputs so far: the running sum of masked inputs.
    pub fn stored_sum(&self) -> &[u64] {
        &self.sum
    }

    /// The sites whose masked input was folded.
    pub fn received(&self) -> &BTreeSet<SiteIndex> {
        &self.received
    }

    /// Ends phase 2: the request every survivor answers.
    pub fn close(self) -> Result<(ServerCollectingUnmask, UnmaskRequest), SecAggError> {
        let core = self.core;
        core.need(
            Phase::MaskedInput,
            self.received.len(),
            "sent their masked input",
        )?;
        let survivors = self.received;
        let dropped: BTreeSet<SiteIndex> = self.shared.difference(&survivors).copied().collect();
        let request = UnmaskRequest {
            round: core.tag,
            survivors: survivors.iter().copied().collect(),
            dropped: dropped.iter().copied().collect(),
        };
        Ok((
            ServerCollectingUnmask {
                core,
                survivors,
                dropped,
                relayed_from: self.relayed_from,
                sum: self.sum,
                self_shares: BTreeMap::new(),
                pair_shares: BTreeMap::new(),
                responded: BTreeSet::new(),
            },
            request,
        ))
    }
}

impl ServerCollectingMasked {
    /// Ends phase 2 of a round whose sites sign (they unmask only after the consistency check):
    /// the request every survivor signs.
    pub fn close_with_consistency_check(
        self,
    ) -> Result<(ServerCollectingConfirmations, UnmaskRequest), SecAggError> {
        let (next, request) = self.close()?;
        Ok((
            ServerCollectingConfirmations {
                next,
                request: request.clone(),
                confirmations: BTreeMap::new(),
            },
            request,
        ))
    }
}

/// The consistency check: collecting the survivors' signatures over the survivor list, one per
/// signer and neighbour.
pub struct ServerCollectingConfirmations {
    next: ServerCollectingUnmask,
    request: UnmaskRequest,
    /// signer → `(neighbour, signature for it)`.
    confirmations: BTreeMap<SiteIndex, Vec<(SiteIndex, Vec<u8>)>>,
}

impl std::fmt::Debug for ServerCollectingConfirmations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerCollectingConfirmations({} of {} survivors signed)",
            self.confirmations.len(),
            self.request.survivors.len()
        )
    }
}

impl ServerCollectingConfirmations {
    /// Accepts a survivor's [`SurvivorsConfirmation`](super::SurvivorsConfirmation): one signature
    /// per neighbour, each addressed to a neighbour once. The sites check the signatures; the
    /// server only routes them.
    pub fn receive(&mut self, msg: ClientMessage) -> Result<(), SecAggError> {
        self.next.core.admit(
            &msg,
            Phase::ConsistencyCheck,
            "server collecting survivor-list confirmations",
            Some(&self.next.survivors),
            |s| self.confirmations.contains_key(&s),
        )?;
        if let ClientMessage::Confirm(m) = msg {
            let mut seen = BTreeSet::new();
            for (to, _) in &m.signatures {
                if !self.next.core.graph.are_neighbours(m.site, *to) || !seen.insert(*to) {
                    return Err(SecAggError::Malformed {
                        site: m.site,
                        phase: Phase::ConsistencyCheck,
                        reason: format!(
                            "a signature addressed to site {to}, which is not a neighbour or is \
                             addressed twice"
                        ),
                    });
                }
            }
            self.confirmations.insert(m.site, m.signatures);
        }
        Ok(())
    }

    /// Ends the consistency check: for every survivor that confirmed, the request and the
    /// signatures its neighbours addressed to it.
    pub fn close(self) -> Result<(ServerCollectingUnmask, Vec<ConfirmedRequest>), SecAggError> {
        self.next.core.need(
            Phase::ConsistencyCheck,
            self.confirmations.len(),
            "confirmed the survivor list",
        )?;
        let mut addressed: BTreeMap<SiteIndex, Vec<(SiteIndex, Vec<u8>)>> = self
            .confirmations
            .keys()
            .map(|&site| (site, Vec::new()))
            .collect();
        for (&signer, signatures) in &self.confirmations {
            for (to, signature) in signatures {
                if let Some(list) = addressed.get_mut(to) {
                    list.push((signer, signature.clone()));
                }
            }
        }
        let relays = addressed
            .into_iter()
            .map(|(to, confirmations)| ConfirmedRequest {
                request: self.request.clone(),
                to,
                confirmations,
            })
            .collect();
        Ok((self.next, relays))
    }
}

/// Phase 3: collecting shares, then unmasking.
pub struct ServerCollectingUnmask {
    core: ServerCore,
    survivors: BTreeSet<SiteIndex>,
    dropped: BTreeSet<SiteIndex>,
    relayed_from: BTreeMap<SiteIndex, BTreeSet<SiteIndex>>,
    sum: Vec<u64>,
    self_shares: BTreeMap<SiteIndex, Vec<Share>>,
    pair_shares: BTreeMap<(SiteIndex, SiteIndex), Vec<Share>>,
    responded: BTreeSet<SiteIndex>,
}

impl std::fmt::Debug for ServerCollectingUnmask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerCollectingUnmask({} of {} survivors answered)",
            self.responded.len(),
            self.survivors.len()
        )
    }
}

/// The result of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateOutput {
    /// The exact sum of the survivors' inputs, in `Z_2^64` read as two's complement.
    pub sum: Vec<i64>,
    /// Whose inputs are in the sum.
    pub survivors: Vec<SiteIndex>,
    /// Sites that shared keys but sent no input (their pairwise masks were removed).
    pub dropped: Vec<SiteIndex>,
}

impl ServerCollectingUnmask {
    /// Everything the server holds of the inputs: the running sum of masked inputs.
    pub fn stored_sum(&self) -> &[u64] {
        &self.sum
    }

    /// Accepts a survivor's [`UnmaskResponse`](super::UnmaskResponse).
    pub fn receive(&mut self, msg: ClientMessage) -> Result<(), SecAggError> {
        self.core.admit(
            &msg,
            Phase::Unmasking,
            "server collecting unmasking shares",
            Some(&self.survivors),
            |s| self.responded.contains(&s),
        )?;
        let ClientMessage::Unmask(m) = msg else {
            return Ok(());
        };
        let site = m.site;
        let malformed = |reason: String| SecAggError::Malformed {
            site,
            phase: Phase::Unmasking,
            reason,
        };
        let holds = self.relayed_from.get(&site).cloned().unwrap_or_default();
        let x = shamir::x_of(site);
        let mut seen = BTreeSet::new();
        for share in &m.shares {
            let (owner, peer, s) = match share {
                UnmaskShare::SelfSeed { owner, share } => (*owner, None, share),
                UnmaskShare::PairSeed { owner, peer, share } => (*owner, Some(*peer), share),
            };
            if !holds.contains(&owner) {
                return Err(malformed(format!(
                    "it sent a share of site {owner}'s seeds, which it was never given"
                )));
            }
            if s.x != x || s.ys.iter().any(|&y| y >= shamir::P) {
                return Err(malformed(format!(
                    "its share of site {owner}'s seed is not at its own x-coordinate or not in \
                     the field"
                )));
            }
            match peer {
                None if !self.survivors.contains(&owner) => {
                    return Err(malformed(format!(
                        "it sent a self-seed share of site {owner}, which is not a survivor"
                    )));
                }
                Some(p)
                    if !self.dropped.contains(&owner)
                        || !self.survivors.contains(&p)
                        || !self.core.graph.are_neighbours(owner, p) =>
                {
                    return Err(malformed(format!(
                        "it sent a share of the pairwise seed of sites {owner} and {p}, which is \
                         not one between a dropped site and a surviving neighbour"
                    )));
                }
                _ => {}
            }
            if !seen.insert((owner, peer)) {
                return Err(malformed(format!(
                    "it sent a share of site {owner}'s seed twice"
                )));
            }
        }
        for share in m.shares {
            match share {
                UnmaskShare::SelfSeed { owner, share } => {
                    self.self_shares.entry(owner).or_default().push(share)
                }
                UnmaskShare::PairSeed { owner, peer, share } => self
                    .pair_shares
                    .entry((owner, peer))
                    .or_default()
                    .push(share),
            }
        }
        self.responded.insert(site);
        Ok(())
    }

    /// Ends the round: reconstructs every survivor's self-mask seed and every pairwise seed
    /// between a dropped site and a survivor that masked with it, removes those masks, and
    /// returns the sum. Fails, naming the seed and the counts, when fewer than `t` shares of one
    /// arrived or the shares disagree.
    pub fn finish(self) -> Result<AggregateOutput, SecAggError> {
        let t = self.core.config.threshold;
        let phase = Phase::Unmasking;
        let recover = |shares: Option<&Vec<Share>>, what: String| {
            let shares = shares.map(Vec::as_slice).unwrap_or(&[]);
            if shares.len() < t as usize {
                return Err(SecAggError::RoundFailed {
                    phase,
                    reason: format!(
                        "only {} shares of {what} arrived, the threshold is {t} ({} of {} \
                         survivors answered)",
                        shares.len(),
                        self.responded.len(),
                        self.survivors.len()
                    ),
                });
            }
            shamir::reconstruct(shares, t, &what).map_err(|e| SecAggError::RoundFailed {
                phase,
                reason: e.to_string(),
            })
        };
        let mut undo = Vec::new();
        for &w in &self.survivors {
            let seed = recover(
                self.self_shares.get(&w),
                format!("site {w}'s self-mask seed"),
            )?;
            undo.push((seed, Sign::Subtract));
        }
        for &w in &self.dropped {
            for &v in &self.survivors {
                // v masked with w exactly when w's shares were relayed to v.
                if !self.relayed_from.get(&v).is_some_and(|s| s.contains(&w)) {
                    continue;
                }
                let seed = recover(
                    self.pair_shares.get(&(w, v)),
                    format!("the pairwise seed of dropped site {w} and site {v}"),
                )?;
                // v added PRG(s) when v < w and subtracted it otherwise: undo that.
                undo.push((seed, if v < w { Sign::Subtract } else { Sign::Add }));
            }
        }
        let mut sum = self.sum;
        masks::apply(&mut sum, &undo, self.core.threads);
        Ok(AggregateOutput {
            sum: sum.into_iter().map(|x| x as i64).collect(),
            survivors: self.survivors.into_iter().collect(),
            dropped: self.dropped.into_iter().collect(),
        })
    }
}
