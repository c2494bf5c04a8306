//! Encryption at rest: round trips, every kind of tampering, rotation, KEK handling, and a scan
//! for plaintext on disk.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use tutela_privacy::at_rest::{
    AtRestError, DEFAULT_CHUNK_SIZE, EncryptOptions, EncryptedReader, EncryptedWriter,
    KeyEncryptionKey, LocalKek, MAX_CHUNK_SIZE, RotateOutcome, TEMP_PREFIX, decrypt_to_vec,
    decrypt_to_writer, encrypt_bytes, encrypt_file, rotate_dir, rotate_file,
};

const TAG: usize = 16;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new().fill(&mut v).expect("system RNG");
    v
}

fn random_kek() -> LocalKek {
    let mut k = [0u8; 32];
    SystemRandom::new().fill(&mut k).expect("system RNG");
    LocalKek::from_bytes(&k)
}

fn opts(chunk_size: u32) -> EncryptOptions {
    EncryptOptions { chunk_size }
}

/// Header length of a file written by `LocalKek` (60-byte wrapped key).
fn header_len(kek: &LocalKek) -> usize {
    32 + 1 + kek.id().len() + 2 + 60
}

/// Writes `data` through `EncryptedWriter` in pieces of irregular sizes, so that chunk
/// boundaries fall inside, at the start and at the end of `write` calls.
fn write_in_pieces(path: &Path, kek: &LocalKek, chunk: u32, data: &[u8]) {
    let mut w = EncryptedWriter::create_with(path, kek, opts(chunk)).expect("create writer");
    let pieces = [1usize, 3, 64, 7, 1000, 65536, 13];
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = pieces[i % pieces.len()].min(rest.len());
        w.write_all(&rest[..n]).expect("write");
        rest = &rest[n..];
        i += 1;
    }
    w.finish().expect("finish");
}

/// Reads through `EncryptedReader` with a small, odd buffer size.
fn read_in_pieces(path: &Path, kek: &LocalKek) -> Result<Vec<u8>, std::io::Error> {
    let mut r = EncryptedReader::open(path, kek).expect("open reader");
    let mut out = Vec::new();
    let mut buf = [0u8; 37];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn round_trip_sizes_around_chunk_boundaries_for_several_chunk_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let kek = random_kek();
    for chunk in [1u32, 7, 16, 1000, 4096, DEFAULT_CHUNK_SIZE] {
        let c = chunk as usize;
        let mut sizes = vec![0, 1, c.saturating_sub(1), c, c + 1, 3 * c, 5 * c + 3];
        sizes.sort_unstable();
        sizes.dedup();
        for len in sizes {
            let data = random_bytes(len);
            let path = dir.path().join(format!("f-{chunk}-{len}"));
            write_in_pieces(&path, &kek, chunk, &data);

            // The layout is what the format says: header, then max(1, ceil(len / C)) chunks
            // each with a 16-byte tag.
            let chunks = len.div_ceil(c).max(1);
            let on_disk = fs::metadata(&path).unwrap().len() as usize;
            assert_eq!(
                on_disk,
                header_len(&kek) + len + chunks * TAG,
                "chunk {chunk} len {len}"
            );

            assert_eq!(
                decrypt_to_vec(&path, &kek).unwrap(),
                data,
                "chunk {chunk} len {len}"
            );
            assert_eq!(
                read_in_pieces(&path, &kek).unwrap(),
                data,
                "chunk {chunk} len {len}"
            );
            let r = EncryptedReader::open(&path, &kek).unwrap();
            assert_eq!(r.chunk_size(), chunk);
            assert_eq!(r.kek_id(), kek.id());
        }
    }
}

#[test]
fn round_trip_many_chunks_and_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let kek = random_kek();
    // 48 default chunks and a partial one.
    let data = random_bytes(3 * 1024 * 1024 + 12345);
    let src = dir.path().join("plain.bin");
    fs::write(&src, &data).unwrap();
    let enc = dir.path().join("enc.bin");
    encrypt_file(&src, &enc, &kek, EncryptOptions::default()).unwrap();
    assert_eq!(decrypt_to_vec(&enc, &kek).unwrap(), data);
    let mut sink = Vec::new();
    assert_eq!(
        decrypt_to_writer(&enc, &kek, &mut sink).unwrap(),
        data.len() as u64
    );
    assert_eq!(sink, data);

    let enc2 = dir.path().join("enc2.bin");
    encrypt_bytes(&data, &enc2, &kek, opts(1 << 20)).unwrap();
    assert_eq!(decrypt_to_vec(&enc2, &kek).unwrap(), data);
    // Two encryptions of the same plaintext share nothing (fresh file id and data key).
    assert_ne!(
        fs::read(&enc).unwrap()[32..200],
        fs::read(&enc2).unwrap()[32..200]
    );
}

