//! The transport benchmark behind `tutela bench transport`: a model file of a given size goes up
//! and down through the `ModelExchange` gRPC stream over loopback mutual TLS, beside a raw rustls
//! TLS 1.3 copy of the same bytes (the practical ceiling), in one run.
//!
//! The server runs in a child process (the same executable, started with the hidden
//! `bench transport-server` command) so that its resident memory can be read from `/proc` on its
//! own: the receiver's memory growth during an upload is the server's, during a download the
//! benchmark's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{self, ClientTls};
use crate::identity::Principal;
use crate::pb::{DownloadRequest, model_exchange_client::ModelExchangeClient};
use crate::pki::{CertificateAuthority, KeyAlgorithm, LeafOptions, Validity};
use crate::services::DirModelStore;
use crate::stream::{self, SafetensorsFileSink, SafetensorsFileSource};
use crate::tensor::{DType, Manifest, TensorSpec};
use crate::tls::{ReloadingServerConfig, TlsFiles, TlsMaterial};

/// Resident set size of a process, from `/proc/<pid>/status` (bytes).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Samples a process's RSS every 10 ms until stopped; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    p.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler { stop, peak, handle }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Writes a safetensors model of about `bytes` bytes: float32 tensors of 16 MiB filled with a
/// cheap pseudo-random pattern (incompressible enough; TLS does not compress anyway).
pub fn write_model(path: &Path, bytes: u64) -> std::io::Result<Manifest> {
    const TENSOR: u64 = 16 << 20;
    let count = bytes.div_ceil(TENSOR).max(1);
    let specs: Vec<TensorSpec> = (0..count)
        .map(|i| {
            let len = TENSOR.min(bytes - i * TENSOR).max(4);
            TensorSpec::new(format!("layers.{i}.weight"), DType::F32, vec![len / 4])
        })
        .collect();
    let manifest = Manifest::new(specs, Default::default()).map_err(std::io::Error::other)?;
    let header = manifest
        .safetensors_header()
        .map_err(std::io::Error::other)?;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    f.write_all(&header)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = manifest.total_bytes();
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(manifest)
}

/// One direction's measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Transfer {
    pub what: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    /// Growth of the receiving process's resident memory over its level before the transfer.
    pub receiver_rss_growth_mib: Option<f64>,
}

impl Transfer {
    fn new(what: &str, bytes: u64, elapsed: Duration, rss_growth: Option<u64>) -> Self {
        let seconds = elapsed.as_secs_f64();
        Transfer {
            what: what.to_string(),
            bytes,
            seconds,
            mb_per_s: bytes as f64 / seconds / 1e6,
            receiver_rss_growth_mib: rss_growth.map(|b| b as f64 / (1024.0 * 1024.0)),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TransportReport {
    pub model_bytes: u64,
    pub raw_tls: Transfer,
    pub grpc_upload: Transfer,
    pub grpc_download: Transfer,
    pub upload_vs_raw: f64,
    pub download_vs_raw: f64,
}

impl std::fmt::Display for TransportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model: {:.2} GiB ({} bytes)",
            self.model_bytes as f64 / (1u64 << 30) as f64,
            self.model_bytes
        )?;
        writeln!(
            f,
            "{:<34} {:>10} {:>10} {:>22}",
            "transfer", "seconds", "MB/s", "receiver RSS growth"
        )?;
        for t in [&self.raw_tls, &self.grpc_upload, &self.grpc_download] {
            let rss = t
                .receiver_rss_growth_mib
                .map(|m| format!("{m:.1} MiB"))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<34} {:>10.2} {:>10.0} {:>22}",
                t.what, t.seconds, t.mb_per_s, rss
            )?;
        }
        writeln!(
            f,
            "gRPC upload / raw TLS: {:.0}%   gRPC download / raw TLS: {:.0}%",
            self.upload_vs_raw * 100.0,
            self.download_vs_raw * 100.0
        )
    }
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The faster of two measurements of the same transfer, with the larger memory growth.
fn best(a: Option<Transfer>, b: Transfer) -> Transfer {
    match a {
        None => b,
        Some(a) => {
            let rss = match (a.receiver_rss_growth_mib, b.receiver_rss_growth_mib) {
                (Some(x), Some(y)) => Some(x.max(y)),
                (x, y) => x.or(y),
            };
            let mut t = if a.seconds <= b.seconds { a } else { b };
            t.receiver_rss_growth_mib = rss;
            t
        }
    }
}

/// A raw rustls TLS 1.3 copy of the model file's bytes to the sink port: the ceiling.
async fn raw_copy(tls: &ClientTls, port: u16, model_path: &Path) -> BenchResult<Transfer> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let mut s = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect("localhost".try_into()?, tcp)
        .await?;
    let mut file = tokio::fs::File::open(model_path).await?;
    let mut buf = vec![0u8; 4 << 20];
    let start = Instant::now();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    s.flush().await?;
    s.get_mut().0.shutdown().await.ok();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    Ok(Transfer::new(
        "raw rustls TLS 1.3 copy",
        u64::from_le_bytes(count),
        start.elapsed(),
        None,
    ))
}

type Client = ModelExchangeClient<tonic::transport::Channel>;

/// Uploads the model file; the receiver is the server process `server_pid`.
async fn upload(
    client: &mut Client,
    model_path: &Path,
    model_bytes: u64,
    server_pid: u32,
) -> BenchResult<(Transfer, String)> {
    let sampler = RssSampler::start(server_pid);
    let before = rss_bytes(server_pid).unwrap_or(0);
    let start = Instant::now();
    let (frames, err) = stream::send_for_upload(SafetensorsFileSource::open(model_path)?);
    let receipt = client.upload(frames).await?.into_inner();
    let elapsed = start.elapsed();
    let peak = sampler.finish();
    if let Some(e) = err.lock().map_err(|_| "poisoned")?.take() {
        return Err(e.into());
    }
    Ok((
        Transfer::new(
            "gRPC ModelExchange.Upload (mTLS)",
            model_bytes,
            elapsed,
            Some(peak.saturating_sub(before)),
        ),
        receipt.model_id,
    ))
}

