//! Aggregation strategies: one trait through which every server-side rule plugs in.
//!
//! Modelled on Flower's `Strategy`: a strategy *configures a round* (what the sites are told:
//! Flower's `configure_fit` config, our task's `strategy_config_json`) and *turns the round's
//! results into the next global model* (Flower's `aggregate_fit`). Combining the updates is not
//! the strategy's job: the round's [`RoundAggregation`](crate::aggregate::RoundAggregation)
//! (FedAvg's weighted sum as the updates stream in, or a robust rule over the buffered updates)
//! computes the round's mean delta, and every strategy here starts from that [`RoundResult`], so
//! a robust rule composes with FedAdam as well as with FedAvg.
//!
//! - [`FedAvg`]: x ← x + Δ, Δ the sample-weighted mean of the sites' deltas (McMahan et al. 2017).
//! - [`FedProx`]: the same server rule; its round configuration tells the sites the proximal
//!   term's `mu` (Li et al. 2020).
//! - [`FedOpt`] with [`AdaptiveRule::Adam`] or [`AdaptiveRule::Yogi`]: FedAdam and FedYogi, the
//!   server-side adaptive optimisers of Reddi et al. 2021, "Adaptive Federated Optimization",
//!   Algorithm 2, with Δ as the pseudo-gradient. As in the paper, `v` starts at τ² (Flower starts
//!   it at 0) and there is no bias correction.
//!
//! [`StrategyConfig`] is the job spec's `strategy` entry, either a bare name or a table:
//!
//! ```toml
//! strategy = "fedavg"            # or "fedprox", "fedadam", "fedyogi" with default parameters
//!
//! [strategy]                     # or a table with the parameters to change
//! name = "fedyogi"
//! server_learning_rate = 0.01    # η
//! beta_1 = 0.9
//! beta_2 = 0.99
//! tau = 0.001                    # τ, the adaptivity
//!
//! [strategy]
//! name = "fedprox"
//! proximal_mu = 0.01
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use tutela_protocol::tensor::{DType, TensorSpec};

use crate::aggregate::RoundResult;

/// Why a strategy could not be configured or applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyError {
    #[error("strategy configuration: {0}")]
    InvalidConfig(String),
    #[error("the round's result does not fit the global model: {0}")]
    ModelMismatch(String),
    #[error("the saved strategy state is unusable: {0}")]
    InvalidState(String),
}

/// A server-side aggregation rule. See the [module](self) docs.
pub trait Strategy: Send {
    /// The strategy's name in job specs (`"fedavg"`, ...).
    fn name(&self) -> &'static str;

    /// What the sites are told for `round`: a JSON object for the task's
    /// `strategy_config_json`. It always has `"strategy"` (the name); FedProx adds
    /// `"proximal_mu"`.
    fn configure_round(&self, round: u32) -> String;

    /// Turns the round's result into the next global model, in place. `global[i]` holds the
    /// values of `result.tensors[i]`.
    fn apply(&mut self, global: &mut [Vec<f32>], result: &RoundResult)
    -> Result<(), StrategyError>;

    /// Server state to persist between rounds, as named F32 tensors (empty for a stateless
    /// strategy). Loading it into a fresh strategy with [`Strategy::load_state`] gives the same
    /// next steps as not having stopped.
    fn state(&self) -> Vec<(TensorSpec, Vec<u8>)> {
        Vec::new()
    }

    /// Restores what [`Strategy::state`] exported. An empty list resets to the initial state.
    fn load_state(&mut self, state: Vec<(TensorSpec, Vec<u8>)>) -> Result<(), StrategyError> {
        match state.first() {
            None => Ok(()),
            Some((t, _)) => Err(StrategyError::InvalidState(format!(
                "{} keeps no state, but the saved state has tensor {:?}",
                self.name(),
                t.name
            ))),
        }
    }
}

/// Checks that the global model and the round's mean delta have the same tensors.
fn check_model(global: &[Vec<f32>], result: &RoundResult) -> Result<(), StrategyError> {
    if global.len() != result.mean_delta.len() || result.tensors.len() != result.mean_delta.len() {
        return Err(StrategyError::ModelMismatch(format!(
            "the global model has {} tensors, the round's mean delta {}",
            global.len(),
            result.mean_delta.len()
        )));
    }
    for ((x, d), t) in global.iter().zip(&result.mean_delta).zip(&result.tensors) {
        if x.len() != d.len() {
            return Err(StrategyError::ModelMismatch(format!(
                "tensor {:?} has {} values in the global model but {} in the round's mean delta",
                t.name,
                x.len(),
                d.len()
            )));
        }
    }
    Ok(())
}