#[test]
fn invalid_chunk_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = random_kek();
    for bad in [0, MAX_CHUNK_SIZE + 1] {
        let err = EncryptedWriter::create_with(dir.path().join("x"), &kek, opts(bad)).unwrap_err();
        assert!(matches!(err, AtRestError::InvalidChunkSize { .. }), "{err}");
    }
}

/// A file of 64-byte chunks: 5 full chunks and a 20-byte last one.
struct Sample {
    _dir: tempfile::TempDir,
    path: PathBuf,
    kek: LocalKek,
    data: Vec<u8>,
    bytes: Vec<u8>,
    hlen: usize,
}

const C: usize = 64;

impl Sample {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kek = random_kek();
        let data = random_bytes(5 * C + 20);
        let path = dir.path().join("sample.enc");
        encrypt_bytes(&data, &path, &kek, opts(C as u32)).unwrap();
        let bytes = fs::read(&path).unwrap();
        let hlen = header_len(&kek);
        assert_eq!(bytes.len(), hlen + data.len() + 6 * TAG);
        Self {
            _dir: dir,
            path,
            kek,
            data,
            bytes,
            hlen,
        }
    }

    /// Byte range of ciphertext chunk `i` (with its tag).
    fn chunk(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.hlen + i * (C + TAG);
        start..(start + C + TAG).min(self.bytes.len())
    }

    fn write(&self, bytes: &[u8]) {
        fs::write(&self.path, bytes).unwrap();
    }

    /// Reading must fail, the error must name the file, and the streaming reader must hand out
    /// only a prefix of the real plaintext made of whole chunks that authenticated.
    fn assert_refused(&self, what: &str) -> AtRestError {
        let err = decrypt_to_vec(&self.path, &self.kek)
            .map(|_| ())
            .expect_err(&format!("{what}: a modified file was accepted"));
        let msg = err.to_string();
        assert!(
            msg.contains(&self.path.display().to_string()),
            "{what}: error does not name the file: {msg}"
        );
        if let Ok(mut r) = EncryptedReader::open(&self.path, &self.kek) {
            let mut got = Vec::new();
            let mut buf = [0u8; 10];
            let e = loop {
                match r.read(&mut buf) {
                    Ok(0) => panic!("{what}: streaming reader reached EOF on a modified file"),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break e,
                }
            };
            assert!(
                got.len() % C == 0,
                "{what}: reader handed out part of a chunk"
            );
            assert_eq!(
                got,
                self.data[..got.len()],
                "{what}: reader handed out wrong bytes"
            );
            // The io::Error carries our error, and the reader stays failed.
            let inner = e.into_inner().expect("inner error");
            assert!(
                inner.downcast_ref::<AtRestError>().is_some(),
                "{what}: {inner}"
            );
            assert!(
                r.read(&mut buf).is_err(),
                "{what}: reader recovered after a failure"
            );
        }
        err
    }
}

#[test]
fn a_flipped_bit_in_any_header_byte_is_refused() {
    let s = Sample::new();
    for i in 0..s.hlen {
        let mut b = s.bytes.clone();
        b[i] ^= 1 << (i % 8);
        s.write(&b);
        s.assert_refused(&format!("header byte {i}"));
    }
}

#[test]
fn a_flipped_bit_in_any_chunk_or_tag_byte_is_refused_with_the_chunk_named() {
    let s = Sample::new();
    for i in s.hlen..s.bytes.len() {
        let mut b = s.bytes.clone();
        b[i] ^= 0x80 >> (i % 8);
        s.write(&b);
        let err = s.assert_refused(&format!("byte {i}"));
        let chunk = ((i - s.hlen) / (C + TAG)) as u64;
        match err {
            AtRestError::ChunkAuthentication { index, last, .. } => {
                assert_eq!(index, chunk, "byte {i}");
                assert_eq!(last, chunk == 5, "byte {i}");
            }
            other => panic!("byte {i}: unexpected error {other}"),
        }
    }
}

