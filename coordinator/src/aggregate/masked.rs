//! Secure aggregation's round: the coordinator's side of SecAgg+ (`tutela_protocol::secagg`),
//! behind the same [`RoundAggregation`] seam as the streaming and buffered sums.
//!
//! The protocol's server states (`ServerCollectingKeys` → `…Shares` → `…Masked` → `…Unmask`)
//! live here behind one lock; the engine drives the phases through [`PhasedRound`] (close a
//! phase when every expected site answered or its deadline passed) and the gRPC handler feeds
//! the sites' messages in with [`MaskedAggregation::receive`] and hands each site what the server
//! relays to it ([`MaskedAggregation::relay_for`]).
//!
//! The masked input itself is not a protocol message on the wire: it is a tensor stream, like
//! every update (chunked, digested, within gRPC's limits whatever the model's size), of one `I64`
//! tensor [`MASKED_TENSOR`] of the round's vector length holding the `Z_2^64` values bit for bit.
//! [`RoundAggregation::open`] gives the upload a sink that buffers it and, at commit, folds it
//! into the server's running masked sum.
//!
//! What the coordinator holds of one site's update is therefore only ever its masked form: the
//! upload's buffer while it streams, and the running sum of masked inputs. The unmasked sum
//! exists only after the unmasking phase, and only as the sum of the survivors' inputs; it is
//! decoded (`encode::decode_sum`) into the round's mean delta with every survivor weighing 1
//! (sample counts are not revealed to the coordinator one by one, so FedAvg's weights are not
//! used: the mean is over sites) — or, under record-level distributed DP
//! ([`MaskedOutput::Sum`]), taken as it is: each site scaled its clipped gradient sum by the
//! job's `−lr / B` (B the expected batch across all sites), so the survivors' sum is the round's
//! central DP-SGD step, and the strategy (FedAvg: `global + delta`) applies it unchanged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tutela_protocol::secagg::{
    AggregateOutput, ClientMessage, MaskedInput, Phase, RoundConfig, SecAggError,
    ServerCollectingConfirmations, ServerCollectingKeys, ServerCollectingMasked,
    ServerCollectingShares, ServerCollectingUnmask, SiteIndex, encode,
};
use tutela_protocol::stream::{SinkError, TensorSink};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

use super::{
    AcceptedUpdate, AggregateError, FinishedRound, RoundAggregation, RoundResult, SiteSink,
};

pub use tutela_protocol::secagg::wire::MASKED_TENSOR;

/// What the server relays to one site at the end of a phase (the wire's own type).
pub use tutela_protocol::secagg::wire::ServerRelay as Relay;

/// A round with phases of its own, which the engine closes one after another.
pub trait PhasedRound: Send + Sync {
    /// The phase whose messages are being collected, `None` once the protocol is over (done or
    /// failed).
    fn phase(&self) -> Option<Phase>;
    /// How many of the sites expected in the current phase have not answered yet.
    fn pending(&self) -> usize;
    /// Ends the current phase with whoever answered: the sites that did not are dropped. An
    /// error ends the round (too few left); its reason is kept and [`RoundAggregation::finish`]
    /// reports it.
    fn close_phase(&self) -> Result<(), SecAggError>;
    /// Resolves when a site's message arrives or a phase closes.
    fn changed(&self) -> tokio::sync::futures::Notified<'_>;
    /// A message from `site` (the caller's mTLS identity) for the current phase.
    fn receive(&self, site: &str, msg: ClientMessage) -> Result<(), SecAggError>;
    /// `site`'s node certificate (DER), which came with its key advertisement: relayed to its
    /// neighbours with its keys, so they can check the keys' signatures. Given before the
    /// advertisement itself.
    fn present_certificate(&self, site: &str, der: Vec<u8>) -> Result<(), SecAggError>;
    /// What the last phase close relayed to `site`, taken once.
    fn relay_for(&self, site: &str) -> Option<Relay>;
    /// Why the round failed, if it did.
    fn failure(&self) -> Option<String>;
}

