//! Several coordinators on one PostgreSQL database, one leader at a time (`[ha]` of
//! coordinator.toml; the lease itself: `crate::store::lease`).
//!
//! Every coordinator tries the lease every `renew_every_secs`. The one that holds it runs the job
//! engines and serves nodes and operators; the others are followers: they answer gRPC health
//! (`Federation`, `Jobs`, `Registry` and `ModelExchange` NOT_SERVING; the server itself SERVING,
//! so a liveness probe passes) and refuse every call of those services with UNAVAILABLE
//! `not leader: …`, naming the leader and its address when known, so that a node goes on to its
//! next coordinator address. When the lease expires (the leader died, or lost the database) a
//! follower takes it at the next epoch and takes the running jobs over
//! (`Engine::take_over`). A leader that fails to renew for a whole TTL, or finds the lease taken,
//! stands down at once (`Engine::stand_down`); its writes are fenced in the database anyway.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::engine::Engine;
use crate::store::{Fence, LeaseHolder, LeaseOutcome, Store};

/// `[ha]` of coordinator.toml. Every key is documented in `deploy/config/coordinator.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// This coordinator's name in the lease; unique among the coordinators of one database.
    /// Default: the machine's host name (a Kubernetes pod's name).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// How long a lease lasts without renewal, in seconds: the longest a dead leader keeps the
    /// others waiting. Default 5.
    #[serde(default = "default_ttl")]
    pub lease_ttl_secs: u64,
    /// How often the lease is tried (renewed by the leader, taken when expired by a follower), in
    /// seconds; at most half the TTL. Default 1.
    #[serde(default = "default_renew")]
    pub renew_every_secs: u64,
    /// Where nodes reach this coordinator (`HOST:PORT`, as in their node.toml); followers name
    /// the leader's in their refusals.
    #[serde(default)]
    pub advertise_address: Option<String>,
}

fn default_ttl() -> u64 {
    5
}

fn default_renew() -> u64 {
    1
}

impl HaConfig {
    /// The instance id: the configured one or the host name.
    pub fn instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("coordinator-{}", std::process::id()))
    }
}

/// Where this coordinator stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not yet tried the lease.
    Starting,
    Leader {
        epoch: i64,
    },
    /// Another coordinator holds the lease (`None`: not known, e.g. the database is unreachable).
    Follower {
        leader: Option<LeaseHolder>,
    },
}

/// This coordinator's role, shared with the services that only a leader serves.
pub struct Leadership {
    instance_id: String,
    role: watch::Sender<Role>,
}

