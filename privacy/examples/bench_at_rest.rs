//! Throughput of encryption at rest, single thread, against `openssl speed`.
//!
//! ```text
//! cargo run --release -p tutela-privacy --example bench_at_rest [DIR] [MiB]
//! ```
//!
//! Streams MiB (default 1024) of random-looking data through `EncryptedWriter` into a file in DIR
//! (default: the system temp dir; nothing plaintext is written), reads it back through
//! `EncryptedReader`, and reports MB/s (10^6 bytes/s, as openssl does) for:
//! - the crypto alone: sealing/opening 64 KiB chunks in memory with the same key, nonce and AAD
//!   layout as the file format (comparable with `openssl speed`, which is also in-memory);
//! - the file path end to end (encrypt includes write + fsync; decrypt reads from the page cache
//!   when the file fits in RAM).
//!
//! Then runs `openssl speed -evp aes-256-gcm -bytes 65536 -seconds 3` if `openssl` is on PATH
//! and prints the ratios (target: >= 70 % of OpenSSL).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use tutela_privacy::at_rest::{
    DEFAULT_CHUNK_SIZE, EncryptOptions, EncryptedReader, EncryptedWriter, LocalKek,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let mib: u64 = match args.next() {
        Some(s) => s.parse()?,
        None => 1024,
    };
    let total = mib << 20;
    let rng = SystemRandom::new();
    let mut key = [0u8; 32];
    rng.fill(&mut key).map_err(|_| "rng")?;
    let kek = LocalKek::from_bytes(&key);
    let mut block = vec![0u8; 1 << 20];
    rng.fill(&mut block).map_err(|_| "rng")?;

    // 1. Crypto only, in memory, the format's chunk layout.
    let chunk = DEFAULT_CHUNK_SIZE as usize;
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).map_err(|_| "key")?);
    let aad = [7u8; 32];
    let mut buf = block[..chunk].to_vec();
    let n_chunks = total / chunk as u64;
    let mut tags = Vec::with_capacity(n_chunks as usize);
    let t = Instant::now();
    for i in 0..n_chunks {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&i.to_be_bytes());
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .map_err(|_| "seal")?;
        tags.push(tag);
    }
    let seal_mbs = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    // Open the same buffer back through the chain of seals, in reverse.
    let t = Instant::now();
    for i in (0..n_chunks).rev() {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&i.to_be_bytes());
        aead.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            tags[i as usize],
            &mut buf,
            0..,
        )
        .map_err(|_| "open")?;
    }
    let open_mbs = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    if buf != block[..chunk] {
        return Err("in-memory round trip mismatch".into());
    }

    // 2. End to end through the file API.
    let path = dir.join(format!("tutela-bench-at-rest-{}.enc", std::process::id()));
    let t = Instant::now();
    let mut w = EncryptedWriter::create_with(&path, &kek, EncryptOptions::default())?;
    for _ in 0..mib {
        w.write_all(&block)?;
    }
    let write_s = t.elapsed().as_secs_f64();
    w.finish()?;
    let enc_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut r = EncryptedReader::open(&path, &kek)?;
    let mut out = vec![0u8; 1 << 20];
    let mut read = 0u64;
    let mut first_mismatch = None;
    loop {
        let n = r.read(&mut out)?;
        if n == 0 {
            break;
        }
        // Spot-check content without a second full pass.
        let off = (read % (1 << 20)) as usize;
        if n <= block.len() - off && out[..n] != block[off..off + n] && first_mismatch.is_none() {
            first_mismatch = Some(read);
        }
        read += n as u64;
    }
    let dec_s = t.elapsed().as_secs_f64();
    let file_len = std::fs::metadata(&path)?.len();
    std::fs::remove_file(&path)?;
    if read != total || first_mismatch.is_some() {
        return Err(format!(
            "file round trip mismatch: read {read} of {total}, {first_mismatch:?}"
        )
        .into());
    }
    let enc_mbs = total as f64 / enc_s / 1e6;
    let dec_mbs = total as f64 / dec_s / 1e6;

    // 3. The ceiling of any writer on this file system: the same bytes, unencrypted, written
    // and fsynced the same way. Encrypting to a file cannot beat it, whatever the cipher.
    let plain_path = dir.join(format!("tutela-bench-at-rest-{}.plain", std::process::id()));
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&plain_path)?;
        for _ in 0..mib {
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let plain_mbs = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(&plain_path)?;

    println!(
        "payload: {mib} MiB, chunk {} KiB, file {} bytes in {}",
        chunk / 1024,
        file_len,
        dir.display()
    );
    println!(
        "ring AES-256-GCM, in memory, 64 KiB chunks: seal {seal_mbs:8.0} MB/s   open {open_mbs:8.0} MB/s"
    );
    println!("EncryptedWriter -> file (incl. fsync):      {enc_mbs:8.0} MB/s");
    println!(
        "  of which write() calls (encrypt + page cache): {:8.0} MB/s; finish (fsync + rename): {:.2} s",
        total as f64 / write_s / 1e6,
        enc_s - write_s
    );
    println!("EncryptedReader <- file:                    {dec_mbs:8.0} MB/s");
    println!(
        "plain write of the same bytes (incl. fsync):  {plain_mbs:8.0} MB/s; encrypted write is {:.0} % of it",
        100.0 * enc_mbs / plain_mbs
    );

    match openssl_speed() {
        Some(ossl) => {
            println!("openssl speed -evp aes-256-gcm -bytes 65536: {ossl:8.0} MB/s");
            println!(
                "ratio to openssl: crypto seal {:.0} %, open {:.0} %; file encrypt {:.0} %, decrypt {:.0} % (target >= 70 %); a plain write {:.0} %",
                100.0 * seal_mbs / ossl,
                100.0 * open_mbs / ossl,
                100.0 * enc_mbs / ossl,
                100.0 * dec_mbs / ossl,
                100.0 * plain_mbs / ossl
            );
        }
        None => println!("openssl not found or its output not understood: no comparison"),
    }
    Ok(())
}

/// Runs `openssl speed` and returns its aes-256-gcm figure in MB/s (10^6 bytes/s). openssl prints
/// "The 'numbers' are in 1000s of bytes per second processed." and a line such as
/// `AES-256-GCM    4123456.78k`.
fn openssl_speed() -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-gcm",
            "-bytes",
            "65536",
            "-seconds",
            "3",
        ])
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| {
        l.trim_start()
            .to_ascii_lowercase()
            .starts_with("aes-256-gcm")
    })?;
    let last = line.split_whitespace().last()?;
    let kbytes: f64 = last.trim_end_matches('k').parse().ok()?;
    Some(kbytes * 1000.0 / 1e6)
}
