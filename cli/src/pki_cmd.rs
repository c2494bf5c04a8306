//! `tutela pki ...`: the consortium PKI on the command line. Argument parsing and printing only;
//! the work is done by `tutela_protocol::pki`.
//!
//! `issue`, `sign` and `revoke` record what they did in the audit trail when given `--audit`
//! (`certificate.issued`, `certificate.revoked`), appended as the CA administrator's own client
//! certificate. The certificate operation is local and atomic and happens first; an event that
//! cannot then be appended fails the command, which prints the event for the operator to record.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use tutela_protocol::identity::{Identity, Principal, Role};
use tutela_protocol::pki::files::{self, FileMode};
use tutela_protocol::pki::{
    self, CaDir, DEFAULT_CA_DAYS, DEFAULT_CRL_NEXT_UPDATE_DAYS, DEFAULT_LEAF_DAYS, KeyAlgorithm,
    LeafOptions, Validity,
};

mod audit_record;

use audit_record::{issued_event, record, revoked_event};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the consortium CA in a new directory: ca.crt, ca.key (mode 0600), index.json (every
    /// certificate the CA issues) and crl.pem (the current, initially empty, CRL).
    Init(InitArgs),
    /// Issue a certificate and a new private key for a principal, signed by the CA. Writes
    /// OUT/<stem>.crt, OUT/<stem>.key (mode 0600) and a copy of the CA certificate as OUT/ca.crt,
    /// where <stem> is coordinator, audit, node, user-<name> or operator-<name>. With --audit the
    /// issue is recorded in the audit trail as certificate.issued.
    Issue(IssueArgs),
    /// Make a private key and a certificate signing request where the key is to stay, for the CA
    /// operator to sign with `tutela pki sign`. Writes OUT/<stem>.key (mode 0600) and
    /// OUT/<stem>.csr.
    Csr(CsrArgs),
    /// Sign a CSR made with `tutela pki csr`. The operator states whom the certificate is for
    /// (--role/--site/--name); a CSR naming anyone else is refused. With --audit the certificate
    /// is recorded in the audit trail as certificate.issued.
    Sign(SignArgs),
    /// Revoke a certificate the CA issued, and refresh the CA's crl.pem. With --audit the
    /// revocation is recorded in the audit trail as certificate.revoked.
    Revoke(RevokeArgs),
    /// Sign a fresh CRL of every revoked certificate and write it out (crl.pem in the CA directory
    /// is refreshed too).
    Crl(CrlArgs),
    /// Describe certificates, CRLs and CSRs (the kind comes from each PEM block's label; a file
    /// may hold several, e.g. a chain).
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Name of the consortium: 1-63 characters of a-z, 0-9, '-', '_', '.'. It becomes the
    /// authority part of every identity (spiffe://<consortium>/...).
    #[arg(long)]
    consortium: String,
    /// Directory for the CA; created (mode 0700) if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Key type of the CA key.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::EcdsaP256)]
    algorithm: AlgorithmArg,
    /// Days the CA certificate is valid.
    #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    /// Overwrite an existing CA in DIR. Its certificates will no longer verify.
    #[arg(long)]
    force: bool,
}

/// Whom a certificate is for.
#[derive(Debug, Args)]
pub struct PrincipalArgs {
    /// Role of the principal: coordinator, audit (the audit service), node (a site's node),
    /// user (a person at a site, e.g. a compliance officer) or operator (a consortium operator).
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Site of a node or user (required for those, refused for the others).
    #[arg(long)]
    site: Option<String>,
    /// Personal name of a user or operator (required for those, refused for the others).
    #[arg(long)]
    name: Option<String>,
}