fn add_mean_delta(global: &mut [Vec<f32>], result: &RoundResult) -> Result<(), StrategyError> {
    check_model(global, result)?;
    for (x, d) in global.iter_mut().zip(&result.mean_delta) {
        for (x, d) in x.iter_mut().zip(d) {
            *x = (f64::from(*x) + d) as f32;
        }
    }
    Ok(())
}

/// Federated averaging: the new model is the sample-weighted mean of the sites' models.
#[derive(Clone, Copy, Debug, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn configure_round(&self, _round: u32) -> String {
        serde_json::json!({ "strategy": self.name() }).to_string()
    }

    fn apply(
        &mut self,
        global: &mut [Vec<f32>],
        result: &RoundResult,
    ) -> Result<(), StrategyError> {
        add_mean_delta(global, result)
    }
}

/// FedProx: FedAvg on the server; sites add `mu/2 · ‖w − w_global‖²` to their loss.
#[derive(Clone, Copy, Debug)]
pub struct FedProx {
    pub proximal_mu: f64,
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn configure_round(&self, _round: u32) -> String {
        serde_json::json!({ "strategy": self.name(), "proximal_mu": self.proximal_mu }).to_string()
    }

    fn apply(
        &mut self,
        global: &mut [Vec<f32>],
        result: &RoundResult,
    ) -> Result<(), StrategyError> {
        add_mean_delta(global, result)
    }
}

/// The second-moment update that distinguishes FedAdam from FedYogi.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdaptiveRule {
    /// v ← β₂·v + (1−β₂)·Δ²
    Adam,
    /// v ← v − (1−β₂)·Δ²·sign(v − Δ²): v moves towards Δ² by a step that does not scale with v,
    /// so it adapts more slowly when gradients grow rare (Zaheer et al. 2018).
    Yogi,
}

/// A server-side adaptive optimiser (Reddi et al. 2021, Algorithm 2), with the round's mean delta
/// as the pseudo-gradient.
#[derive(Clone, Debug)]
pub struct FedOpt {
    rule: AdaptiveRule,
    params: AdaptiveParams,
    /// First and second moments per tensor, by tensor name. Empty until the first round.
    moments: BTreeMap<String, Moments>,
}