enum ServerState {
    Keys(ServerCollectingKeys),
    Shares(ServerCollectingShares),
    Masked(ServerCollectingMasked),
    Confirm(ServerCollectingConfirmations),
    Unmask(ServerCollectingUnmask),
    Done(AggregateOutput),
    /// The phase it failed in, and why.
    Failed(Phase, String),
    /// Only while a transition holds the state.
    Moving,
}

struct Inner {
    state: ServerState,
    /// Sites expected to answer in the current phase (those the last close relayed to).
    expected: Vec<SiteIndex>,
    /// Sites that answered in the current phase.
    answered: Vec<SiteIndex>,
    relays: BTreeMap<SiteIndex, Relay>,
    accepted: Vec<AcceptedUpdate>,
    /// The node certificates (DER) the sites advertised their keys with (signed rounds).
    certificates: BTreeMap<SiteIndex, Vec<u8>>,
}

/// Whether the round's sites sign their keys and run the consistency check before unmasking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    /// Sites sign their keys (each advertisement carries the site's node certificate, relayed to
    /// its neighbours) and confirm the survivor list before they unmask: the wired protocol.
    Required,
    /// Unsigned keys, no consistency check: protects against an honest-but-curious coordinator
    /// only (the library's tests of dropouts and masking).
    Unsigned,
}

/// The check a round's survivors must pass before the sites are asked to unmask (distributed
/// DP's `DistributedPlan::check_release`): given the number of masked inputs received, `Err`
/// with the reason refuses the release, and the round fails before any mask is removed.
pub type ReleaseCheck = Arc<dyn Fn(usize) -> Result<(), String> + Send + Sync>;

/// What the round's unmasked sum becomes: the `mean_delta` the strategy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskedOutput {
    /// The sum over the survivors' count: every survivor's update weighs 1 (plain secure
    /// aggregation of the sites' local rounds).
    Mean,
    /// The sum itself (record-level distributed DP: each site's update is its share of one
    /// central DP-SGD step, already divided by the job's expected batch across all sites;
    /// dividing by the survivors again would shrink the step by their count).
    Sum,
}