/// The names and addresses a certificate is valid for, besides its identity.
#[derive(Debug, Args)]
pub struct SanArgs {
    /// DNS name the holder serves under (repeatable). For coordinator and audit, when neither
    /// --dns nor --ip is given, the default is --dns localhost --ip 127.0.0.1 --ip ::1.
    #[arg(long = "dns", value_name = "HOST")]
    dns_names: Vec<String>,
    /// IP address the holder serves under (repeatable); see --dns for the default.
    #[arg(long = "ip", value_name = "ADDR")]
    ip_addresses: Vec<IpAddr>,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The CA directory made by `tutela pki init`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    #[command(flatten)]
    principal: PrincipalArgs,
    /// Days the certificate is valid (it may not outlive the CA).
    #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    #[command(flatten)]
    sans: SanArgs,
    /// Key type of the new key.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::EcdsaP256)]
    algorithm: AlgorithmArg,
    /// Directory for the certificate, key and CA copy; created (mode 0700) if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Overwrite existing files in DIR (an identical ca.crt is never a conflict).
    #[arg(long)]
    force: bool,
    /// Also write the certificate, its key and the CA as a PKCS#12 file (.p12) to import into a
    /// browser or key store: how a compliance officer opens the audit console (docs/console.md).
    /// Encrypted with PBES2 (AES-256) under a passphrase of at least 8 characters.
    #[arg(long, value_name = "FILE")]
    pkcs12: Option<PathBuf>,
    /// The PKCS#12 passphrase: the first line of FILE. Without it the passphrase is asked for on
    /// the terminal (twice, not echoed).
    #[arg(long, value_name = "FILE", requires = "pkcs12")]
    pkcs12_passphrase_file: Option<PathBuf>,
    #[command(flatten)]
    audit: AuditArgs,
}

#[derive(Debug, Args)]
pub struct CsrArgs {
    /// Consortium whose CA will sign the CSR.
    #[arg(long)]
    consortium: String,
    #[command(flatten)]
    principal: PrincipalArgs,
    /// DNS name to ask for (repeatable); the CA operator must grant each with `sign --dns`.
    #[arg(long = "dns", value_name = "HOST")]
    dns_names: Vec<String>,
    /// Key type of the new key.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::EcdsaP256)]
    algorithm: AlgorithmArg,
    /// Directory for the key and the CSR; created (mode 0700) if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Overwrite an existing key and CSR in DIR.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The CA directory made by `tutela pki init`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The CSR to sign (PEM).
    #[arg(long, value_name = "FILE")]
    csr: PathBuf,
    /// Whom the certificate is for: the CSR must name exactly this identity.
    #[command(flatten)]
    principal: PrincipalArgs,
    /// Days the certificate is valid (it may not outlive the CA).
    #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    /// Names granted; a CSR asking for a DNS name or IP address not granted here is refused.
    #[command(flatten)]
    sans: SanArgs,
    /// Where to write the certificate (PEM).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Overwrite an existing FILE.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    audit: AuditArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The CA directory made by `tutela pki init`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Serial number of the certificate, in hex, as `issue` and `show` print it (colons and a
    /// 0x prefix are accepted).
    #[arg(long, value_name = "HEX")]
    serial: String,
    /// Why it is revoked; recorded in the CRL.
    #[arg(long, value_enum)]
    reason: Option<ReasonArg>,
    #[command(flatten)]
    audit: AuditArgs,
}

/// Where `issue`, `sign` and `revoke` record what they did: the audit service, reached over mutual
/// TLS as the CA administrator's own client certificate.
#[derive(Debug, Args)]
#[command(next_help_heading = "Audit trail")]
pub struct AuditArgs {
    /// Record the event (certificate.issued or certificate.revoked) at the audit service at
    /// HOST:PORT, appended as the holder of --audit-tls-dir/--audit-stem, whom the consortium
    /// policy must allow to write (`audit, write`). The certificate operation happens first; if
    /// the event cannot then be appended the command fails, saying the certificate was issued
    /// (revoked) but not recorded, and prints the event to record by hand. Without --audit
    /// nothing is recorded, and a line says so.
    #[arg(long, value_name = "HOST:PORT", env = "TUTELA_AUDIT")]
    audit: Option<String>,
    /// Directory holding ca.crt and <stem>.crt/.key of the CA administrator's own client
    /// certificate (e.g. an operator's, the output of `tutela pki issue --role operator`), and
    /// optionally crl.pem to check the audit service's certificate against.
    #[arg(long, value_name = "DIR", env = "TUTELA_AUDIT_TLS_DIR")]
    audit_tls_dir: Option<PathBuf>,
    /// File stem of that certificate and key in --audit-tls-dir (e.g. operator-<name>).
    #[arg(long, value_name = "STEM", env = "TUTELA_AUDIT_STEM")]
    audit_stem: Option<String>,
}

