//! Recording `tutela pki` operations in the audit trail (`--audit`): the recorder, checked and
//! connected before the certificate operation, and the `certificate.issued` /
//! `certificate.revoked` events it appends as the CA administrator.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tutela_audit::Action;
use tutela_audit::client::AuditClient;
use tutela_protocol::client::ClientTls;
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pki::files;
use tutela_protocol::pki::{self, CaDir};
use tutela_protocol::tls::{TlsFiles, TlsMaterial};

use super::{AuditArgs, rfc3339};

/// How long recording an event may take, connection included, before the command gives up.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The audit service and the client certificate to append an event as, checked and loaded before
/// the certificate operation so that a mistake in them changes nothing.
pub(super) struct AuditRecorder {
    addr: String,
    tls: ClientTls,
    /// The identity of the client certificate: the event's actor.
    actor: Identity,
}

impl AuditArgs {
    /// The recorder that --audit asks for, or `None` without --audit. Fails (before anything is
    /// done) on incomplete options or a client certificate that cannot be loaded or belongs to
    /// another consortium than the CA's.
    pub(super) fn recorder(&self, consortium: &str) -> Result<Option<AuditRecorder>> {
        let Some(addr) = &self.audit else {
            if self.audit_tls_dir.is_some() || self.audit_stem.is_some() {
                bail!(
                    "--audit-tls-dir and --audit-stem (or TUTELA_AUDIT_TLS_DIR and TUTELA_AUDIT_STEM) \
                     name the certificate to record the event with, but no --audit HOST:PORT \
                     (or TUTELA_AUDIT) says where; nothing was done"
                );
            }
            return Ok(None);
        };
        let (Some(dir), Some(stem)) = (&self.audit_tls_dir, &self.audit_stem) else {
            bail!(
                "--audit {addr} needs --audit-tls-dir DIR and --audit-stem STEM (or \
                 TUTELA_AUDIT_TLS_DIR and TUTELA_AUDIT_STEM): the client certificate to record \
                 the event with; nothing was done"
            );
        };
        let material = TlsMaterial::load(&TlsFiles::in_dir(dir, stem)).with_context(|| {
            format!(
                "--audit-tls-dir {} --audit-stem {stem}: cannot load the client certificate to \
                 record the event with; nothing was done",
                dir.display()
            )
        })?;
        if material.identity.consortium != consortium {
            bail!(
                "--audit-tls-dir {} --audit-stem {stem}: the certificate is {}'s, of consortium \
                 {:?}, but the CA is consortium {consortium:?}'s; nothing was done",
                dir.display(),
                material.identity,
                material.identity.consortium
            );
        }
        let server = Identity::new(consortium, Principal::Audit)?;
        let tls = ClientTls::from_material(&material, Some(server)).with_context(|| {
            format!(
                "--audit-tls-dir {} --audit-stem {stem}: unusable as a client certificate; \
                 nothing was done",
                dir.display()
            )
        })?;
        Ok(Some(AuditRecorder {
            addr: addr.clone(),
            tls,
            actor: material.identity,
        }))
    }
}

impl AuditRecorder {
    /// Appends the event; returns its sequence number in the log.
    fn append(self, event: &AuditEvent) -> Result<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime for the audit client")?;
        runtime.block_on(async {
            let append = async {
                let mut client = AuditClient::connect(&self.addr, self.tls).await?;
                client
                    .append(event.action, &event.subject, &event.payload)
                    .await
            };
            let receipt = tokio::time::timeout(AUDIT_TIMEOUT, append)
                .await
                .map_err(|_| {
                    anyhow!(
                        "no answer within {} seconds (the event may still be committed: check \
                         the trail before recording it again)",
                        AUDIT_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|e| anyhow!(error_chain(&e)))?;
            Ok(receipt.seq)
        })
    }
}

/// An event to append: what `tutela_audit::Action` documents for the action.
pub(super) struct AuditEvent {
    action: Action,
    subject: String,
    payload: serde_json::Value,
}

impl AuditEvent {
    /// The event of a typed payload (its action is the payload's).
    fn of<P: tutela_audit::ActionPayload>(subject: String, payload: &P) -> AuditEvent {
        AuditEvent {
            action: P::ACTION,
            subject,
            payload: payload.to_value(),
        }
    }
}

impl fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  action:  {}", self.action)?;
        writeln!(f, "  subject: {}", self.subject)?;
        write!(
            f,
            "  payload: {}",
            tutela_audit::canonical_json(&self.payload)
        )
    }
}

