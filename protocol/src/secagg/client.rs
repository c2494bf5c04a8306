//! The site's side of a SecAgg+ round: four states, each consumed by the method that answers the
//! server's next message.
//!
//! ```text
//! ClientAdvertising --advertise_keys--> ClientAwaitingKeys --share_keys(KeysRelay)-->
//! ClientAwaitingShares --masked_input(SharesRelay, x)--> ClientAwaitingUnmask --unmask(UnmaskRequest)--> done
//! ```
//!
//! A site checks what the server relays before it acts on it: the round's tag, that it is the
//! addressee, that every key or ciphertext comes from one of its neighbours once, that the
//! ciphertexts authenticate and decode, and — before it reveals anything in the unmasking — that
//! survivors and dropped sites are disjoint, that it is a survivor itself, that there are at
//! least `min_survivors`, and that every neighbour whose shares it holds is classified. It never
//! reveals both a site's self-seed share and its pairwise-seed shares.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use tutela_privacy::noise::SecureRng;

use super::graph::CommunicationGraph;
use super::keys::{self, PairKeys, PairSecrets, Seed};
use super::masks::{self, Sign};
use super::messages::{
    AdvertiseKeys, AdvertisedKey, ConfirmedRequest, KeysRelay, MaskedInput, Phase, ShareBundle,
    ShareKeys, SharesRelay, SurvivorsConfirmation, UnmaskRequest, UnmaskResponse, UnmaskShare,
};
use super::shamir::{self, Share};
use super::signing::{KeySigner, KeyVerifier, key_message, survivors_message};
use super::{RoundConfig, RoundTag, SecAggError, SiteIndex};

/// What every state of a site knows.
struct Core {
    config: RoundConfig,
    tag: RoundTag,
    graph: CommunicationGraph,
    me: SiteIndex,
    threads: usize,
    /// Signs this site's advertised keys; `None`: unsigned.
    signer: Option<Arc<dyn KeySigner>>,
    /// Checks the neighbours' signatures; `None`: keys are taken unsigned (honest-but-curious
    /// server only).
    verifier: Option<Arc<dyn KeyVerifier>>,
    /// The public key this site advertised for each neighbour (this attempt's, fresh).
    advertised: BTreeMap<SiteIndex, [u8; 32]>,
    /// The public key each neighbour advertised for this site, as relayed (and, when signing,
    /// verified). With `advertised`: this attempt's transcript of each pair, which the
    /// consistency check's signatures bind.
    received: BTreeMap<SiteIndex, [u8; 32]>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "site {} of {} (signed keys: {})",
            self.me,
            self.config.sites,
            self.verifier.is_some()
        )
    }
}

impl Core {
    fn refuse(&self, phase: Phase, reason: impl Into<String>) -> SecAggError {
        SecAggError::Refused {
            site: self.me,
            phase,
            reason: reason.into(),
        }
    }

    fn check_round(&self, round: &RoundTag, phase: Phase) -> Result<(), SecAggError> {
        if *round == self.tag {
            Ok(())
        } else {
            Err(self.refuse(phase, "the server's message belongs to another round"))
        }
    }

    fn check_addressee(&self, to: SiteIndex, phase: Phase) -> Result<(), SecAggError> {
        if to == self.me {
            Ok(())
        } else {
            Err(self.refuse(phase, format!("the relay is addressed to site {to}")))
        }
    }

    fn enough(&self, live: usize, phase: Phase) -> Result<(), SecAggError> {
        if live >= self.config.threshold as usize {
            Ok(())
        } else {
            Err(SecAggError::TooFewNeighbours {
                site: self.me,
                phase,
                live,
                threshold: self.config.threshold,
            })
        }
    }
}

/// A site at the start of a round.
#[derive(Debug)]
pub struct ClientAdvertising {
    core: Core,
}

impl ClientAdvertising {
    /// Site `me` of the round `config` describes. Refuses an invalid configuration.
    pub fn new(config: RoundConfig, me: SiteIndex) -> Result<Self, SecAggError> {
        config.validate()?;
        if me >= config.sites {
            return Err(SecAggError::Config(format!(
                "site index {me} is outside the round's {} sites",
                config.sites
            )));
        }
        let graph = CommunicationGraph::harary(config.sites, config.degree, &config.graph_seed);
        Ok(ClientAdvertising {
            core: Core {
                tag: config.tag(),
                config,
                graph,
                me,
                threads: masks::default_threads(),
                signer: None,
                verifier: None,
                advertised: BTreeMap::new(),
                received: BTreeMap::new(),
            },
        })
    }