#[derive(Clone, Debug, PartialEq)]
struct Moments {
    shape: Vec<u64>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedOpt {
    pub fn new(rule: AdaptiveRule, params: AdaptiveParams) -> Self {
        FedOpt {
            rule,
            params,
            moments: BTreeMap::new(),
        }
    }

    pub fn adam(params: AdaptiveParams) -> Self {
        Self::new(AdaptiveRule::Adam, params)
    }

    pub fn yogi(params: AdaptiveParams) -> Self {
        Self::new(AdaptiveRule::Yogi, params)
    }

    pub fn params(&self) -> &AdaptiveParams {
        &self.params
    }

    /// Makes sure there are moments for exactly the result's tensors: zeros and τ² the first
    /// time, the loaded or previous ones (checked) afterwards.
    fn prepare(&mut self, result: &RoundResult) -> Result<(), StrategyError> {
        if self.moments.is_empty() {
            let v0 = (self.params.tau * self.params.tau) as f32;
            for (t, d) in result.tensors.iter().zip(&result.mean_delta) {
                self.moments.insert(
                    t.name.clone(),
                    Moments {
                        shape: t.shape.clone(),
                        m: vec![0.0; d.len()],
                        v: vec![v0; d.len()],
                    },
                );
            }
            return Ok(());
        }
        for (t, d) in result.tensors.iter().zip(&result.mean_delta) {
            let mo = self.moments.get(&t.name).ok_or_else(|| {
                StrategyError::ModelMismatch(format!(
                    "the optimiser has no moments for tensor {:?} (was the model changed between rounds?)",
                    t.name
                ))
            })?;
            if mo.shape != t.shape || mo.m.len() != d.len() {
                return Err(StrategyError::ModelMismatch(format!(
                    "the optimiser's moments of tensor {:?} have shape {:?}, the model's tensor {:?}",
                    t.name, mo.shape, t.shape
                )));
            }
        }
        if self.moments.len() != result.tensors.len() {
            let extra = self
                .moments
                .keys()
                .find(|k| !result.tensors.iter().any(|t| &t.name == *k));
            return Err(StrategyError::ModelMismatch(format!(
                "the optimiser has moments for tensor {extra:?}, which the model does not have"
            )));
        }
        Ok(())
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.rule {
            AdaptiveRule::Adam => "fedadam",
            AdaptiveRule::Yogi => "fedyogi",
        }
    }

    fn configure_round(&self, _round: u32) -> String {
        serde_json::json!({ "strategy": self.name() }).to_string()
    }

    fn apply(
        &mut self,
        global: &mut [Vec<f32>],
        result: &RoundResult,
    ) -> Result<(), StrategyError> {
        check_model(global, result)?;
        self.prepare(result)?;
        let AdaptiveParams {
            server_learning_rate: eta,
            beta_1: b1,
            beta_2: b2,
            tau,
        } = self.params;
        for ((x, delta), t) in global
            .iter_mut()
            .zip(&result.mean_delta)
            .zip(&result.tensors)
        {
            let Some(mo) = self.moments.get_mut(&t.name) else {
                continue; // prepare() made one for every tensor
            };
            // Per element in f64; the moments are stored as f32, which is what is persisted, so
            // a resumed run continues from exactly the state an uninterrupted one has.
            for (((x, &d), m), v) in x.iter_mut().zip(delta).zip(&mut mo.m).zip(&mut mo.v) {
                let d2 = d * d;
                let m_new = b1 * f64::from(*m) + (1.0 - b1) * d;
                let v_old = f64::from(*v);
                let v_new = match self.rule {
                    AdaptiveRule::Adam => b2 * v_old + (1.0 - b2) * d2,
                    AdaptiveRule::Yogi => v_old - (1.0 - b2) * d2 * sign(v_old - d2),
                };
                *m = m_new as f32;
                *v = v_new as f32;
                *x = (f64::from(*x) + eta * m_new / (v_new.sqrt() + tau)) as f32;
            }
        }
        Ok(())
    }

    fn state(&self) -> Vec<(TensorSpec, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (name, mo) in &self.moments {
            for (prefix, values) in [("m.", &mo.m), ("v.", &mo.v)] {
                out.push((
                    TensorSpec::new(format!("{prefix}{name}"), DType::F32, mo.shape.clone()),
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ));
            }
        }
        out
    }

    fn load_state(&mut self, state: Vec<(TensorSpec, Vec<u8>)>) -> Result<(), StrategyError> {
        let bad = |why: String| StrategyError::InvalidState(why);
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (spec, bytes) in state {
            if spec.dtype != DType::F32 {
                return Err(bad(format!(
                    "tensor {:?} is {}, not F32",
                    spec.name, spec.dtype
                )));
            }
            let (which, name) = if let Some(n) = spec.name.strip_prefix("m.") {
                (&mut m, n)
            } else if let Some(n) = spec.name.strip_prefix("v.") {
                (&mut v, n)
            } else {
                return Err(bad(format!(
                    "tensor {:?} is neither a first (m.) nor a second (v.) moment",
                    spec.name
                )));
            };
            let expected = spec.numel().and_then(|n| n.checked_mul(4));
            if expected != Some(bytes.len() as u64) {
                return Err(bad(format!(
                    "tensor {:?} of shape {:?} has {} bytes of data",
                    spec.name,
                    spec.shape,
                    bytes.len()
                )));
            }
            let (raw, _) = bytes.as_chunks::<4>();
            let values: Vec<f32> = raw.iter().map(|b| f32::from_le_bytes(*b)).collect();
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!(
                    "tensor {:?} element {i} is not finite",
                    spec.name
                )));
            }
            which.insert(name.to_string(), (spec.shape, values));
        }
        let mut moments = BTreeMap::new();
        for (name, (shape, m_values)) in m {
            let (v_shape, v_values) = v
                .remove(&name)
                .ok_or_else(|| bad(format!("tensor {name:?} has a first moment but no second")))?;
            if v_shape != shape {
                return Err(bad(format!(
                    "tensor {name:?}: the first moment has shape {shape:?}, the second {v_shape:?}"
                )));
            }
            if let Some(i) = v_values.iter().position(|x| *x < 0.0) {
                return Err(bad(format!(
                    "tensor {name:?}: the second moment is negative at element {i}"
                )));
            }
            moments.insert(
                name,
                Moments {
                    shape,
                    m: m_values,
                    v: v_values,
                },
            );
        }
        if let Some(name) = v.keys().next() {
            return Err(bad(format!(
                "tensor {name:?} has a second moment but no first"
            )));
        }
        self.moments = moments;
        Ok(())
    }
}

