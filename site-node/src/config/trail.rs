//! Hole (a) of the 2026-11 review: a node without `[audit]` anchored nothing (no
//! de-identification report, no privacy spend, no checkpoint of the trail) and said so only in its
//! own log. Starting a node (`tutela-node run`) now needs the trail, or its waiver by name for a
//! development setup that no other machine takes part in.
//!
//! Why the check is here and not in [`NodeConfig::validate`]: the other commands that read
//! node.toml (`data check`, `privacy`, `ledger restore`, the library's own tests) do not start a
//! node that trains and releases anything; `check_trail` is called where one starts.

use std::path::Path;

use super::{ConfigError, NodeConfig};

impl NodeConfig {
    /// Whether this config may start a node: `[audit]` is configured, or `insecure_no_audit =
    /// true` waives it while the coordinator is on this machine (a loopback address: a
    /// development setup), never both. The error names the key and `origin`, the config file.
    pub fn check_trail(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        match (&self.audit, self.insecure_no_audit) {
            (Some(_), false) => Ok(()),
            (None, false) => Err(invalid(
                "audit",
                "is required: the node refuses to start without an [audit] table, since nothing \
                 it does (de-identification reports, privacy spends, the trail's checkpoint it \
                 holds) would be anchored in the consortium's audit trail. Add [audit] with the \
                 service's `endpoint` and its `checkpoint_public_key` (see the [audit] table of \
                 deploy/config/node.toml). Only for a development setup on this machine (the \
                 coordinator on a loopback address), `insecure_no_audit = true` runs without a \
                 trail"
                    .into(),
            )),
            (Some(_), true) => Err(invalid(
                "insecure_no_audit",
                "is set together with an [audit] table: remove `insecure_no_audit`".into(),
            )),
            (None, true) if !self.coordinator.iter().all(is_loopback) => Err(invalid(
                "insecure_no_audit",
                format!(
                    "is only for a development setup on one machine, but coordinator = \"{}\" is \
                     not a loopback address: a node that trains for a coordinator elsewhere keeps \
                     the trail. Add an [audit] table and remove `insecure_no_audit`",
                    self.coordinator
                ),
            )),
            (None, true) => Ok(()),
        }
    }
}

/// Whether `HOST:PORT`'s host is this machine: `localhost`, or a loopback IP address.
fn is_loopback(addr: &str) -> bool {
    let Some((host, _)) = addr.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix("https://")
        .unwrap_or(host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_this_machine_is_a_development_setup() {
        for local in [
            "localhost:7443",
            "127.0.0.1:1",
            "[::1]:7443",
            "https://localhost:9",
        ] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in [
            "coordinator.example:7443",
            "10.0.0.1:7443",
            "0.0.0.0:7443",
            "localhost.evil.example:7443",
            "localhost",
        ] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }
}