#[test]
fn swapped_chunks_are_refused() {
    let s = Sample::new();
    for (a, b) in [(0, 1), (1, 2), (3, 4)] {
        let mut bytes = s.bytes.clone();
        let (ra, rb) = (s.chunk(a), s.chunk(b));
        let ca = s.bytes[ra.clone()].to_vec();
        bytes[ra].copy_from_slice(&s.bytes[rb.clone()]);
        bytes[rb].copy_from_slice(&ca);
        s.write(&bytes);
        let err = s.assert_refused(&format!("swap {a} {b}"));
        assert!(
            matches!(err, AtRestError::ChunkAuthentication { index, .. } if index == a as u64),
            "{err}"
        );
    }
}

#[test]
fn truncation_is_refused() {
    let s = Sample::new();
    // The last chunk dropped: chunk 4 is now last but was not sealed as final.
    s.write(&s.bytes[..s.chunk(5).start]);
    let err = s.assert_refused("last chunk dropped");
    assert!(
        matches!(
            err,
            AtRestError::ChunkAuthentication {
                index: 4,
                last: true,
                ..
            }
        ),
        "{err}"
    );
    // The last two chunks dropped, cut inside a chunk, inside a tag, right after the header,
    // inside the header, and an empty file.
    for cut in [
        s.chunk(4).start,
        s.chunk(2).start + 10,
        s.chunk(5).end - 1,
        s.hlen + 5,
        s.hlen,
        s.hlen - 1,
        20,
        0,
    ] {
        s.write(&s.bytes[..cut]);
        s.assert_refused(&format!("cut at {cut}"));
    }
}

#[test]
fn truncation_of_an_exact_multiple_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = random_kek();
    let path = dir.path().join("exact");
    encrypt_bytes(&random_bytes(4 * C), &path, &kek, opts(C as u32)).unwrap();
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - (C + TAG)]).unwrap();
    let err = decrypt_to_vec(&path, &kek).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(
        matches!(err, AtRestError::ChunkAuthentication { index: 2, .. }),
        "{err}"
    );
}

#[test]
fn extension_is_refused() {
    let s = Sample::new();
    let last = s.bytes[s.chunk(5)].to_vec();
    let mid = s.bytes[s.chunk(2)].to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "last chunk duplicated",
            [s.bytes.clone(), last.clone()].concat(),
        ),
        (
            "middle chunk appended",
            [s.bytes.clone(), mid.clone()].concat(),
        ),
        ("one byte appended", [s.bytes.clone(), vec![0]].concat()),
        (
            "a tag's worth appended",
            [s.bytes.clone(), vec![0; TAG]].concat(),
        ),
        (
            "random chunk appended",
            [s.bytes.clone(), random_bytes(C + TAG)].concat(),
        ),
        (
            "middle chunk duplicated in place",
            [
                &s.bytes[..s.chunk(3).start],
                &mid[..],
                &s.bytes[s.chunk(3).start..],
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        s.write(&bytes);
        s.assert_refused(what);
    }
}

#[test]
fn a_header_or_key_slot_from_another_file_is_refused() {
    let s = Sample::new();
    let other = s.path.with_file_name("other.enc");
    encrypt_bytes(&random_bytes(5 * C + 20), &other, &s.kek, opts(C as u32)).unwrap();
    let ob = fs::read(&other).unwrap();

    // Whole header of the other file (its data key unwraps fine) on this file's chunks.
    s.write(&[&ob[..s.hlen], &s.bytes[s.hlen..]].concat());
    let err = s.assert_refused("header swapped");
    assert!(
        matches!(err, AtRestError::ChunkAuthentication { index: 0, .. }),
        "{err}"
    );

    // Only the KEK id and wrapped key of the other file: the wrap is bound to the file id.
    s.write(&[&s.bytes[..32], &ob[32..s.hlen], &s.bytes[s.hlen..]].concat());
    let err = s.assert_refused("key slot swapped");
    assert!(
        matches!(err, AtRestError::HeaderAuthentication { .. }),
        "{err}"
    );
}

