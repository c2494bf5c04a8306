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
    /// Wall-clock time each site spent in its own protocol steps.
    pub site_time: BTreeMap<SiteIndex, Duration>,
    /// Bytes each site sent (compact encoding, [`ClientMessage::wire_bytes`]).
    pub site_bytes: BTreeMap<SiteIndex, u64>,
    /// Wall-clock time the server spent receiving, relaying and unmasking.
    pub server_time: Duration,
    /// CPU time (all threads) of the same steps, when [`run_round_measured`] was given a CPU
    /// clock: with threads the wall time shrinks and the CPU time does not, and on a shared
    /// machine only the CPU time is comparable between runs.
    pub site_cpu: BTreeMap<SiteIndex, Duration>,
    pub server_cpu: Duration,
}

/// What sees the server's state after each masked input is folded, with the input (tests).
pub type Observer<'a> = &'a mut dyn FnMut(&ServerCollectingMasked, &MaskedInput);

/// A process CPU clock (`CLOCK_PROCESS_CPUTIME_ID`): the library has no libc, the benchmark does.
pub type CpuClock = fn() -> Duration;

/// The start of one party's step: wall clock and, if given, CPU clock.
#[derive(Clone, Copy)]
struct Stamp {
    wall: Instant,
    cpu: Option<Duration>,
}

fn stamp(cpu: Option<CpuClock>) -> Stamp {
    Stamp {
        cpu: cpu.map(|c| c()),
        wall: Instant::now(),
    }
}

impl Stamp {
    /// Wall and CPU time since the stamp (CPU zero without a clock).
    fn elapsed(self, cpu: Option<CpuClock>) -> (Duration, Duration) {
        let wall = self.wall.elapsed();
        let cpu = match (cpu, self.cpu) {
            (Some(c), Some(start)) => c().saturating_sub(start),
            _ => Duration::ZERO,
        };
        (wall, cpu)
    }
}

/// Runs a round: `input(site)` is called when the site masks. `observe`, if given, sees the server
/// state after each masked input is folded, with the message that was folded.
pub fn run_round(
    config: &RoundConfig,
    input: impl FnMut(SiteIndex) -> Vec<i64>,
    dropouts: &Dropouts,
    client_threads: usize,
    server_threads: usize,
    observe: Option<Observer<'_>>,
) -> Result<(AggregateOutput, RoundCosts), SecAggError> {
    run_round_measured(
        config,
        input,
        dropouts,
        client_threads,
        server_threads,
        observe,
        None,
    )
}

/// [`run_round`], also measuring each party's CPU time with `cpu` (the benchmark's).
pub fn run_round_measured(
    config: &RoundConfig,
    mut input: impl FnMut(SiteIndex) -> Vec<i64>,
    dropouts: &Dropouts,
    client_threads: usize,
    server_threads: usize,
    mut observe: Option<Observer<'_>>,
    cpu: Option<CpuClock>,
) -> Result<(AggregateOutput, RoundCosts), SecAggError> {
    let mut costs = RoundCosts::default();
    let n = config.sites;
    let timed_site = |costs: &mut RoundCosts, site: SiteIndex, t: Stamp, msg: &ClientMessage| {
        let (wall, used) = t.elapsed(cpu);
        *costs.site_time.entry(site).or_default() += wall;
        *costs.site_cpu.entry(site).or_default() += used;
        *costs.site_bytes.entry(site).or_default() += msg.wire_bytes();
    };
    let timed_server = |costs: &mut RoundCosts, t: Stamp| {
        let (wall, used) = t.elapsed(cpu);
        costs.server_time += wall;
        costs.server_cpu += used;
    };

    let t = stamp(cpu);
    let mut server = ServerCollectingKeys::new(config.clone())?.with_threads(server_threads);
    timed_server(&mut costs, t);

    let mut waiting_keys = BTreeMap::new();
    for site in 0..n {
        if dropouts.silent(Phase::AdvertiseKeys, site) {
            continue;
        }
        let t = stamp(cpu);
        let (state, msg) = ClientAdvertising::new(config.clone(), site)?
            .with_threads(client_threads)
            .advertise_keys()?;
        let msg = ClientMessage::from(msg);
        timed_site(&mut costs, site, t, &msg);
        waiting_keys.insert(site, state);
        let t = stamp(cpu);
        server.receive(msg)?;
        timed_server(&mut costs, t);
    }
    let t = stamp(cpu);
    let (mut server, relays) = server.close()?;
    timed_server(&mut costs, t);

    let mut waiting_shares = BTreeMap::new();
    for relay in relays {
        let site = relay.to;
        let Some(state) = waiting_keys.remove(&site) else {
            continue;
        };
        if dropouts.silent(Phase::ShareKeys, site) {
            continue;
        }
        let t = stamp(cpu);
        let (state, msg) = state.share_keys(relay)?;
        let msg = ClientMessage::from(msg);
        timed_site(&mut costs, site, t, &msg);
        waiting_shares.insert(site, state);
        let t = stamp(cpu);
        server.receive(msg)?;
        timed_server(&mut costs, t);
    }
    let t = stamp(cpu);
    let (mut server, relays) = server.close()?;
    timed_server(&mut costs, t);

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
        let t = stamp(cpu);
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
        let t = stamp(cpu);
        server.receive(msg)?;
        timed_server(&mut costs, t);
        if let (Some(observe), Some(m)) = (observe.as_mut(), copy) {
            observe(&server, &m);
        }
    }
    let t = stamp(cpu);
    let (mut server, request) = server.close()?;
    timed_server(&mut costs, t);

    for (site, state) in waiting_unmask {
        if dropouts.silent(Phase::Unmasking, site) {
            continue;
        }
        let t = stamp(cpu);
        let msg = ClientMessage::from(state.unmask(request.clone())?);
        timed_site(&mut costs, site, t, &msg);
        let t = stamp(cpu);
        server.receive(msg)?;
        timed_server(&mut costs, t);
    }
    let t = stamp(cpu);
    let output = server.finish()?;
    timed_server(&mut costs, t);
    Ok((output, costs))
}
