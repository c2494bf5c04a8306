//! `tutela model list|show|promote|rollback|fetch`: the coordinator's model registry. A move is
//! planned here from the registry's state (`tutela_protocol::release`), shown, signed with the
//! caller's key and sent; the coordinator plans it again and applies it once the policy's quorum
//! of signatures is met, recording it in the audit trail.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tonic::transport::Channel;
use tutela_policy::stage::{SignedMove, move_from_pb};
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::{Identity, Principal};
use tutela_protocol::pb;
use tutela_protocol::pb::registry_client::RegistryClient;
use tutela_protocol::release::{
    MoveKind, Stage, VersionMove, VersionState, plan_promote, plan_rollback,
};
use tutela_protocol::stream::{self, SafetensorsFileSink};
use tutela_protocol::tls::TlsMaterial;

use crate::job_cmd::Connection;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// List the registry's names and their versions with each one's stage.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a name: its versions, its stage history (who moved what, when and why) and the moves
    /// waiting for signatures.
    Show {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Move a version to a stage (candidate -> canary -> production -> retired), signed with your
    /// key. Into production, the current production version is retired in the same move. The
    /// move is applied, and recorded in the audit trail, once the policy's stage rules (p3) have
    /// their quorum of signatures: each signer runs the same command.
    Promote {
        name: String,
        /// The version to move (a number, as `list` shows it without the `v`).
        #[arg(value_name = "VERSION")]
        number: u64,
        /// canary, production or retired.
        #[arg(long)]
        to: Stage,
        /// Why (signed, recorded and shown to everyone).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        signing: Signing,
        #[command(flatten)]
        conn: Connection,
    },
    /// Restore the previous production version in one command: the current one is retired and
    /// the version that left production last comes back, signed with your key (the quorum of
    /// the stage rules for production and retired applies).
    Rollback {
        name: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        signing: Signing,
        #[command(flatten)]
        conn: Connection,
    },
    /// Download a name's version at a stage (production unless said) through the tensor stream
    /// into DIR/<name>-v<version>.safetensors, checking its digest against the registry's.
    Fetch {
        name: String,
        #[arg(long, default_value = "production")]
        stage: Stage,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
}

/// The key and certificate a move is signed with.
#[derive(Debug, clap::Args)]
pub struct Signing {
    /// Your private key (PKCS#8 PEM; `tutela pki issue` writes one).
    #[arg(long)]
    pub key: PathBuf,
    /// Your certificate (PEM), the one your connection presents.
    #[arg(long)]
    pub cert: PathBuf,
}

impl Connection {
    pub async fn registry(&self) -> Result<RegistryClient<Channel>> {
        let material = TlsMaterial::load(&self.tls.files())?;
        let coordinator = Identity::new(&material.identity.consortium, Principal::Coordinator)?;
        let tls = ClientTls::from_material(&material, Some(coordinator))?;
        let channel = client::connect(&self.coordinator, tls).await?;
        Ok(RegistryClient::new(channel)
            .max_decoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES))
    }
}

pub async fn run(cmd: RegistryCommand) -> Result<()> {
    match cmd {
        RegistryCommand::List { conn } => {
            let list = conn
                .registry()
                .await?
                .list_models(pb::ListModelsRequest {})
                .await?
                .into_inner();
            if list.models.is_empty() {
                println!("no model is registered yet");
            }
            for m in list.models {
                println!("{}", m.name);
                for v in &m.versions {
                    println!(
                        "  v{:<4} {:<11} {}  job {}",
                        v.version, v.stage, v.model_digest, v.job_id
                    );
                }
            }
            Ok(())
        }
        RegistryCommand::Show { name, conn } => {
            let m = get(&mut conn.registry().await?, &name).await?;
            print_model(&m);
            Ok(())
        }
        RegistryCommand::Promote {
            name,
            number,
            to,
            reason,
            signing,
            conn,
        } => {
            let mut registry = conn.registry().await?;
            let m = get(&mut registry, &name).await?;
            let moves = plan_promote(&name, &states(&m)?, number, to)?;
            sign_and_send(
                &mut registry,
                &name,
                MoveKind::Promote,
                moves,
                &reason,
                &signing,
            )
            .await
        }
        RegistryCommand::Rollback {
            name,
            reason,
            signing,
            conn,
        } => {
            let mut registry = conn.registry().await?;
            let m = get(&mut registry, &name).await?;
            let moves = plan_rollback(&name, &states(&m)?)?;
            sign_and_send(
                &mut registry,
                &name,
                MoveKind::Rollback,
                moves,
                &reason,
                &signing,
            )
            .await
        }
        RegistryCommand::Fetch {
            name,
            stage,
            out,
            conn,
        } => fetch(&mut conn.registry().await?, &name, stage, &out).await,
    }
}