#[test]
fn the_wrong_kek_is_refused_with_a_clear_message() {
    let s = Sample::new();
    let wrong = random_kek();
    let err = decrypt_to_vec(&s.path, &wrong).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AtRestError::WrongKek { .. }), "{msg}");
    assert!(
        msg.contains(&format!(
            "the data key does not unwrap under KEK {}",
            wrong.id()
        )),
        "{msg}"
    );
    assert!(msg.contains(s.kek.id()), "{msg}");
    assert!(msg.contains(&s.path.display().to_string()), "{msg}");

    // A header relabelled with the offered KEK's id: the unwrap itself must fail, and say so.
    let mut b = s.bytes.clone();
    let id_range = 33..33 + s.kek.id().len();
    assert_eq!(wrong.id().len(), id_range.len());
    b[id_range].copy_from_slice(wrong.id().as_bytes());
    s.write(&b);
    let err = decrypt_to_vec(&s.path, &wrong).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, AtRestError::HeaderAuthentication { .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "the data key does not unwrap under KEK {}",
            wrong.id()
        )),
        "{msg}"
    );
}

#[test]
fn rotation_rewraps_keys_and_keeps_the_data_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, third) = (random_kek(), random_kek(), random_kek());
    fs::create_dir(dir.path().join("sub")).unwrap();
    let mut files = Vec::new();
    for (i, name) in ["a", "b", "sub/c", "sub/d"].iter().enumerate() {
        let p = dir.path().join(name);
        let data = random_bytes(i * 100_000 + 3);
        encrypt_bytes(&data, &p, &old, opts(4096)).unwrap();
        files.push((p, data));
    }
    fs::write(dir.path().join("sub/notes.txt"), b"not encrypted").unwrap();
    let foreign = dir.path().join("foreign");
    encrypt_bytes(
        b"under a third KEK",
        &foreign,
        &third,
        EncryptOptions::default(),
    )
    .unwrap();
    let before: Vec<Vec<u8>> = files.iter().map(|(p, _)| fs::read(p).unwrap()).collect();

    let report = rotate_dir(dir.path(), &old, &new).unwrap();
    assert_eq!(report.rotated, 4);
    assert_eq!(report.already_current, 0);
    assert_eq!(report.not_encrypted, vec![dir.path().join("sub/notes.txt")]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, foreign);
    assert!(matches!(report.failed[0].1, AtRestError::WrongKek { .. }));
    assert!(!report.is_complete());

    let hlen = header_len(&old);
    for ((p, data), before) in files.iter().zip(&before) {
        assert_eq!(&decrypt_to_vec(p, &new).unwrap(), data);
        let err = decrypt_to_vec(p, &old).unwrap_err();
        assert!(matches!(err, AtRestError::WrongKek { .. }), "{err}");
        // Chunks copied byte for byte: the data was not re-encrypted.
        let after = fs::read(p).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(after[..32], before[..32], "fixed header changed");
        assert_ne!(after[32..hlen], before[32..hlen], "key slot not rewritten");
        assert_eq!(after[hlen..], before[hlen..], "chunks changed");
    }
    // Rerun: everything already current; nothing left behind.
    let again = rotate_dir(dir.path(), &old, &new).unwrap();
    assert_eq!((again.rotated, again.already_current), (0, 4));
    assert_eq!(
        rotate_file(&files[0].0, &old, &new).unwrap(),
        RotateOutcome::AlreadyCurrent
    );
    assert_no_temp_files(dir.path());
}

#[test]
fn rotation_with_the_wrong_old_kek_fails_and_changes_nothing() {
    let s = Sample::new();
    let (wrong, new) = (random_kek(), random_kek());
    let err = rotate_file(&s.path, &wrong, &new).unwrap_err();
    assert!(matches!(err, AtRestError::WrongKek { .. }), "{err}");
    assert_eq!(fs::read(&s.path).unwrap(), s.bytes);
    assert_eq!(decrypt_to_vec(&s.path, &s.kek).unwrap(), s.data);
}

fn assert_no_temp_files(dir: &Path) {
    for f in walk(dir) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(TEMP_PREFIX),
            "temp file left behind: {}",
            f.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn key_files_readable_by_group_or_others_are_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek.key");
    let kek = LocalKek::generate_key_file(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(LocalKek::from_key_file(&path).unwrap().id(), kek.id());
    // Never overwrite an existing key.
    assert!(LocalKek::generate_key_file(&path).is_err());

    for mode in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = LocalKek::from_key_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, AtRestError::KeyFilePermissions { .. }),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert_eq!(LocalKek::from_key_file(&path).unwrap().id(), kek.id());
}