/// Downloads a model into a file; the receiver is this process.
async fn download(
    client: &mut Client,
    model_id: &str,
    work_dir: &Path,
    model_bytes: u64,
) -> BenchResult<Transfer> {
    let me = std::process::id();
    let sampler = RssSampler::start(me);
    let before = rss_bytes(me).unwrap_or(0);
    let start = Instant::now();
    let frames = client
        .download(DownloadRequest {
            model_id: model_id.to_string(),
        })
        .await?
        .into_inner();
    let out: PathBuf = work_dir.join("downloaded.safetensors");
    let received = stream::receive(frames, SafetensorsFileSink::at(&out)).await?;
    let elapsed = start.elapsed();
    let peak = sampler.finish();
    if received.digest_hex() != model_id {
        return Err("the downloaded model's digest differs from the uploaded one".into());
    }
    Ok(Transfer::new(
        "gRPC ModelExchange.Download (mTLS)",
        model_bytes,
        elapsed,
        Some(peak.saturating_sub(before)),
    ))
}

/// Makes a throwaway CA with a coordinator (server) and a node (client) certificate in `dir`.
fn make_certs(dir: &Path) -> Result<(TlsFiles, TlsFiles), Box<dyn std::error::Error>> {
    let ca =
        CertificateAuthority::create("bench", KeyAlgorithm::EcdsaP256, Validity::days_from_now(1))?;
    let mut server_opts = LeafOptions::new(Validity::days_from_now(1));
    server_opts.dns_names = vec!["localhost".into()];
    let server = ca.issue(&Principal::Coordinator, &server_opts)?;
    let node = ca.issue(
        &Principal::Node {
            site: "bench".into(),
        },
        &LeafOptions::new(Validity::days_from_now(1)),
    )?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    for (stem, issued) in [("server", &server), ("client", &node)] {
        std::fs::write(dir.join(format!("{stem}.crt")), &issued.cert_pem)?;
        std::fs::write(dir.join(format!("{stem}.key")), &issued.key_pem)?;
    }
    Ok((
        TlsFiles::in_dir(dir, "server"),
        TlsFiles::in_dir(dir, "client"),
    ))
}

/// The child process: a `ModelExchange` server and a raw TLS sink on two loopback ports. Prints
/// `READY <grpc port> <raw port>` once listening, and runs until killed.
pub async fn run_transport_server(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let tls = ReloadingServerConfig::load(TlsFiles::in_dir(dir, "server"))?;
    let store = DirModelStore::open(dir.join("server-models"))?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "READY {} {}",
        grpc.local_addr()?.port(),
        raw.local_addr()?.port()
    );
    let raw_config = tls.current();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = raw.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(raw_config.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_le_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let router = crate::server::builder().add_service(store.into_service());
    crate::server::serve(router, grpc, tls, std::future::pending()).await?;
    Ok(())
}

/// Runs the whole benchmark with a model of `bytes` bytes in `work_dir`. `exe` is the executable
/// that provides `bench transport-server`.
pub async fn run_transport_bench(
    exe: &Path,
    work_dir: &Path,
    bytes: u64,
    repeats: u32,
) -> Result<TransportReport, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(work_dir)?;
    let (_server_files, client_files) = make_certs(work_dir)?;
    let model_path = work_dir.join("model.safetensors");
    let manifest = write_model(&model_path, bytes)?;
    let model_bytes = manifest.total_bytes();

    let mut child = tokio::process::Command::new(exe)
        .args(["bench", "transport-server", "--dir"])
        .arg(work_dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let child_pid = child.id().ok_or("the server process exited at once")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8(line)?;
    let mut parts = line.split_whitespace().skip(1);
    let grpc_port: u16 = parts.next().ok_or("no port")?.parse()?;
    let raw_port: u16 = parts.next().ok_or("no port")?.parse()?;

    let material = TlsMaterial::load(&client_files)?;
    let tls = ClientTls::from_material(&material, None)?;
    let channel = client::connect(&format!("localhost:{grpc_port}"), tls.clone()).await?;
    let mut client = ModelExchangeClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES);

    // Each transfer runs `repeats` times, interleaved, so that a burst of other load on the
    // machine hits all three alike; the best time of each is reported (and the largest memory
    // growth, to be conservative).
    let mut raw_tls: Option<Transfer> = None;
    let mut grpc_upload: Option<Transfer> = None;
    let mut grpc_download: Option<Transfer> = None;
    for _ in 0..repeats.max(1) {
        let raw = raw_copy(&tls, raw_port, &model_path).await?;
        let (up, model_id) = upload(&mut client, &model_path, model_bytes, child_pid).await?;
        let down = download(&mut client, &model_id, work_dir, model_bytes).await?;
        raw_tls = Some(best(raw_tls, raw));
        grpc_upload = Some(best(grpc_upload, up));
        grpc_download = Some(best(grpc_download, down));
    }
    let _ = child.kill().await;
    let (raw_tls, grpc_upload, grpc_download) = (
        raw_tls.ok_or("no run")?,
        grpc_upload.ok_or("no run")?,
        grpc_download.ok_or("no run")?,
    );

    Ok(TransportReport {
        model_bytes,
        upload_vs_raw: grpc_upload.mb_per_s / raw_tls.mb_per_s,
        download_vs_raw: grpc_download.mb_per_s / raw_tls.mb_per_s,
        raw_tls,
        grpc_upload,
        grpc_download,
    })
}