    /// Threads for mask expansion (default: the machine's parallelism).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.core.threads = threads.max(1);
        self
    }

    /// Signs this site's advertised keys with `signer` (its identity key) and requires every
    /// neighbour's key to carry a signature `verifier` accepts (their certificates): the defence
    /// against a server substituting keys ([`signing`](super::signing)).
    pub fn with_signed_keys(
        mut self,
        signer: Arc<dyn KeySigner>,
        verifier: Arc<dyn KeyVerifier>,
    ) -> Self {
        self.core.signer = Some(signer);
        self.core.verifier = Some(verifier);
        self
    }

    /// Phase 0: a fresh key pair for each neighbour; the public halves go to the server, each
    /// signed when the site signs its keys.
    pub fn advertise_keys(self) -> Result<(ClientAwaitingKeys, AdvertiseKeys), SecAggError> {
        let mut core = self.core;
        let (keys, public) =
            PairKeys::generate(core.graph.neighbours(core.me), &SystemRandom::new())?;
        let mut advertised = Vec::with_capacity(public.len());
        for (peer, public) in public {
            core.advertised.insert(peer, public);
            let signature = match &core.signer {
                Some(signer) => signer
                    .sign(&key_message(&core.tag, core.me, peer, &public))
                    .map_err(SecAggError::Crypto)?,
                None => Vec::new(),
            };
            advertised.push(AdvertisedKey {
                peer,
                public,
                signature,
            });
        }
        let msg = AdvertiseKeys {
            round: core.tag,
            site: core.me,
            keys: advertised,
        };
        Ok((ClientAwaitingKeys { core, keys }, msg))
    }
}

/// A site that advertised its keys and waits for its neighbours'.
#[derive(Debug)]
pub struct ClientAwaitingKeys {
    core: Core,
    keys: PairKeys,
}

impl ClientAwaitingKeys {
    /// Phase 1: agrees with each neighbour that advertised, Shamir-shares the self-mask seed and
    /// every pairwise mask seed among those neighbours (threshold `t`), and seals each
    /// neighbour's shares under the pair's key.
    pub fn share_keys(
        mut self,
        relay: KeysRelay,
    ) -> Result<(ClientAwaitingShares, ShareKeys), SecAggError> {
        let phase = Phase::ShareKeys;
        let core = &self.core;
        core.check_round(&relay.round, phase)?;
        core.check_addressee(relay.to, phase)?;
        let mut pairs: BTreeMap<SiteIndex, PairSecrets> = BTreeMap::new();
        let mut received = BTreeMap::new();
        for AdvertisedKey {
            peer,
            public,
            signature,
        } in &relay.keys
        {
            if pairs.contains_key(peer) {
                return Err(core.refuse(phase, format!("the relay repeats site {peer}'s key")));
            }
            if let Some(verifier) = &core.verifier {
                verifier
                    .verify(
                        *peer,
                        &key_message(&core.tag, *peer, core.me, public),
                        signature,
                    )
                    .map_err(|reason| SecAggError::Malformed {
                        site: *peer,
                        phase: Phase::AdvertiseKeys,
                        reason,
                    })?;
            }
            let secrets = self
                .keys
                .agree(core.me, *peer, public, &core.tag)
                .ok_or_else(|| {
                    core.refuse(
                        phase,
                        format!("the relay holds a key from site {peer}, which is not a neighbour"),
                    )
                })?
                .map_err(|reason| SecAggError::Malformed {
                    site: *peer,
                    phase: Phase::AdvertiseKeys,
                    reason,
                })?;
            pairs.insert(*peer, secrets);
            received.insert(*peer, *public);
        }
        core.enough(pairs.len(), phase)?;

        let mut self_seed: Seed = [0; 32];
        SystemRandom::new()
            .fill(&mut self_seed)
            .map_err(|_| SecAggError::Crypto("the OS random generator failed".into()))?;
        let mut rng = SecureRng::from_os()
            .map_err(|_| SecAggError::Crypto("the OS random generator failed".into()))?;
        let holders: Vec<SiteIndex> = pairs.keys().copied().collect();
        let t = core.config.threshold;
        let self_shares = shamir::split(&self_seed, t, &holders, &mut rng);
        let pair_shares: Vec<(SiteIndex, Vec<Share>)> = pairs
            .iter()
            .map(|(&peer, s)| (peer, shamir::split(&s.mask_seed, t, &holders, &mut rng)))
            .collect();
        let mut ciphertexts = Vec::with_capacity(holders.len());
        for (i, &holder) in holders.iter().enumerate() {
            let bundle = ShareBundle {
                self_seed: self_shares[i].ys,
                pair_seeds: pair_shares
                    .iter()
                    .map(|(peer, shares)| (*peer, shares[i].ys))
                    .collect(),
            };
            let key = &pairs[&holder].encryption_key;
            ciphertexts.push((
                holder,
                keys::seal(key, &core.tag, core.me, holder, bundle.encode())?,
            ));
        }
        let msg = ShareKeys {
            round: core.tag,
            site: core.me,
            ciphertexts,
        };
        self.core.received = received;
        Ok((
            ClientAwaitingShares {
                core: self.core,
                pairs,
                self_seed,
            },
            msg,
        ))
    }
}

