//! A whole round in one process: every site's state machine and the server's, with chosen sites
//! going silent at chosen phases. For the tests and the benchmark (`examples/bench_secagg.rs`);
//! the coordinator and the site node drive the same states over gRPC.
//!
//! A site's own refusal (e.g. too few live neighbours) ends the simulated round with that error,
//! so that tests see it; the real coordinator treats such a site as dropped. The sites do not
//! sign here (no identity keys), so there is no consistency check.
//!
//! Sites are handled one after another within a phase, and a site's input is asked for only when
//! it masks it and dropped right after the server folded it, so memory holds the server's sum and
//! one input at a time, whatever the number of sites.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{
    AggregateOutput, ClientAdvertising, ClientMessage, MaskedInput, Phase, RoundConfig,
    SecAggError, ServerCollectingKeys, ServerCollectingMasked, SiteIndex,
};

/// Which sites stop answering from which phase on (a site dropped at `ShareKeys` advertised its
/// keys and then went silent).
#[derive(Clone, Debug, Default)]
pub struct Dropouts {
    pub at: BTreeMap<Phase, BTreeSet<SiteIndex>>,
}

impl Dropouts {
    pub fn none() -> Self {
        Self::default()
    }

    /// `sites` drop at `phase`.
    pub fn at(phase: Phase, sites: impl IntoIterator<Item = SiteIndex>) -> Self {
        let mut d = Self::default();
        d.at.insert(phase, sites.into_iter().collect());
        d
    }

    fn silent(&self, phase: Phase, site: SiteIndex) -> bool {
        self.at
            .iter()
            .any(|(p, sites)| *p <= phase && sites.contains(&site))
    }
}

/// Costs of one simulated round, per party.
#[derive(Clone, Debug, Default)]
pub struct RoundCosts {
    /// Time each site spent in its own protocol steps (single-threaded masking: CPU time).
    pub site_time: BTreeMap<SiteIndex, Duration>,
    /// Bytes each site sent (compact encoding, [`ClientMessage::wire_bytes`]).
    pub site_bytes: BTreeMap<SiteIndex, u64>,
    /// Time the server spent receiving, relaying and unmasking.
    pub server_time: Duration,
}

/// Runs a round: `input(site)` is called when the site masks. `observe`, if given, sees the server
/// state after each masked input is folded, with the message that was folded.
pub fn run_round(
    config: &RoundConfig,
    mut input: impl FnMut(SiteIndex) -> Vec<i64>,
    dropouts: &Dropouts,
    client_threads: usize,
    server_threads: usize,
    mut observe: Option<&mut dyn FnMut(&ServerCollectingMasked, &MaskedInput)>,
) -> Result<(AggregateOutput, RoundCosts), SecAggError> {
    let mut costs = RoundCosts::default();
    let n = config.sites;
    let timed_site = |costs: &mut RoundCosts, site: SiteIndex, t: Instant, msg: &ClientMessage| {
        *costs.site_time.entry(site).or_default() += t.elapsed();
        *costs.site_bytes.entry(site).or_default() += msg.wire_bytes();
    };

    let t = Instant::now();
    let mut server = ServerCollectingKeys::new(config.clone())?.with_threads(server_threads);
    costs.server_time += t.elapsed();

    let mut waiting_keys = BTreeMap::new();
    for site in 0..n {
        if dropouts.silent(Phase::AdvertiseKeys, site) {
            continue;
        }
        let t = Instant::now();
        let (state, msg) = ClientAdvertising::new(config.clone(), site)?
            .with_threads(client_threads)
            .advertise_keys()?;
        let msg = ClientMessage::from(msg);
        timed_site(&mut costs, site, t, &msg);
        waiting_keys.insert(site, state);
        let t = Instant::now();
        server.receive(msg)?;
        costs.server_time += t.elapsed();
    }
    let t = Instant::now();
    let (mut server, relays) = server.close()?;
    costs.server_time += t.elapsed();

    let mut waiting_shares = BTreeMap::new();
    for relay in relays {
        let site = relay.to;
        let Some(state) = waiting_keys.remove(&site) else {
            continue;
        };
        if dropouts.silent(Phase::ShareKeys, site) {
            continue;
        }
        let t = Instant::now();
        let (state, msg) = state.share_keys(relay)?;
        let msg = ClientMessage::from(msg);
        timed_site(&mut costs, site, t, &msg);
        waiting_shares.insert(site, state);
        let t = Instant::now();
        server.receive(msg)?;
        costs.server_time += t.elapsed();
    }
    let t = Instant::now();
    let (mut server, relays) = server.close()?;
    costs.server_time += t.elapsed();

    let mut waiting_unmask = BTreeMap::new();
    for relay in relays {
        let site = relay.to;
        let Some(state) = waiting_shares.remove(&site) else {
            continue;
        };
        if dropouts.silent(Phase::MaskedInput, site) {
            continue;
        }
        let x = input(site);
        let t = Instant::now();
        let (state, msg) = state.masked_input(relay, &x)?;
        drop(x);
        let msg = ClientMessage::from(msg);
        timed_site(&mut costs, site, t, &msg);
        waiting_unmask.insert(site, state);
        // A copy for the observer only (tests): not part of the server's work.
        let copy = match (&msg, observe.is_some()) {
            (ClientMessage::MaskedInput(m), true) => Some(m.clone()),
            _ => None,
        };
        let t = Instant::now();
        server.receive(msg)?;
        costs.server_time += t.elapsed();
        if let (Some(observe), Some(m)) = (observe.as_mut(), copy) {
            observe(&server, &m);
        }
    }
    let t = Instant::now();
    let (mut server, request) = server.close()?;
    costs.server_time += t.elapsed();

    for (site, state) in waiting_unmask {
        if dropouts.silent(Phase::Unmasking, site) {
            continue;
        }
        let t = Instant::now();
        let msg = ClientMessage::from(state.unmask(request.clone())?);
        timed_site(&mut costs, site, t, &msg);
        let t = Instant::now();
        server.receive(msg)?;
        costs.server_time += t.elapsed();
    }
    let t = Instant::now();
    let output = server.finish()?;
    costs.server_time += t.elapsed();
    Ok((output, costs))
}