impl Leadership {
    pub fn new(instance_id: String) -> Arc<Leadership> {
        Arc::new(Leadership {
            instance_id,
            role: watch::channel(Role::Starting).0,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
    }

    /// A coordinator without `[ha]`: the only one, the leader for good.
    pub fn force_leader(&self) {
        self.set(Role::Leader { epoch: 0 });
    }

    fn set(&self, role: Role) {
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }

    /// The refusal a follower answers: UNAVAILABLE (a node tries its next address), naming the
    /// leader when known.
    pub fn not_leader(&self) -> Status {
        let who = match self.role() {
            Role::Follower {
                leader: Some(l), ..
            } => match &l.address {
                Some(a) => format!("the leader is {} at {a} (epoch {})", l.instance_id, l.epoch),
                None => format!("the leader is {} (epoch {})", l.instance_id, l.epoch),
            },
            Role::Starting => "this coordinator has not taken the leader lease yet".to_string(),
            _ => "the leader is not known".to_string(),
        };
        Status::unavailable(format!(
            "not leader: coordinator {} is a follower; {who}",
            self.instance_id
        ))
    }

    /// `inner`, served only while this coordinator is the leader.
    pub fn gate<S>(self: &Arc<Self>, inner: S) -> LeaderOnly<S> {
        LeaderOnly {
            inner,
            leadership: self.clone(),
        }
    }
}

/// Tries the lease every `renew_every_secs` until the process ends, moving `leadership`, the
/// store's `fence` and the engine with it (see the module documentation).
pub async fn run(
    leadership: Arc<Leadership>,
    engine: Arc<Engine>,
    store: Store,
    fence: Fence,
    config: HaConfig,
) {
    let ttl = Duration::from_secs(config.lease_ttl_secs);
    let every = Duration::from_secs(config.renew_every_secs);
    let me = leadership.instance_id.clone();
    let address = config.advertise_address.clone();
    let mut last_renewed: Option<Instant> = None;
    loop {
        let tried = Instant::now();
        match store
            .acquire_lease(&me, address.as_deref(), ttl, fence.epoch())
            .await
        {
            Ok(LeaseOutcome::Leader { epoch, taken }) => {
                last_renewed = Some(tried);
                if taken || fence.epoch() != Some(epoch) {
                    fence.set(epoch);
                    leadership.set(Role::Leader { epoch });
                    tracing::info!(instance = %me, epoch, "took the leader lease: taking the running jobs over");
                    match engine.take_over().await {
                        Ok(n) => tracing::info!(instance = %me, epoch, jobs = n, "leader"),
                        Err(e) => {
                            // The lease lapses (not renewed while not fenced) and is taken again
                            // at the next epoch, retrying the takeover.
                            tracing::error!(instance = %me, epoch, error = %e, "could not take the running jobs over: standing down");
                            fence.clear();
                            engine.stand_down("the leader could not take the jobs over");
                            leadership.set(Role::Follower { leader: None });
                        }
                    }
                }
            }
            Ok(LeaseOutcome::Follower { leader }) => {
                if fence.epoch().is_some() {
                    tracing::warn!(instance = %me, leader = %leader.instance_id, epoch = leader.epoch, "the leader lease was taken over: standing down");
                    fence.clear();
                    engine.stand_down(&format!("the leader is now {}", leader.instance_id));
                } else if !matches!(leadership.role(), Role::Follower { leader: Some(ref l) } if l.epoch == leader.epoch)
                {
                    tracing::info!(instance = %me, leader = %leader.instance_id, epoch = leader.epoch, "follower");
                }
                leadership.set(Role::Follower {
                    leader: Some(leader),
                });
            }
            Err(e) => {
                tracing::error!(instance = %me, error = %e, "cannot reach the leader lease");
                let lapsed = last_renewed.is_none_or(|t| t.elapsed() >= ttl);
                if fence.epoch().is_some() && lapsed {
                    tracing::warn!(instance = %me, "the lease was not renewed for a whole TTL: standing down");
                    fence.clear();
                    engine.stand_down("the leader lost its database");
                    leadership.set(Role::Follower { leader: None });
                } else if fence.epoch().is_none() {
                    leadership.set(Role::Follower { leader: None });
                }
            }
        }
        tokio::time::sleep(every.saturating_sub(tried.elapsed())).await;
    }
}

/// A service served only while this coordinator is the leader ([`Leadership::gate`]).
#[derive(Clone)]
pub struct LeaderOnly<S> {
    inner: S,
    leadership: Arc<Leadership>,
}

impl<S: NamedService> NamedService for LeaderOnly<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for LeaderOnly<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.leadership.is_leader() {
            let status = self.leadership.not_leader();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // The clone that was polled ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followers_refusal_is_unavailable_and_names_the_leader_and_its_address() {
        let l = Leadership::new("coord-b".into());
        assert_eq!(l.not_leader().code(), tonic::Code::Unavailable);
        assert!(
            l.not_leader()
                .message()
                .contains("not taken the leader lease yet")
        );
        l.set(Role::Follower {
            leader: Some(LeaseHolder {
                instance_id: "coord-a".into(),
                address: Some("c1.example:7443".into()),
                epoch: 3,
                expires_at_ms: 0,
            }),
        });
        let s = l.not_leader();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message()
                .starts_with("not leader: coordinator coord-b is a follower")
                && s.message().contains("coord-a at c1.example:7443 (epoch 3)"),
            "{}",
            s.message()
        );
        l.set(Role::Leader { epoch: 4 });
        assert!(l.is_leader());
    }

    #[test]
    fn the_instance_id_defaults_to_the_host_name() {
        let c: HaConfig = toml::from_str("").unwrap();
        assert_eq!((c.lease_ttl_secs, c.renew_every_secs), (5, 1));
        assert!(!c.instance_id().is_empty());
        let c: HaConfig = toml::from_str("instance_id = \"coord-a\"").unwrap();
        assert_eq!(c.instance_id(), "coord-a");
    }
}