#[derive(Debug, Args)]
pub struct CrlArgs {
    /// The CA directory made by `tutela pki init`.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Where to write the CRL (PEM).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Days until the CRL's next update, by when a newer one should be published.
    #[arg(long, default_value_t = DEFAULT_CRL_NEXT_UPDATE_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    next_update_days: u32,
    /// Overwrite an existing FILE.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// PEM file(s) holding certificates, CRLs or CSRs.
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Coordinator,
    Audit,
    Node,
    User,
    Operator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Coordinator => Role::Coordinator,
            RoleArg::Audit => Role::Audit,
            RoleArg::Node => Role::Node,
            RoleArg::User => Role::User,
            RoleArg::Operator => Role::Operator,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AlgorithmArg {
    /// ECDSA P-256 with SHA-256 (accepted everywhere).
    EcdsaP256,
    /// Ed25519: rustls peers only for leaf keys (Python grpcio/BoringSSL cannot use an Ed25519
    /// leaf key in TLS); fine for the CA.
    Ed25519,
}

impl From<AlgorithmArg> for KeyAlgorithm {
    fn from(a: AlgorithmArg) -> KeyAlgorithm {
        match a {
            AlgorithmArg::EcdsaP256 => KeyAlgorithm::EcdsaP256,
            AlgorithmArg::Ed25519 => KeyAlgorithm::Ed25519,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReasonArg {
    Unspecified,
    /// The private key was (or may have been) disclosed.
    KeyCompromise,
    /// The holder left the site or consortium, or changed role.
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The holder (node, service) was decommissioned.
    CessationOfOperation,
    /// The holder's privileges were withdrawn.
    PrivilegeWithdrawn,
}

impl ReasonArg {
    fn as_str(self) -> &'static str {
        match self {
            ReasonArg::Unspecified => "unspecified",
            ReasonArg::KeyCompromise => "key-compromise",
            ReasonArg::AffiliationChanged => "affiliation-changed",
            ReasonArg::Superseded => "superseded",
            ReasonArg::CessationOfOperation => "cessation-of-operation",
            ReasonArg::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }
}

pub fn run(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init(a) => init(a),
        PkiCommand::Issue(a) => issue(a),
        PkiCommand::Csr(a) => csr(a),
        PkiCommand::Sign(a) => sign(a),
        PkiCommand::Revoke(a) => revoke(a),
        PkiCommand::Crl(a) => crl(a),
        PkiCommand::Show(a) => show(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    let store = CaDir::init(&a.out, &a.consortium, a.algorithm.into(), a.days, a.force)?;
    let ca = store.ca();
    println!("created the {} consortium CA", ca.consortium());
    println!("  certificate:  {}", store.cert_path().display());
    println!(
        "  private key:  {} (mode 0600; keep it offline)",
        store.key_path().display()
    );
    println!("  index:        {}", store.index_path().display());
    println!("  CRL:          {}", store.crl_path().display());
    println!("  valid until:  {}", rfc3339(ca.not_after()));
    Ok(())
}

fn issue(a: IssueArgs) -> Result<()> {
    let principal = a.principal.principal()?;
    let store = CaDir::open(&a.ca)?;
    let recorder = a.audit.recorder(store.ca().consortium())?;
    let mut opts = LeafOptions::new(Validity::days_from_now(a.days));
    (opts.dns_names, opts.ip_addresses) = a.sans.granted(principal.role());
    opts.algorithm = a.algorithm.into();

    let stem = pki::file_stem(&principal);
    let cert_path = a.out.join(format!("{stem}.crt"));
    let key_path = a.out.join(format!("{stem}.key"));
    let ca_copy = a.out.join(CaDir::CERT_FILE);
    let ca_pem = store.ca().cert_pem();
    let copy_ca = !files::holds(&ca_copy, ca_pem.as_bytes());
    let mut targets = vec![cert_path.as_path(), key_path.as_path()];
    if copy_ca {
        targets.push(ca_copy.as_path());
    }
    if let Some(p12) = &a.pkcs12 {
        targets.push(p12.as_path());
    }
    files::refuse_existing(targets, a.force)?;
    // Asked before anything is issued, so that a mistyped passphrase changes nothing.
    let passphrase = match &a.pkcs12 {
        Some(_) => {
            let p = pkcs12_passphrase(a.pkcs12_passphrase_file.as_deref())?;
            let got = p.chars().count();
            if got < pki::pkcs12::MIN_PASSPHRASE_CHARS {
                bail!(
                    "the PKCS#12 passphrase has {got} characters; it needs at least {}: nothing was issued",
                    pki::pkcs12::MIN_PASSPHRASE_CHARS
                );
            }
            Some(p)
        }
        None => None,
    };
    files::ensure_dir(&a.out, true)?;

    let issued = store.issue(&principal, &opts)?;
    files::write_file(
        &key_path,
        issued.key_pem.as_bytes(),
        FileMode::Private,
        a.force,
    )?;
    files::write_file(
        &cert_path,
        issued.cert_pem.as_bytes(),
        FileMode::Public,
        a.force,
    )?;
    if copy_ca {
        files::write_file(&ca_copy, ca_pem.as_bytes(), FileMode::Public, a.force)?;
    }
    println!("issued a certificate for {}", issued.identity);
    println!("  serial:       {}", issued.serial_hex);
    print_validity(&opts.validity);
    print_sans(&opts.dns_names, &opts.ip_addresses);
    println!("  certificate:  {}", cert_path.display());
    println!("  private key:  {} (mode 0600)", key_path.display());
    println!("  CA:           {}", ca_copy.display());
    if let (Some(p12_path), Some(passphrase)) = (&a.pkcs12, passphrase) {
        let p12 = pki::pkcs12::to_pkcs12(
            &issued.cert_pem,
            &issued.key_pem,
            &ca_pem,
            &format!("{} ({})", issued.identity, issued.serial_hex),
            &passphrase,
        )?;
        files::write_file(p12_path, &p12, FileMode::Private, a.force)?;
        println!(
            "  PKCS#12:      {} (mode 0600, PBES2/AES-256)",
            p12_path.display()
        );
    }
    record(
        recorder,
        &format!(
            "the certificate for {} (serial {}) WAS issued and written to {}",
            issued.identity,
            issued.serial_hex,
            cert_path.display()
        ),
        || issued_event(&issued.cert_pem, &issued.identity),
    )
}

fn csr(a: CsrArgs) -> Result<()> {
    let principal = a.principal.principal()?;
    let identity = Identity::new(&a.consortium, principal.clone())?;
    let stem = pki::file_stem(&principal);
    let key_path = a.out.join(format!("{stem}.key"));
    let csr_path = a.out.join(format!("{stem}.csr"));
    files::refuse_existing([key_path.as_path(), csr_path.as_path()], a.force)?;
    files::ensure_dir(&a.out, true)?;
    let (csr_pem, key_pem) = pki::make_csr(&identity, a.algorithm.into(), &a.dns_names)?;
    files::write_file(&key_path, key_pem.as_bytes(), FileMode::Private, a.force)?;
    files::write_file(&csr_path, csr_pem.as_bytes(), FileMode::Public, a.force)?;
    println!("made a key and a CSR for {identity}");
    println!(
        "  CSR:          {} (send it to the CA operator)",
        csr_path.display()
    );
    println!(
        "  private key:  {} (mode 0600; it stays here)",
        key_path.display()
    );
    Ok(())
}

fn sign(a: SignArgs) -> Result<()> {
    let principal = a.principal.principal()?;
    files::refuse_existing([a.out.as_path()], a.force)?;
    let store = CaDir::open(&a.ca)?;
    let recorder = a.audit.recorder(store.ca().consortium())?;
    let csr_pem = files::read_text(&a.csr)?;
    let validity = Validity::days_from_now(a.days);
    let (dns_names, ip_addresses) = a.sans.granted(principal.role());
    let (cert_pem, serial) = store
        .sign_csr(&csr_pem, &principal, validity, &dns_names, &ip_addresses)
        .with_context(|| format!("refusing to sign {}", a.csr.display()))?;
    files::ensure_parent(&a.out)?;
    files::write_file(&a.out, cert_pem.as_bytes(), FileMode::Public, a.force)?;
    let identity = store.ca().identity_for(&principal)?;
    println!("signed a certificate for {identity}");
    println!("  serial:       {serial}");
    print_validity(&validity);
    print_sans(&dns_names, &ip_addresses);
    println!("  certificate:  {}", a.out.display());
    println!("  CA:           {}", store.cert_path().display());
    record(
        recorder,
        &format!(
            "the certificate for {identity} (serial {serial}) WAS issued and written to {}",
            a.out.display()
        ),
        || issued_event(&cert_pem, &identity),
    )
}

fn revoke(a: RevokeArgs) -> Result<()> {
    let store = CaDir::open(&a.ca)?;
    let recorder = a.audit.recorder(store.ca().consortium())?;
    let entry = store.revoke(&a.serial, a.reason.map(ReasonArg::as_str))?;
    println!("revoked {} ({})", entry.serial, entry.identity);
    if let Some(r) = &entry.revocation {
        println!("  at:           {}", rfc3339(r.revoked_at));
        println!(
            "  reason:       {}",
            r.reason.as_deref().unwrap_or("unspecified")
        );
    }
    println!(
        "  CRL:          {} refreshed; give it to every server",
        store.crl_path().display()
    );
    record(
        recorder,
        &format!(
            "the certificate of {} (serial {}) WAS revoked and {} refreshed",
            entry.identity,
            entry.serial,
            store.crl_path().display()
        ),
        || revoked_event(&store, &entry),
    )
}

fn crl(a: CrlArgs) -> Result<()> {
    let store = CaDir::open(&a.ca)?;
    let pem = store.write_crl(&a.out, a.next_update_days, a.force)?;
    match pki::describe(&pem)? {
        pki::Description::Crl(c) => {
            println!(
                "wrote CRL number {} to {}",
                c.crl_number.as_deref().unwrap_or("?"),
                a.out.display()
            );
            println!("  revoked:      {}", c.revoked.len());
            if let Some(next) = c.next_update {
                println!("  next update:  {}", rfc3339(next));
            }
        }
        _ => println!("wrote the CRL to {}", a.out.display()),
    }
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    for (i, path) in a.files.iter().enumerate() {
        let text = files::read_text(path)?;
        let descriptions =
            pki::describe_all(&text).with_context(|| format!("reading {}", path.display()))?;
        if i > 0 {
            println!();
        }
        println!("{}:", path.display());
        for (j, d) in descriptions.iter().enumerate() {
            if j > 0 {
                println!();
            }
            print!("{d}");
        }
    }
    Ok(())
}

impl PrincipalArgs {
    fn principal(&self) -> Result<Principal> {
        Principal::from_parts(self.role.into(), self.site.as_deref(), self.name.as_deref())
            .with_context(|| {
                let role = Role::from(self.role);
                format!(
                    "--role {role} takes {}",
                    match role {
                        Role::Coordinator | Role::Audit => "neither --site nor --name",
                        Role::Node => "--site SITE and no --name",
                        Role::User => "--site SITE and --name NAME",
                        Role::Operator => "--name NAME and no --site",
                    }
                )
            })
    }
}

impl SanArgs {
    /// The names granted: as given, or for servers given none, localhost on loopback.
    fn granted(&self, role: Role) -> (Vec<String>, Vec<IpAddr>) {
        if role.is_server() && self.dns_names.is_empty() && self.ip_addresses.is_empty() {
            return (
                vec!["localhost".to_string()],
                vec![
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
            );
        }
        (self.dns_names.clone(), self.ip_addresses.clone())
    }
}

fn print_validity(v: &Validity) {
    println!(
        "  valid:        {} to {}",
        rfc3339(v.not_before),
        rfc3339(v.not_after)
    );
}

fn print_sans(dns: &[String], ips: &[IpAddr]) {
    if !dns.is_empty() {
        println!("  DNS names:    {}", dns.join(", "));
    }
    if !ips.is_empty() {
        let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
        println!("  IP addresses: {}", ips.join(", "));
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The PKCS#12 passphrase: the first line of `file`, or asked twice on the terminal without echo.
fn pkcs12_passphrase(file: Option<&std::path::Path>) -> Result<String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--pkcs12-passphrase-file {}", file.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    let ask = |prompt: &str| -> Result<String> {
        use std::io::{BufRead as _, IsTerminal as _, Write as _};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            bail!(
                "--pkcs12 needs a passphrase: give --pkcs12-passphrase-file FILE, or run on a terminal to be asked"
            );
        }
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        // No echo while it is typed (stty on the controlling terminal; restored after).
        let echo = |on: bool| {
            let _ = std::process::Command::new("stty")
                .arg(if on { "echo" } else { "-echo" })
                .stdin(std::process::Stdio::inherit())
                .status();
        };
        echo(false);
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        echo(true);
        eprintln!();
        read?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let first = ask("PKCS#12 passphrase: ")?;
    if ask("again: ")? != first {
        bail!("the two passphrases differ; nothing was issued");
    }
    Ok(first)
}