/// `certificate.issued` for a certificate the CA just made: its serial, the SHA-256 fingerprint
/// of its DER (64 hex digits) and its validity (RFC 3339), all read back from the certificate.
pub(super) fn issued_event(cert_pem: &str, identity: &Identity) -> Result<AuditEvent> {
    let pki::Description::Certificate(cert) =
        pki::describe(cert_pem).context("reading back the new certificate")?
    else {
        bail!("the new certificate's PEM holds no certificate");
    };
    Ok(AuditEvent::of(
        identity.uri(),
        &tutela_audit::payload::CertificateIssued {
            serial: cert.serial_hex,
            sha256_fingerprint: cert.sha256_fingerprint.replace(':', ""),
            not_before: rfc3339(cert.not_before),
            not_after: rfc3339(cert.not_after),
        },
    ))
}

/// `certificate.revoked` for a certificate just revoked: its serial, the reason (`unspecified`
/// when none was given) and the number of the CRL in the CA directory, which `CaDir::revoke` has
/// just written and which must list the serial (a CRL written since by another administrator
/// carries it too, as every CRL lists every revoked certificate).
pub(super) fn revoked_event(store: &CaDir, entry: &pki::IndexEntry) -> Result<AuditEvent> {
    let path = store.crl_path();
    let pem = files::read_text(&path)?;
    let pki::Description::Crl(crl) =
        pki::describe(&pem).with_context(|| format!("reading {}", path.display()))?
    else {
        bail!("{} holds no CRL", path.display());
    };
    if !crl.revoked.iter().any(|r| r.serial_hex == entry.serial) {
        bail!(
            "{} does not list serial {}: it was replaced by a CRL without it",
            path.display(),
            entry.serial
        );
    }
    let number = crl
        .crl_number
        .as_deref()
        .ok_or_else(|| anyhow!("{} has no CRL number", path.display()))?;
    let number = u64::from_str_radix(number, 16).map_err(|e| {
        anyhow!(
            "{}: CRL number {number} (hex) is not a 64-bit number: {e}",
            path.display()
        )
    })?;
    let reason = entry
        .revocation
        .as_ref()
        .and_then(|r| r.reason.as_deref())
        .unwrap_or("unspecified");
    Ok(AuditEvent::of(
        entry.identity.clone(),
        &tutela_audit::payload::CertificateRevoked {
            serial: entry.serial.clone(),
            reason: reason.to_string(),
            crl_number: number,
        },
    ))
}

/// Records the event of a certificate operation that has already happened (`done` says what, for
/// the error): appends it at the audit service, or without --audit says it is not recorded. A
/// failed append is an error that says the operation was done but not recorded, and carries the
/// event so that it can be recorded by hand.
pub(super) fn record(
    recorder: Option<AuditRecorder>,
    done: &str,
    event: impl FnOnce() -> Result<AuditEvent>,
) -> Result<()> {
    let Some(recorder) = recorder else {
        println!("  audit:        not recorded in an audit trail (no --audit given)");
        return Ok(());
    };
    let (addr, actor) = (recorder.addr.clone(), recorder.actor.clone());
    let event = event().map_err(|e| {
        anyhow!(
            "{done}, but NOT recorded in the audit trail at {addr}: cannot make the event: {e:#}"
        )
    })?;
    match recorder.append(&event) {
        Ok(seq) => {
            println!(
                "  audit:        recorded {} as event {seq} at {addr} (actor {actor})",
                event.action
            );
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "{done}, but NOT recorded in the audit trail at {addr}: {e:#}\n\
             record this event by hand (tutela.v1.Audit/Append, as {actor}):\n{event}"
        )),
    }
}

/// An error and its causes, "a: b: c", leaving out a cause whose message the one before it
/// already ends with (wrapped errors that repeat their source).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        if !out.ends_with(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        source = s.source();
    }
    out
}