/// sign(x) with sign(0) = 0, as Yogi's update needs (f64::signum gives ±1 at ±0).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// FedProx's parameter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedProxParams {
    /// μ of the proximal term `μ/2 · ‖w − w_global‖²` the sites add to their loss.
    #[serde(default = "default_proximal_mu")]
    pub proximal_mu: f64,
}

impl Default for FedProxParams {
    fn default() -> Self {
        FedProxParams {
            proximal_mu: default_proximal_mu(),
        }
    }
}

/// The middle of the range Li et al. tune μ over ({0.001, 0.01, 0.1, 1}); it depends on the data.
fn default_proximal_mu() -> f64 {
    0.01
}

/// FedAdam's and FedYogi's parameters; the defaults are Reddi et al.'s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveParams {
    /// η, the server learning rate.
    #[serde(default = "default_eta")]
    pub server_learning_rate: f64,
    /// β₁, decay of the first moment.
    #[serde(default = "default_beta_1")]
    pub beta_1: f64,
    /// β₂, decay of the second moment.
    #[serde(default = "default_beta_2")]
    pub beta_2: f64,
    /// τ, the degree of adaptivity (larger: closer to momentum SGD).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            server_learning_rate: default_eta(),
            beta_1: default_beta_1(),
            beta_2: default_beta_2(),
            tau: default_tau(),
        }
    }
}

fn default_eta() -> f64 {
    1e-2
}
fn default_beta_1() -> f64 {
    0.9
}
fn default_beta_2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

/// The job spec's `strategy`: a bare name or a table (see the [module](self) docs). Parsing
/// validates the parameters, so [`StrategyConfig::build`] cannot fail.
#[derive(Clone, Debug, PartialEq, Serialize, Default)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum StrategyConfig {
    #[default]
    FedAvg,
    FedProx(FedProxParams),
    FedAdam(AdaptiveParams),
    FedYogi(AdaptiveParams),
}

/// The names a job spec may use.
pub const STRATEGY_NAMES: [&str; 4] = ["fedavg", "fedprox", "fedadam", "fedyogi"];

impl StrategyConfig {
    /// From the job spec's `strategy` value; FedAvg when there is none.
    pub fn from_spec(value: Option<&toml::Value>) -> Result<Self, StrategyError> {
        match value {
            None => Ok(StrategyConfig::FedAvg),
            Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
                StrategyError::InvalidConfig(e.message().to_string())
            }),
        }
    }

    /// The strategy with default parameters, by name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "fedavg" => StrategyConfig::FedAvg,
            "fedprox" => StrategyConfig::FedProx(FedProxParams::default()),
            "fedadam" => StrategyConfig::FedAdam(AdaptiveParams::default()),
            "fedyogi" => StrategyConfig::FedYogi(AdaptiveParams::default()),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg => "fedavg",
            StrategyConfig::FedProx(_) => "fedprox",
            StrategyConfig::FedAdam(_) => "fedadam",
            StrategyConfig::FedYogi(_) => "fedyogi",
        }
    }

    /// Checks every parameter's range; the reason names the parameter and the value.
    pub fn validate(&self) -> Result<(), StrategyError> {
        let name = self.name();
        let fail = |param: &str, value: f64, want: &str| {
            Err(StrategyError::InvalidConfig(format!(
                "{name}: {param} = {value} must be {want}"
            )))
        };
        match self {
            StrategyConfig::FedAvg => Ok(()),
            StrategyConfig::FedProx(p) => {
                if !(p.proximal_mu.is_finite() && p.proximal_mu >= 0.0) {
                    return fail("proximal_mu", p.proximal_mu, "a finite number ≥ 0");
                }
                Ok(())
            }
            StrategyConfig::FedAdam(p) | StrategyConfig::FedYogi(p) => {
                let eta = p.server_learning_rate;
                if !(eta.is_finite() && eta > 0.0) {
                    return fail("server_learning_rate", eta, "a finite number > 0");
                }
                for (param, beta) in [("beta_1", p.beta_1), ("beta_2", p.beta_2)] {
                    if !(0.0..1.0).contains(&beta) {
                        return fail(param, beta, "in [0, 1)");
                    }
                }
                if !(p.tau.is_finite() && p.tau > 0.0) {
                    return fail("tau", p.tau, "a finite number > 0");
                }
                Ok(())
            }
        }
    }

    pub fn build(&self) -> Box<dyn Strategy> {
        match *self {
            StrategyConfig::FedAvg => Box::new(FedAvg),
            StrategyConfig::FedProx(p) => Box::new(FedProx {
                proximal_mu: p.proximal_mu,
            }),
            StrategyConfig::FedAdam(p) => Box::new(FedOpt::adam(p)),
            StrategyConfig::FedYogi(p) => Box::new(FedOpt::yogi(p)),
        }
    }
}