/// One secure aggregation round (see the module's documentation).
pub struct MaskedAggregation {
    config: RoundConfig,
    participants: Vec<String>,
    tensors: Vec<TensorSpec>,
    scale_bits: u32,
    signing: Signing,
    release_check: Option<ReleaseCheck>,
    output: MaskedOutput,
    inner: Mutex<Inner>,
    in_flight: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl std::fmt::Debug for MaskedAggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedAggregation")
            .field("round", &self.config.round)
            .field("sites", &self.participants.len())
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl MaskedAggregation {
    /// A round on the global model `global` among `participants` (index `i` of the protocol is
    /// `participants[i]`), on the grid `2^-scale_bits`, whose sites do not sign
    /// ([`Signing::Unsigned`]).
    pub fn new(
        global: &Manifest,
        participants: Vec<String>,
        config: RoundConfig,
        scale_bits: u32,
    ) -> Result<Arc<Self>, AggregateError> {
        Self::with_signing(
            global,
            participants,
            config,
            scale_bits,
            Signing::Unsigned,
            None,
        )
    }

    /// As [`Self::new`], with the sites signing as `signing` says and, before the unmasking,
    /// `release_check` on the number of survivors.
    pub fn with_signing(
        global: &Manifest,
        participants: Vec<String>,
        config: RoundConfig,
        scale_bits: u32,
        signing: Signing,
        release_check: Option<ReleaseCheck>,
    ) -> Result<Arc<Self>, AggregateError> {
        Self::with_output(
            global,
            participants,
            config,
            scale_bits,
            (signing, release_check),
            MaskedOutput::Mean,
        )
    }

    /// As [`Self::with_signing`], the unmasked sum released as `output` says.
    pub fn with_output(
        global: &Manifest,
        participants: Vec<String>,
        config: RoundConfig,
        scale_bits: u32,
        (signing, release_check): (Signing, Option<ReleaseCheck>),
        output: MaskedOutput,
    ) -> Result<Arc<Self>, AggregateError> {
        let lens = super::f32_tensor_lens(global)?;
        let len: u64 = lens.iter().map(|&n| n as u64).sum();
        let tensors = global.tensors().to_vec();
        let refuse = |what: String| Err(AggregateError::SecureAggregation(what));
        if config.vector_len != len {
            return refuse(format!(
                "the round's vector length {} is not the model's {len} parameters",
                config.vector_len
            ));
        }
        if config.sites as usize != participants.len() {
            return refuse(format!(
                "the round's configuration has {} sites, the participant list {}",
                config.sites,
                participants.len()
            ));
        }
        let server = ServerCollectingKeys::new(config.clone())
            .map_err(|e| AggregateError::SecureAggregation(e.to_string()))?;
        Ok(Arc::new(MaskedAggregation {
            inner: Mutex::new(Inner {
                state: ServerState::Keys(server),
                expected: (0..config.sites).collect(),
                answered: Vec::new(),
                relays: BTreeMap::new(),
                accepted: Vec::new(),
                certificates: BTreeMap::new(),
            }),
            config,
            participants,
            tensors,
            scale_bits,
            signing,
            release_check,
            output,
            in_flight: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
        }))
    }

    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    pub fn participants(&self) -> &[String] {
        &self.participants
    }

    /// `site`'s index in the round.
    pub fn index_of(&self, site: &str) -> Option<SiteIndex> {
        self.participants
            .iter()
            .position(|p| p == site)
            .map(|i| i as SiteIndex)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a state that is at worst `Moving`, which every
        // method treats as a failed round: the poison itself carries nothing more.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message from `site` (the mTLS identity of the caller): refused unless it speaks for the
    /// site's own index and belongs to the phase being collected.
    fn receive_message(&self, site: &str, msg: ClientMessage) -> Result<(), SecAggError> {
        let Some(index) = self.index_of(site) else {
            return Err(SecAggError::Refused {
                site: msg.site(),
                phase: msg.phase(),
                reason: format!("{site} is not a participant of this round"),
            });
        };
        if msg.site() != index {
            return Err(SecAggError::Malformed {
                site: index,
                phase: msg.phase(),
                reason: format!(
                    "it speaks for site index {} but {site} is index {index}",
                    msg.site()
                ),
            });
        }
        let mut inner = self.lock();
        if self.signing == Signing::Required
            && matches!(msg, ClientMessage::AdvertiseKeys(_))
            && !inner.certificates.contains_key(&index)
        {
            return Err(SecAggError::Malformed {
                site: index,
                phase: Phase::AdvertiseKeys,
                reason: "its keys came without its node certificate, which its neighbours need \
                         to check their signatures"
                    .into(),
            });
        }
        let result = match &mut inner.state {
            ServerState::Keys(s) => s.receive(msg),
            ServerState::Shares(s) => s.receive(msg),
            ServerState::Masked(s) => s.receive(msg),
            ServerState::Confirm(s) => s.receive(msg),
            ServerState::Unmask(s) => s.receive(msg),
            ServerState::Done(_) | ServerState::Failed(..) | ServerState::Moving => {
                Err(SecAggError::RoundFailed {
                    phase: msg.phase(),
                    reason: "the round's secure aggregation is over".into(),
                })
            }
        };
        if result.is_ok() {
            inner.answered.push(index);
            drop(inner);
            self.notify.notify_waiters();
        }
        result
    }

    /// Everything the server holds of the sites' inputs while it collects them: the running sum
    /// of masked inputs (for the tests that check nothing unmasked is kept); `None` outside that
    /// phase.
    pub fn stored_masked_sum(&self) -> Option<Vec<u64>> {
        match &self.lock().state {
            ServerState::Masked(s) => Some(s.stored_sum().to_vec()),
            ServerState::Unmask(s) => Some(s.stored_sum().to_vec()),
            _ => None,
        }
    }

    fn fold(
        &self,
        site: &str,
        masked: Vec<u64>,
        accepted: AcceptedUpdate,
    ) -> Result<(), SinkError> {
        let index = self
            .index_of(site)
            .ok_or_else(|| SinkError::Rejected(format!("{site} is not in this round")))?;
        let msg = ClientMessage::MaskedInput(MaskedInput {
            round: self.config.tag(),
            site: index,
            masked,
        });
        self.receive_message(site, msg)
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        self.lock().accepted.push(accepted);
        Ok(())
    }
}

impl PhasedRound for MaskedAggregation {
    fn phase(&self) -> Option<Phase> {
        match &self.lock().state {
            ServerState::Keys(_) => Some(Phase::AdvertiseKeys),
            ServerState::Shares(_) => Some(Phase::ShareKeys),
            ServerState::Masked(_) => Some(Phase::MaskedInput),
            ServerState::Confirm(_) => Some(Phase::ConsistencyCheck),
            ServerState::Unmask(_) => Some(Phase::Unmasking),
            _ => None,
        }
    }

    fn pending(&self) -> usize {
        let inner = self.lock();
        inner
            .expected
            .iter()
            .filter(|s| !inner.answered.contains(s))
            .count()
    }

    fn close_phase(&self) -> Result<(), SecAggError> {
        let mut inner = self.lock();
        let state = std::mem::replace(&mut inner.state, ServerState::Moving);
        let phase = self.phase_of(&state).unwrap_or(Phase::Unmasking);
        let mut relays = BTreeMap::new();
        let signed = self.signing == Signing::Required;
        let refused = match (&state, &self.release_check) {
            (ServerState::Masked(s), Some(check)) => check(s.received().len()).err(),
            _ => None,
        };
        let next = match state {
            ServerState::Keys(s) => s.close().map(|(next, out)| {
                for r in out {
                    let relay = if signed {
                        let certificates = r
                            .keys
                            .iter()
                            .filter_map(|k| {
                                inner.certificates.get(&k.peer).map(|c| (k.peer, c.clone()))
                            })
                            .collect();
                        Relay::SignedKeys {
                            keys: r,
                            certificates,
                        }
                    } else {
                        Relay::Keys(r)
                    };
                    relays.insert(relay_to(&relay), relay);
                }
                ServerState::Shares(next)
            }),
            ServerState::Shares(s) => s.close().map(|(next, out)| {
                for r in out {
                    relays.insert(r.to, Relay::Shares(r));
                }
                ServerState::Masked(next)
            }),
            // Nothing is unmasked: the sites are never sent a survivor list.
            ServerState::Masked(_) if refused.is_some() => Err(SecAggError::RoundFailed {
                phase: Phase::MaskedInput,
                reason: refused.unwrap_or_default(),
            }),
            ServerState::Masked(s) if signed => {
                s.close_with_consistency_check().map(|(next, request)| {
                    for &site in &request.survivors {
                        relays.insert(site, Relay::Unmask(request.clone()));
                    }
                    ServerState::Confirm(next)
                })
            }
            ServerState::Masked(s) => s.close().map(|(next, request)| {
                for &site in &request.survivors {
                    relays.insert(site, Relay::Unmask(request.clone()));
                }
                ServerState::Unmask(next)
            }),
            ServerState::Confirm(s) => s.close().map(|(next, confirmed)| {
                for c in confirmed {
                    relays.insert(c.to, Relay::Confirmed(c));
                }
                ServerState::Unmask(next)
            }),
            ServerState::Unmask(s) => s.finish().map(ServerState::Done),
            ServerState::Done(out) => Ok(ServerState::Done(out)),
            ServerState::Failed(phase, reason) => Err(SecAggError::RoundFailed { phase, reason }),
            ServerState::Moving => Err(SecAggError::RoundFailed {
                phase,
                reason: "the round's state was lost in a failed transition".into(),
            }),
        };
        let result = match next {
            Ok(state) => {
                inner.state = state;
                inner.expected = relays.keys().copied().collect();
                inner.answered.clear();
                inner.relays = relays;
                Ok(())
            }
            Err(e) => {
                inner.state = ServerState::Failed(phase, e.to_string());
                inner.expected.clear();
                inner.relays.clear();
                Err(e)
            }
        };
        drop(inner);
        self.notify.notify_waiters();
        result
    }

    fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    fn receive(&self, site: &str, msg: ClientMessage) -> Result<(), SecAggError> {
        self.receive_message(site, msg)
    }

    fn present_certificate(&self, site: &str, der: Vec<u8>) -> Result<(), SecAggError> {
        let Some(index) = self.index_of(site) else {
            return Err(SecAggError::Refused {
                site: u32::MAX,
                phase: Phase::AdvertiseKeys,
                reason: format!("{site} is not a participant of this round"),
            });
        };
        let mut inner = self.lock();
        if !matches!(inner.state, ServerState::Keys(_)) {
            return Err(SecAggError::Refused {
                site: index,
                phase: Phase::AdvertiseKeys,
                reason: "a certificate outside the key advertisement phase".into(),
            });
        }
        inner.certificates.insert(index, der);
        Ok(())
    }

    fn relay_for(&self, site: &str) -> Option<Relay> {
        let index = self.index_of(site)?;
        self.lock().relays.remove(&index)
    }

    fn failure(&self) -> Option<String> {
        match &self.lock().state {
            ServerState::Failed(_, reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

impl RoundAggregation for MaskedAggregation {
    fn name(&self) -> &'static str {
        "secagg"
    }

    fn open(self: Arc<Self>, site: String, _weight: f64) -> SiteSink {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        SiteSink::new(MaskedSink {
            round: self,
            site,
            bytes: Vec::new(),
            written: 0,
        })
    }

    fn accepted(&self) -> Vec<AcceptedUpdate> {
        self.lock().accepted.clone()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn masked(&self) -> Option<&dyn PhasedRound> {
        Some(self)
    }

    fn finish(self: Arc<Self>) -> Result<FinishedRound, AggregateError> {
        let in_flight = self.in_flight();
        if in_flight > 0 {
            return Err(AggregateError::InFlight(in_flight));
        }
        let inner = self.lock();
        let output = match &inner.state {
            ServerState::Done(out) => out,
            ServerState::Failed(_, reason) => {
                return Err(AggregateError::SecureAggregation(reason.clone()));
            }
            _ => {
                return Err(AggregateError::SecureAggregation(format!(
                    "the round ended in phase {:?}, before the unmasking",
                    self.phase_of(&inner.state)
                )));
            }
        };
        if output.survivors.is_empty() {
            return Err(AggregateError::NothingAccepted);
        }
        let survivors = output.survivors.len() as f64;
        let sum = encode::decode_sum(&output.sum, self.scale_bits);
        let divisor = match self.output {
            MaskedOutput::Mean => survivors,
            MaskedOutput::Sum => 1.0,
        };
        let mut mean_delta = Vec::with_capacity(self.tensors.len());
        let mut at = 0usize;
        for t in &self.tensors {
            let n = t.numel().unwrap_or(0) as usize;
            mean_delta.push(sum[at..at + n].iter().map(|v| v / divisor).collect());
            at += n;
        }
        let survivor_names: Vec<&str> = output
            .survivors
            .iter()
            .filter_map(|&i| self.participants.get(i as usize).map(String::as_str))
            .collect();
        let mut accepted: Vec<AcceptedUpdate> = inner
            .accepted
            .iter()
            .filter(|a| survivor_names.contains(&a.site.as_str()))
            .cloned()
            .collect();
        accepted.sort_by(|a, b| (&a.site, &a.digest).cmp(&(&b.site, &b.digest)));
        Ok(FinishedRound {
            result: RoundResult {
                tensors: self.tensors.clone(),
                mean_delta,
                accepted,
                total_weight: survivors,
            },
            robust: None,
        })
    }
}

impl MaskedAggregation {
    fn phase_of(&self, state: &ServerState) -> Option<Phase> {
        match state {
            ServerState::Keys(_) => Some(Phase::AdvertiseKeys),
            ServerState::Shares(_) => Some(Phase::ShareKeys),
            ServerState::Masked(_) => Some(Phase::MaskedInput),
            ServerState::Confirm(_) => Some(Phase::ConsistencyCheck),
            ServerState::Unmask(_) => Some(Phase::Unmasking),
            _ => None,
        }
    }
}

/// The site a keys relay is addressed to.
fn relay_to(relay: &Relay) -> SiteIndex {
    match relay {
        Relay::Keys(r) | Relay::SignedKeys { keys: r, .. } => r.to,
        Relay::Shares(r) => r.to,
        Relay::Confirmed(c) => c.to,
        Relay::Unmask(_) | Relay::Done => SiteIndex::MAX,
    }
}

/// One site's masked input as it streams in: buffered (it can be folded only whole, and it is
/// masked: the buffer is no more than the sum reveals), folded at commit.
struct MaskedSink {
    round: Arc<MaskedAggregation>,
    site: String,
    bytes: Vec<u8>,
    /// How many bytes arrived, in order: the sink folds only a whole masked input. (The stream
    /// layer checks order and completeness too; the sink does not rely on its caller for it: a
    /// gap would fold zeros in place of masked values.)
    written: usize,
}

impl Drop for MaskedSink {
    fn drop(&mut self) {
        self.round.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TensorSink for MaskedSink {
    type Output = AcceptedUpdate;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        let len = self.round.config.vector_len;
        let expected = TensorSpec::new(MASKED_TENSOR, DType::I64, vec![len]);
        if manifest.tensors() != [expected] {
            return Err(SinkError::Rejected(format!(
                "a secure aggregation round takes one tensor {MASKED_TENSOR:?} of I64 and shape \
                 [{len}] (the masked input), not {} tensor(s) starting with {:?}",
                manifest.tensors().len(),
                manifest.tensors().first().map(|t| t.name.as_str())
            )));
        }
        let bytes = usize::try_from(len.saturating_mul(8))
            .map_err(|_| SinkError::Rejected("the masked input is too large".into()))?;
        self.bytes = vec![0; bytes];
        Ok(())
    }

    fn write(&mut self, tensor_index: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        if tensor_index != 0 || end > self.bytes.len() {
            return Err(SinkError::Rejected(format!(
                "masked input chunk at tensor {tensor_index}, bytes {start}..{end} is outside the \
                 tensor's {} bytes",
                self.bytes.len()
            )));
        }
        if start != self.written {
            return Err(SinkError::Rejected(format!(
                "masked input chunk at byte {start} arrived where byte {} was expected (chunks \
                 reordered, lost or duplicated)",
                self.written
            )));
        }
        self.bytes[start..end].copy_from_slice(data);
        self.written = end;
        Ok(())
    }

    fn commit(mut self, digest: &[u8; 32]) -> Result<AcceptedUpdate, SinkError> {
        if self.written != self.bytes.len() || self.bytes.is_empty() {
            return Err(SinkError::Rejected(format!(
                "the masked input ended after {} of its {} bytes: nothing is folded",
                self.written,
                self.bytes.len()
            )));
        }
        let masked: Vec<u64> = std::mem::take(&mut self.bytes)
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let accepted = AcceptedUpdate {
            site: self.site.clone(),
            weight: 1.0,
            digest: hex::encode(digest),
            // The coordinator never sees the update, so not its norm either (the site clipped
            // it to the job's bound before encoding).
            l2_norm: 0.0,
            clip_factor: 1.0,
        };
        self.round.fold(&self.site, masked, accepted.clone())?;
        Ok(accepted)
    }
}

/// The secure aggregation rounds in progress, by task id: the `SecAgg` handler finds a node's
/// round here (the task table closes a round's tasks when its uploads are in, before the
/// unmasking phase that still needs the nodes).
#[derive(Default)]
pub struct SecAggRoutes {
    routes: Mutex<BTreeMap<String, Route>>,
}

/// A task's site and its round.
type Route = (String, Arc<dyn RoundAggregation>);

impl SecAggRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `task_id` of `site` speaks to `round`.
    pub fn insert(&self, task_id: &str, site: &str, round: Arc<dyn RoundAggregation>) {
        self.lock()
            .insert(task_id.to_string(), (site.to_string(), round));
    }

    /// The round of `task_id`, if `site` holds it; `Err` names what is wrong.
    pub fn get(&self, task_id: &str, site: &str) -> Result<Arc<dyn RoundAggregation>, String> {
        match self.lock().get(task_id) {
            Some((s, round)) if s == site => Ok(round.clone()),
            Some(_) => Err(format!("task {task_id} belongs to another site")),
            None => Err(format!(
                "task {task_id} is not a secure aggregation round in progress"
            )),
        }
    }

    pub fn remove(&self, task_ids: &[String]) {
        let mut routes = self.lock();
        for t in task_ids {
            routes.remove(t);
        }
    }
}
