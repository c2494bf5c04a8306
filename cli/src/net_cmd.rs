//! `tutela ping`: checks a deployment's certificates end to end by calling a server's
//! `Identity.WhoAmI` over mutual TLS and printing who the server saw.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tutela_protocol::client::{self, ClientTls};
use tutela_protocol::identity::Identity;
use tutela_protocol::pb::WhoAmIRequest;
use tutela_protocol::pb::identity_client::IdentityClient;
use tutela_protocol::tls::TlsFiles;

/// The TLS files of the calling principal, as written by `tutela pki issue --out DIR`.
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// Directory holding ca.crt and <stem>.crt/.key (the output of `tutela pki issue`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: PathBuf,
    /// File stem of the certificate and key in --tls-dir: node, coordinator, user-<name>,
    /// operator-<name>, ...
    #[arg(long)]
    pub stem: String,
    /// CRL to check the server's certificate against (defaults to DIR/crl.pem if present).
    #[arg(long)]
    pub crl: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn files(&self) -> TlsFiles {
        let mut files = TlsFiles::in_dir(&self.tls_dir, &self.stem);
        if self.crl.is_some() {
            files.crl = self.crl.clone();
        }
        files
    }
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Server address, HOST:PORT. HOST must be a DNS or IP name in the server's certificate.
    #[arg(long)]
    addr: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Identity the server must present, e.g. spiffe://acme/coordinator.
    #[arg(long)]
    expect: Option<Identity>,
    /// Ask the server to check that this certificate may act for SITE (a node or user of it).
    #[arg(long)]
    site: Option<String>,
}

pub async fn ping(args: PingArgs) -> Result<()> {
    let tls = ClientTls::load(&args.tls.files(), args.expect.clone())?;
    let channel = client::connect(&args.addr, tls).await?;
    let me = IdentityClient::new(channel)
        .who_am_i(WhoAmIRequest {
            act_for_site: args.site.unwrap_or_default(),
        })
        .await
        .with_context(|| format!("WhoAmI at {} failed", args.addr))?
        .into_inner();
    println!("server {} sees you as {}", args.addr, me.identity);
    println!(
        "  role {}  site {}  name {}  serial {}",
        me.role,
        dash(&me.site),
        dash(&me.name),
        me.serial
    );
    Ok(())
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