/// A site that sent its shares and waits for its neighbours'.
pub struct ClientAwaitingShares {
    core: Core,
    pairs: BTreeMap<SiteIndex, PairSecrets>,
    self_seed: Seed,
}

impl std::fmt::Debug for ClientAwaitingShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientAwaitingShares(site {}, seeds hidden)",
            self.core.me
        )
    }
}

impl ClientAwaitingShares {
    /// Phase 2 from the site's real-valued update: [`encode`](super::encode::encode)s it (clip to
    /// the job's norm bound, conditional randomized rounding onto the job's grid, this site's
    /// share of the distributed discrete Gaussian noise when `params` has a σ), then masks it as
    /// [`Self::masked_input`] does. Nothing of the update leaves unmasked.
    pub fn masked_update(
        self,
        relay: SharesRelay,
        update: &[f32],
        params: &super::encode::EncodeParams,
    ) -> Result<(ClientAwaitingUnmask, MaskedInput), SecAggError> {
        let encoded = super::encode::encode(update, params, self.core.threads).map_err(|e| {
            SecAggError::Refused {
                site: self.core.me,
                phase: Phase::MaskedInput,
                reason: e.to_string(),
            }
        })?;
        self.masked_input(relay, &encoded.values)
    }

    /// Phase 2: opens and checks the neighbours' shares, then masks `input` (the site's clipped,
    /// quantized, noised update: [`encode`](super::encode)) with its self mask and one pairwise
    /// mask per neighbour that shared keys: `y = x + PRG(b) + Σ_{v > u} PRG(s_uv) − Σ_{v < u}
    /// PRG(s_uv)` in `Z_2^64`.
    pub fn masked_input(
        self,
        relay: SharesRelay,
        input: &[i64],
    ) -> Result<(ClientAwaitingUnmask, MaskedInput), SecAggError> {
        let phase = Phase::MaskedInput;
        let core = &self.core;
        core.check_round(&relay.round, phase)?;
        core.check_addressee(relay.to, phase)?;
        if input.len() != core.config.len() {
            return Err(core.refuse(
                phase,
                format!(
                    "its input has {} elements, the round's vector length is {}",
                    input.len(),
                    core.config.vector_len
                ),
            ));
        }
        let mut held: BTreeMap<SiteIndex, ShareBundle> = BTreeMap::new();
        for (from, ciphertext) in &relay.ciphertexts {
            let malformed = |reason: String| SecAggError::Malformed {
                site: *from,
                phase: Phase::ShareKeys,
                reason,
            };
            let Some(pair) = self.pairs.get(from) else {
                return Err(core.refuse(
                    phase,
                    format!(
                        "the relay holds shares from site {from}, which is not a live neighbour"
                    ),
                ));
            };
            if held.contains_key(from) {
                return Err(core.refuse(phase, format!("the relay repeats site {from}'s shares")));
            }
            let plain = keys::open(&pair.encryption_key, &core.tag, *from, core.me, ciphertext)
                .map_err(malformed)?;
            let bundle = ShareBundle::decode(&plain).map_err(malformed)?;
            let peers_ok = bundle
                .pair_seeds
                .iter()
                .all(|(p, _)| core.graph.are_neighbours(*from, *p));
            if !peers_ok || !bundle.pair_seeds.iter().any(|(p, _)| *p == core.me) {
                return Err(malformed(
                    "its shares name pairs that are not its neighbours, or not this site".into(),
                ));
            }
            held.insert(*from, bundle);
        }
        core.enough(held.len(), phase)?;

        let mut masked: Vec<u64> = input.iter().map(|&x| x as u64).collect();
        let mut all = Vec::with_capacity(held.len() + 1);
        all.push((self.self_seed, Sign::Add));
        for v in held.keys() {
            let sign = if core.me < *v {
                Sign::Add
            } else {
                Sign::Subtract
            };
            all.push((self.pairs[v].mask_seed, sign));
        }
        masks::apply(&mut masked, &all, core.threads);
        let msg = MaskedInput {
            round: core.tag,
            site: core.me,
            masked,
        };
        Ok((
            ClientAwaitingUnmask {
                core: self.core,
                held,
            },
            msg,
        ))
    }
}