#[test]
fn key_file_formats_env_and_location() {
    let dir = tempfile::tempdir().unwrap();
    let raw = random_bytes(32);
    let expected = LocalKek::from_bytes(&raw.clone().try_into().unwrap());
    let write_key = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let hex_text = format!("{}\n", hex::encode(&raw));
    for p in [
        write_key("raw", &raw),
        write_key("hex", hex_text.as_bytes()),
    ] {
        assert_eq!(LocalKek::from_key_file(&p).unwrap().id(), expected.id());
    }
    let bad = write_key("bad", b"not a key\n");
    let err = LocalKek::from_key_file(&bad).unwrap_err();
    assert!(matches!(err, AtRestError::KeyFileFormat { .. }), "{err}");
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{err}"
    );

    // A key inside the data directory is refused; outside it is fine.
    let data_dir = dir.path().join("data");
    fs::create_dir(&data_dir).unwrap();
    let inside = data_dir.join("kek");
    fs::write(&inside, &raw).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o600)).unwrap();
    let err = LocalKek::from_key_file_outside(&inside, &data_dir).unwrap_err();
    assert!(matches!(err, AtRestError::KeyInsideDataDir { .. }), "{err}");
    let outside = dir.path().join("raw");
    assert_eq!(
        LocalKek::from_key_file_outside(&outside, &data_dir)
            .unwrap()
            .id(),
        expected.id()
    );

    // Environment variable, hex. (Set and read in this test only, under a unique name.)
    let var = "TUTELA_TEST_AT_REST_KEK_7f3a";
    // SAFETY: no other thread in this test binary reads or writes this variable.
    unsafe { std::env::set_var(var, hex::encode(&raw)) };
    assert_eq!(LocalKek::from_env(var).unwrap().id(), expected.id());
    unsafe { std::env::set_var(var, "short") };
    assert!(matches!(
        LocalKek::from_env(var),
        Err(AtRestError::KeyEnv { .. })
    ));
    unsafe { std::env::remove_var(var) };
    assert!(matches!(
        LocalKek::from_env(var),
        Err(AtRestError::KeyEnv { .. })
    ));
}

#[test]
fn no_plaintext_reaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let kek = random_kek();
    let marker = b"PATIENT-RECORD-4711;diagnosis=confidential;";
    let mut plain = Vec::new();
    while plain.len() < 300_000 {
        plain.extend_from_slice(marker);
        plain.extend_from_slice(&random_bytes(100));
    }
    // Needles: the marker, and 32-byte windows of the random part spread through the data.
    let mut needles: Vec<Vec<u8>> = vec![marker.to_vec()];
    for i in (0..plain.len() - 32).step_by(7919) {
        needles.push(plain[i..i + 32].to_vec());
    }
    let scan = |when: &str| {
        for f in walk(dir.path()) {
            let bytes = fs::read(&f).unwrap();
            for n in &needles {
                assert!(
                    !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                    "{when}: plaintext found in {}",
                    f.display()
                );
            }
        }
    };

    // Mid-write: the temporary file holds whole chunks so far, all ciphertext.
    let target = dir.path().join("records.enc");
    let mut w = EncryptedWriter::create(&target, &kek).unwrap();
    w.write_all(&plain[..200_000]).unwrap();
    assert_eq!(walk(dir.path()).len(), 1, "expected one temporary file");
    scan("during write");
    w.write_all(&plain[200_000..]).unwrap();
    w.finish().unwrap();
    scan("after finish");

    // An abandoned writer leaves nothing, and does not touch the existing target.
    let mut w = EncryptedWriter::create(&target, &kek).unwrap();
    w.write_all(&plain[..150_000]).unwrap();
    drop(w);
    assert_no_temp_files(dir.path());
    assert_eq!(decrypt_to_vec(&target, &kek).unwrap(), plain);

    // Small files and rotation too.
    encrypt_bytes(marker, dir.path().join("small.enc"), &kek, opts(16)).unwrap();
    rotate_dir(dir.path(), &kek, &random_kek()).unwrap();
    scan("after rotation");
    // The scan can fail: a plaintext file is found.
    fs::write(dir.path().join("leak"), &plain[..1000]).unwrap();
    let caught = std::panic::catch_unwind(|| scan("control")).is_err();
    assert!(caught, "the scan did not find plaintext written on purpose");
}