async fn get(registry: &mut RegistryClient<Channel>, name: &str) -> Result<pb::RegisteredModel> {
    Ok(registry
        .get_model(pb::GetModelRequest {
            name: name.to_string(),
        })
        .await
        .with_context(|| format!("the coordinator's registry has no {name:?}"))?
        .into_inner())
}

fn states(m: &pb::RegisteredModel) -> Result<Vec<VersionState>> {
    m.versions
        .iter()
        .map(|v| {
            Ok(VersionState {
                version: v.version,
                model_digest: v.model_digest.clone(),
                stage: v
                    .stage
                    .parse()
                    .context("the coordinator sent an unknown stage")?,
                left_production: (v.left_production > 0).then_some(v.left_production),
            })
        })
        .collect()
}

fn show_moves(moves: &[VersionMove]) -> String {
    moves
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn sign_and_send(
    registry: &mut RegistryClient<Channel>,
    name: &str,
    kind: MoveKind,
    moves: Vec<VersionMove>,
    reason: &str,
    signing: &Signing,
) -> Result<()> {
    let key_pem = std::fs::read_to_string(&signing.key)
        .with_context(|| format!("cannot read {}", signing.key.display()))?;
    let cert_pem = std::fs::read_to_string(&signing.cert)
        .with_context(|| format!("cannot read {}", signing.cert.display()))?;
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    println!("signing the {kind} of {name}: {}", show_moves(&moves));
    let signed = SignedMove::sign(&key_pem, &cert_pem, name, kind, moves, reason, now_ms)?;
    signed.check_own_signature().with_context(|| {
        format!(
            "{} is not the key of {}",
            signing.key.display(),
            signing.cert.display()
        )
    })?;
    let reply = registry
        .move_stage(pb::MoveStageRequest {
            r#move: Some(signed.to_pb()),
        })
        .await
        .context("the coordinator refused the stage move")?
        .into_inner();
    if reply.applied {
        println!("applied and recorded in the audit trail; signed by:");
    } else {
        println!("signed; waiting for more signatures. Signed by:");
    }
    for g in &reply.gathered {
        println!("  {g}");
    }
    for m in &reply.missing {
        println!("  missing: {m}");
    }
    if let Some(m) = &reply.model {
        print_model(m);
    }
    Ok(())
}

fn print_model(m: &pb::RegisteredModel) {
    println!("{}", m.name);
    for v in &m.versions {
        println!(
            "  v{:<4} {:<11} {}  job {}",
            v.version, v.stage, v.model_digest, v.job_id
        );
    }
    if !m.history.is_empty() {
        println!("history:");
    }
    for h in &m.history {
        let moves: Vec<String> = h
            .moves
            .iter()
            .filter_map(|x| move_from_pb(x).ok())
            .map(|x| x.to_string())
            .collect();
        println!(
            "  #{} {} {} by {}: {}",
            h.move_no,
            h.kind,
            moves.join(", "),
            h.signers.join(", "),
            h.reason
        );
    }
    for p in &m.pending {
        let moves: Vec<String> = p
            .moves
            .iter()
            .filter_map(|x| move_from_pb(x).ok())
            .map(|x| x.to_string())
            .collect();
        println!(
            "  pending {} {} signed by {}; missing: {}",
            p.kind,
            moves.join(", "),
            p.signers.join(", "),
            p.missing.join("; ")
        );
    }
}

/// Streams `name`'s version at `stage` into `out`, checking that the stream's verified digest is
/// the one the registry names.
async fn fetch(
    registry: &mut RegistryClient<Channel>,
    name: &str,
    stage: Stage,
    out: &std::path::Path,
) -> Result<()> {
    let response = registry
        .fetch_model(pb::FetchRegisteredModelRequest {
            name: name.to_string(),
            stage: stage.to_string(),
        })
        .await
        .with_context(|| format!("fetching {name} at {stage}"))?;
    let meta = |key: &str| {
        response
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .with_context(|| format!("the coordinator's answer lacks {key}"))
    };
    let version = meta("tutela-model-version")?;
    let expected = meta("tutela-model-digest")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!("{name}-v{version}.safetensors"));
    let received = stream::receive(response.into_inner(), SafetensorsFileSink::at(&path))
        .await
        .with_context(|| format!("receiving {name} v{version}"))?;
    if received.digest_hex() != expected {
        // The sink committed a file whose stream verified, but it is not the registry's model.
        let _ = std::fs::remove_file(&path);
        bail!(
            "{name} v{version}: the stream's digest is {}, the registry's {expected}: removed",
            received.digest_hex()
        );
    }
    println!(
        "{name} v{version} ({stage}) {expected}: {}",
        received.output.display()
    );
    Ok(())
}