/// A site that sent its masked input and waits for the unmasking request.
pub struct ClientAwaitingUnmask {
    core: Core,
    held: BTreeMap<SiteIndex, ShareBundle>,
}

impl std::fmt::Debug for ClientAwaitingUnmask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientAwaitingUnmask(site {}, shares hidden)",
            self.core.me
        )
    }
}

impl ClientAwaitingUnmask {
    /// Phase 3 of a round whose sites do not sign their keys: for each neighbour whose shares
    /// this site holds, the share of its self-mask seed if it survived, or of its pairwise seeds
    /// with the survivors if it dropped. The round ends for the site here. A site that signs its
    /// keys refuses: it unmasks only after the consistency check ([`Self::confirm`]).
    pub fn unmask(self, request: UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        if self.core.verifier.is_some() {
            return Err(self.core.refuse(
                Phase::Unmasking,
                "this site signs its keys, so it unmasks only after the consistency check",
            ));
        }
        self.check_request(&request, Phase::Unmasking)?;
        self.respond(&request)
    }

    /// The consistency check (sites that sign their keys): signs the request the server sent,
    /// after the same checks as [`Self::unmask`]. The site answers the unmasking only when `t` of
    /// its neighbours signed this very request ([`ClientConfirmedSurvivors::unmask`]), so the
    /// server cannot tell different neighbours of a site different survivor lists.
    pub fn confirm(
        self,
        request: UnmaskRequest,
    ) -> Result<(ClientConfirmedSurvivors, SurvivorsConfirmation), SecAggError> {
        let phase = Phase::ConsistencyCheck;
        let Some(signer) = self.core.signer.clone() else {
            return Err(self
                .core
                .refuse(phase, "this site does not sign: it has no identity key"));
        };
        self.check_request(&request, phase)?;
        let core = &self.core;
        let mut signatures = Vec::with_capacity(core.advertised.len());
        for (&peer, public) in &core.advertised {
            let message = survivors_message(&request, core.me, peer, public);
            signatures.push((peer, signer.sign(&message).map_err(SecAggError::Crypto)?));
        }
        let msg = SurvivorsConfirmation {
            round: core.tag,
            site: core.me,
            signatures,
        };
        Ok((
            ClientConfirmedSurvivors {
                inner: self,
                request,
            },
            msg,
        ))
    }

