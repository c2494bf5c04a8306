//! The `SecAgg` call: a node's message for its secure aggregation round's current phase, answered
//! with what the coordinator relays to it once that phase closes. The node is the one in its
//! certificate; its task must belong to it, and its message must speak for its own index.

use std::time::{Duration, Instant};

use tonic::Status;
use tutela_protocol::identity::Principal;
use tutela_protocol::pb;
use tutela_protocol::secagg::ClientMessage;
use tutela_protocol::secagg::wire::{self, ServerRelay};

use crate::engine::Engine;

/// How often a waiting call looks again, besides being woken by the round.
const POLL: Duration = Duration::from_millis(250);

/// The longest a call waits for its phase to close: a phase closes within a quarter of the
/// round's window; a node whose call ends sooner asks again.
const MAX_WAIT: Duration = Duration::from_secs(600);

pub(super) async fn exchange(
    engine: &Engine,
    site: &str,
    request: pb::SecAggRequest,
) -> Result<pb::SecAggReply, Status> {
    let round = engine
        .secagg
        .get(&request.task_id, site)
        .map_err(Status::failed_precondition)?;
    let Some(phases) = round.masked() else {
        return Err(Status::internal("the round's aggregation has no phases"));
    };
    let message = request
        .message
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the SecAgg request carries no message"))?;
    let decoded =
        wire::decode_request(message).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(der) = wire::advertised_certificate(message) {
        // The neighbours check the certificate themselves (a coordinator is not trusted with
        // it); this check only keeps an honest coordinator from relaying a certificate that
        // is not the caller's.
        let named = tutela_protocol::pki::identity_of_cert_der(der)
            .map_err(|e| Status::invalid_argument(format!("the advertised certificate: {e}")))?;
        if named.principal
            != (Principal::Node {
                site: site.to_string(),
            })
        {
            return Err(Status::invalid_argument(format!(
                "the advertised certificate names {named}, not the caller's node of site {site}"
            )));
        }
        phases
            .present_certificate(site, der.to_vec())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
    }
    if let Some(msg) = decoded {
        let last = matches!(msg, ClientMessage::Unmask(_));
        phases
            .receive(site, msg)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if last {
            return Ok(wire::reply(&ServerRelay::Done));
        }
    }
    let until = Instant::now() + MAX_WAIT;
    loop {
        let changed = phases.changed();
        if let Some(relay) = phases.relay_for(site) {
            return Ok(wire::reply(&relay));
        }
        if let Some(reason) = phases.failure() {
            return Err(Status::aborted(format!(
                "the secure aggregation round failed: {reason}"
            )));
        }
        if phases.phase().is_none() {
            return Err(Status::aborted("the secure aggregation round is over"));
        }
        let now = Instant::now();
        if now >= until {
            return Err(Status::deadline_exceeded(
                "the phase did not close in time: ask again",
            ));
        }
        let _ = tokio::time::timeout(POLL.min(until - now), changed).await;
    }
}