/// The table form, as serde reads it; `StrategyConfig`'s own `Deserialize` also takes a bare name.
#[derive(Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
#[allow(clippy::enum_variant_names)] // the variants are the strategies' names
enum StrategyTable {
    FedAvg {},
    FedProx(FedProxParams),
    FedAdam(AdaptiveParams),
    FedYogi(AdaptiveParams),
}

impl<'de> Deserialize<'de> for StrategyConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};

        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrategyConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a strategy name (\"fedavg\", \"fedprox\", \"fedadam\", \"fedyogi\") or a table with `name` and the strategy's parameters",
                )
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<StrategyConfig, E> {
                StrategyConfig::from_name(name)
                    .ok_or_else(|| E::unknown_variant(name, &STRATEGY_NAMES))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StrategyConfig, A::Error> {
                let table = StrategyTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(match table {
                    StrategyTable::FedAvg {} => StrategyConfig::FedAvg,
                    StrategyTable::FedProx(p) => StrategyConfig::FedProx(p),
                    StrategyTable::FedAdam(p) => StrategyConfig::FedAdam(p),
                    StrategyTable::FedYogi(p) => StrategyConfig::FedYogi(p),
                })
            }
        }

        let config = deserializer.deserialize_any(V)?;
        config
            .validate()
            .map_err(|e| serde::de::Error::custom(e.to_string()))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<StrategyConfig, StrategyError> {
        #[derive(Deserialize)]
        struct Spec {
            strategy: Option<toml::Value>,
        }
        let spec: Spec = toml::from_str(toml_text).unwrap();
        StrategyConfig::from_spec(spec.strategy.as_ref())
    }

    #[test]
    fn absent_strategy_is_fedavg() {
        assert_eq!(parse("").unwrap(), StrategyConfig::FedAvg);
    }

    #[test]
    fn bare_names_give_the_defaults() {
        assert_eq!(
            parse("strategy = \"fedavg\"").unwrap(),
            StrategyConfig::FedAvg
        );
        assert_eq!(
            parse("strategy = \"fedprox\"").unwrap(),
            StrategyConfig::FedProx(FedProxParams { proximal_mu: 0.01 })
        );
        let adam = parse("strategy = \"fedadam\"").unwrap();
        assert_eq!(
            adam,
            StrategyConfig::FedAdam(AdaptiveParams {
                server_learning_rate: 1e-2,
                beta_1: 0.9,
                beta_2: 0.99,
                tau: 1e-3
            })
        );
        assert_eq!(adam.build().name(), "fedadam");
        assert_eq!(
            parse("strategy = \"fedyogi\"").unwrap().build().name(),
            "fedyogi"
        );
    }

    #[test]
    fn tables_set_parameters_and_keep_the_other_defaults() {
        let c = parse("[strategy]\nname = \"fedyogi\"\nserver_learning_rate = 0.1\ntau = 1e-4\n")
            .unwrap();
        assert_eq!(
            c,
            StrategyConfig::FedYogi(AdaptiveParams {
                server_learning_rate: 0.1,
                beta_1: 0.9,
                beta_2: 0.99,
                tau: 1e-4
            })
        );
        let c = parse("[strategy]\nname = \"fedprox\"\nproximal_mu = 0.5\n").unwrap();
        assert_eq!(
            c,
            StrategyConfig::FedProx(FedProxParams { proximal_mu: 0.5 })
        );
        assert_eq!(
            parse("[strategy]\nname = \"fedavg\"\n").unwrap(),
            StrategyConfig::FedAvg
        );
    }

    #[test]
    fn unknown_names_keys_and_bad_values_are_refused_with_what_is_wrong() {
        let e = parse("strategy = \"fedsgd\"").unwrap_err().to_string();
        assert!(e.contains("fedsgd") && e.contains("fedyogi"), "{e}");
        let e = parse("[strategy]\nname = \"fedadam\"\nlearning_rate = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = parse("[strategy]\nname = \"fedavg\"\nbeta_1 = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_1"), "{e}");
        let e = parse("[strategy]\nname = \"fedadam\"\nbeta_2 = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_2 = 1 must be in [0, 1)"), "{e}");
        let e = parse("[strategy]\nname = \"fedprox\"\nproximal_mu = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proximal_mu"), "{e}");
        let e = parse("[strategy]\nname = \"fedyogi\"\ntau = 0.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tau"), "{e}");
        let e = parse("[strategy]\nserver_learning_rate = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn serialised_config_reads_back() {
        for c in [
            StrategyConfig::FedAvg,
            StrategyConfig::FedProx(FedProxParams { proximal_mu: 0.2 }),
            StrategyConfig::FedAdam(AdaptiveParams::default()),
            StrategyConfig::FedYogi(AdaptiveParams {
                tau: 0.5,
                ..AdaptiveParams::default()
            }),
        ] {
            let text = toml::to_string(&c).unwrap();
            let back: StrategyConfig = toml::from_str(&text).unwrap();
            assert_eq!(back, c, "{text}");
        }
    }

    #[test]
    fn fedprox_tells_the_sites_mu() {
        let s = StrategyConfig::FedProx(FedProxParams { proximal_mu: 0.25 }).build();
        let v: serde_json::Value = serde_json::from_str(&s.configure_round(3)).unwrap();
        assert_eq!(v["strategy"], "fedprox");
        assert_eq!(v["proximal_mu"], 0.25);
        let v: serde_json::Value =
            serde_json::from_str(&StrategyConfig::FedAvg.build().configure_round(1)).unwrap();
        assert_eq!(v, serde_json::json!({ "strategy": "fedavg" }));
    }

    #[test]
    fn yogi_sign_is_zero_at_zero() {
        assert_eq!(sign(0.0), 0.0);
        assert_eq!(sign(-0.0), 0.0);
        assert_eq!(sign(2.0), 1.0);
        assert_eq!(sign(-1e-300), -1.0);
    }

    #[test]
    fn load_state_refuses_broken_state() {
        let spec = |n: &str| TensorSpec::new(n, DType::F32, vec![2]);
        let bytes = |v: [f32; 2]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut s = FedOpt::adam(AdaptiveParams::default());
        let e = s
            .load_state(vec![(spec("m.w"), bytes([0.0, 0.0]))])
            .unwrap_err();
        assert!(e.to_string().contains("no second"), "{e}");
        let e = s
            .load_state(vec![
                (spec("m.w"), bytes([0.0, 0.0])),
                (spec("v.w"), bytes([1.0, -1.0])),
            ])
            .unwrap_err();
        assert!(e.to_string().contains("negative at element 1"), "{e}");
        let e = s
            .load_state(vec![(spec("x.w"), bytes([0.0, 0.0]))])
            .unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let e = s.load_state(vec![(spec("m.w"), vec![0u8; 4])]).unwrap_err();
        assert!(e.to_string().contains("4 bytes"), "{e}");
        let e = FedAvg
            .load_state(vec![(spec("m.w"), bytes([0.0, 0.0]))])
            .unwrap_err();
        assert!(e.to_string().contains("keeps no state"), "{e}");
    }
}