    /// What an honest site checks before it reveals anything: the round, no site listed twice or
    /// both ways, itself a survivor, at least `min_survivors` survivors, and every neighbour whose
    /// shares it holds classified.
    fn check_request(&self, request: &UnmaskRequest, phase: Phase) -> Result<(), SecAggError> {
        let core = &self.core;
        core.check_round(&request.round, phase)?;
        let survivors: BTreeSet<SiteIndex> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<SiteIndex> = request.dropped.iter().copied().collect();
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(core.refuse(phase, "the request lists a site twice"));
        }
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(core.refuse(
                phase,
                format!(
                    "the request lists site {both} as both survivor and dropped (it would reveal \
                     both its self mask and its pairwise masks)"
                ),
            ));
        }
        if !survivors.contains(&core.me) {
            return Err(core.refuse(
                phase,
                "the request does not list this site as a survivor, though it sent its input",
            ));
        }
        if survivors.len() < core.config.min_survivors as usize {
            return Err(core.refuse(
                phase,
                format!(
                    "{} survivors, fewer than the round's minimum of {}",
                    survivors.len(),
                    core.config.min_survivors
                ),
            ));
        }
        if let Some(owner) = self
            .held
            .keys()
            .find(|o| !survivors.contains(o) && !dropped.contains(o))
        {
            return Err(core.refuse(
                phase,
                format!(
                    "site {owner} shared keys with this site but the request lists it neither as \
                     survivor nor as dropped"
                ),
            ));
        }
        Ok(())
    }

    /// The shares a checked request asks for: never both kinds for one site.
    fn respond(self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        let core = &self.core;
        let survivors: BTreeSet<SiteIndex> = request.survivors.iter().copied().collect();
        let x = shamir::x_of(core.me);
        let mut shares = Vec::new();
        for (&owner, bundle) in &self.held {
            if survivors.contains(&owner) {
                shares.push(UnmaskShare::SelfSeed {
                    owner,
                    share: Share {
                        x,
                        ys: bundle.self_seed,
                    },
                });
            } else {
                // check_request: every held owner is a survivor or dropped.
                for (peer, ys) in &bundle.pair_seeds {
                    if survivors.contains(peer) {
                        shares.push(UnmaskShare::PairSeed {
                            owner,
                            peer: *peer,
                            share: Share { x, ys: *ys },
                        });
                    }
                }
            }
        }
        Ok(UnmaskResponse {
            round: core.tag,
            site: core.me,
            shares,
        })
    }
}

/// A site that signed the survivor list and waits for the others' signatures.
pub struct ClientConfirmedSurvivors {
    inner: ClientAwaitingUnmask,
    request: UnmaskRequest,
}

impl std::fmt::Debug for ClientConfirmedSurvivors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientConfirmedSurvivors(site {}, shares hidden)",
            self.inner.core.me
        )
    }
}

impl ClientConfirmedSurvivors {
    /// Phase 3 after the consistency check: answers only if the server relays the very request
    /// this site signed, addressed to this site, every signature relayed is valid (each checked
    /// with that site's certificate, over the key that site advertised to this one in this
    /// attempt, so an earlier attempt's signature does not verify), and at least `t` of them
    /// come from this site's own neighbours.
    ///
    /// Why neighbours and `t` (Bell et al. 2020, as their consistency check): an honest
    /// neighbour signs one list only, so two different lists can gather `t` signatures each among
    /// this site's `k` neighbours only if `2t − c ≤ k` for `c` neighbours colluding with the
    /// server; [`RoundConfig::validate`](super::RoundConfig::validate) keeps `2t > k`. Counting
    /// signatures from anyone let two disjoint halves of the sites each confirm their own list.
    pub fn unmask(self, confirmed: ConfirmedRequest) -> Result<UnmaskResponse, SecAggError> {
        let phase = Phase::Unmasking;
        let core = &self.inner.core;
        if confirmed.request != self.request {
            return Err(core.refuse(
                phase,
                "the server relays another survivor list than the one this site signed",
            ));
        }
        core.check_addressee(confirmed.to, phase)?;
        let Some(verifier) = &core.verifier else {
            return Err(core.refuse(phase, "this site cannot check signatures"));
        };
        let mut signers = BTreeSet::new();
        for (site, signature) in &confirmed.confirmations {
            if !self.request.survivors.contains(site) || !signers.insert(*site) {
                return Err(core.refuse(
                    phase,
                    format!(
                        "a confirmation from site {site}, which is not a survivor or signed twice"
                    ),
                ));
            }
            // Only a neighbour that advertised a key to this site in this attempt can sign for
            // it: the signature covers that key.
            let Some(key) = core.received.get(site) else {
                return Err(core.refuse(
                    phase,
                    format!(
                        "a confirmation from site {site}, which advertised no key to this site in \
                         this round"
                    ),
                ));
            };
            let message = survivors_message(&self.request, *site, core.me, key);
            verifier
                .verify(*site, &message, signature)
                .map_err(|reason| SecAggError::Malformed {
                    site: *site,
                    phase: Phase::ConsistencyCheck,
                    reason: format!("its survivor-list confirmation: {reason}"),
                })?;
        }
        // Every signer has a key relayed to this site: a neighbour (share_keys checked it).
        let from_neighbours = signers.len();
        if from_neighbours < core.config.threshold as usize {
            return Err(core.refuse(
                phase,
                format!(
                    "{from_neighbours} of this site's neighbours confirmed the survivor list, \
                     fewer than the threshold {}",
                    core.config.threshold
                ),
            ));
        }
        self.inner.respond(&self.request)
    }
}
