//! Streaming encryption and decryption: one chunk in memory at a time.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::error::AtRestError;
use super::format::{FILE_ID_LEN, FIXED_LEN, Header, MAX_CHUNK_SIZE, TAG_LEN, chunk_nonce};
use super::kek::{DataKey, KeyEncryptionKey};

/// Default plaintext bytes per chunk: 64 KiB.
///
/// Why 64 KiB: the per-chunk cost (16-byte tag = 0.02 % of space, one nonce setup, one `write`
/// system call) is amortised to noise while a chunk still fits in L2 cache, so the bytes are
/// encrypted and written while cache-hot; AES-GCM throughput reaches its plateau well below
/// 64 KiB (it is also the block size of the `openssl speed` figure we compare with); and a reader
/// or writer holds only ~64 KiB of memory. Larger chunks buy nothing measurable and make the
/// smallest unit of verified data coarser; smaller ones pay syscall and tag overhead.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Prefix of the temporary files the writer and rotation create next to their targets; a
/// directory scan ([`rotate_dir`](super::rotate_dir)) skips them.
pub const TEMP_PREFIX: &str = ".tutela-tmp-";

/// Options of a new encrypted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptOptions {
    /// Plaintext bytes per chunk, 1 ..= [`MAX_CHUNK_SIZE`]; default [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: u32,
}

impl Default for EncryptOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

fn chunk_key(key: &DataKey) -> LessSafeKey {
    match UnboundKey::new(&AES_256_GCM, key.as_bytes()) {
        Ok(k) => LessSafeKey::new(k),
        // Only a wrong key length fails, and `DataKey` is always 32 bytes.
        Err(_) => panic!("AES-256 key of 32 bytes rejected by ring"),
    }
}

/// Writes an encrypted file, chunk by chunk, through [`std::io::Write`].
///
/// Bytes go to a temporary file (mode 0600) in the target's directory, and only ciphertext is
/// ever written to it. [`finish`](Self::finish) seals the final chunk, fsyncs, renames the
/// temporary file over the target and fsyncs the directory, so the target is either the old file
/// or the complete new one, never a partial one. Dropping the writer without `finish` deletes the
/// temporary file and leaves the target untouched.
pub struct EncryptedWriter {
    path: PathBuf,
    temp: Option<tempfile::NamedTempFile>,
    key: LessSafeKey,
    aad: [u8; FIXED_LEN],
    chunk_size: usize,
    /// `chunk_size + TAG_LEN` bytes: plaintext is gathered in place, sealed in place, and written
    /// out with its tag in one system call.
    buf: Vec<u8>,
    filled: usize,
    index: u64,
    poisoned: bool,
}

impl std::fmt::Debug for EncryptedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedWriter")
            .field("path", &self.path)
            .field("chunk_size", &self.chunk_size)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl EncryptedWriter {
    /// Starts a new encrypted file at `path` with the default options.
    pub fn create(path: impl AsRef<Path>, kek: &dyn KeyEncryptionKey) -> Result<Self, AtRestError> {
        Self::create_with(path, kek, EncryptOptions::default())
    }

    /// Starts a new encrypted file at `path` (replaced on [`finish`](Self::finish) if it exists).
    pub fn create_with(
        path: impl AsRef<Path>,
        kek: &dyn KeyEncryptionKey,
        options: EncryptOptions,
    ) -> Result<Self, AtRestError> {
        let path = path.as_ref().to_owned();
        if options.chunk_size == 0 || options.chunk_size > MAX_CHUNK_SIZE {
            return Err(AtRestError::InvalidChunkSize {
                size: u64::from(options.chunk_size),
                max: MAX_CHUNK_SIZE,
            });
        }
        let mut file_id = [0u8; FILE_ID_LEN];
        SystemRandom::new()
            .fill(&mut file_id)
            .map_err(|_| AtRestError::Random {
                what: "generating a file id",
            })?;
        let data_key = DataKey::generate()?;
        let fixed = Header::new_fixed(options.chunk_size, &file_id);
        let header = Header::wrap(&path, fixed, options.chunk_size, &data_key, kek)?;

        let mut temp = temp_beside(&path)?;
        temp.write_all(&header.encode())
            .map_err(|e| AtRestError::io(temp.path(), "writing header", e))?;

        let chunk_size = options.chunk_size as usize;
        Ok(Self {
            path,
            temp: Some(temp),
            key: chunk_key(&data_key),
            aad: fixed,
            chunk_size,
            buf: vec![0u8; chunk_size + TAG_LEN],
            filled: 0,
            index: 0,
            poisoned: false,
        })
    }

    /// The file this writer will produce.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn seal_and_write(&mut self, last: bool) -> Result<(), AtRestError> {
        let n = self.filled;
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(chunk_nonce(self.index, last)),
                Aad::from(&self.aad),
                &mut self.buf[..n],
            )
            .map_err(|_| AtRestError::ChunkAuthentication {
                path: self.path.clone(),
                index: self.index,
                offset: 0,
                last,
            })?;
        self.buf[n..n + TAG_LEN].copy_from_slice(tag.as_ref());
        let temp = self
            .temp
            .as_mut()
            .ok_or_else(|| AtRestError::WriterPoisoned {
                path: self.path.clone(),
            })?;
        temp.write_all(&self.buf[..n + TAG_LEN])
            .map_err(|e| AtRestError::io(temp.path(), "writing chunk", e))?;
        self.index += 1;
        self.filled = 0;
        Ok(())
    }

    fn write_inner(&mut self, mut data: &[u8]) -> Result<usize, AtRestError> {
        if self.poisoned {
            return Err(AtRestError::WriterPoisoned {
                path: self.path.clone(),
            });
        }
        let total = data.len();
        while !data.is_empty() {
            // A full buffer is sealed only once more data arrives: until then it may be the
            // final chunk, whose nonce differs.
            if self.filled == self.chunk_size
                && let Err(e) = self.seal_and_write(false)
            {
                self.poisoned = true;
                return Err(e);
            }
            let take = (self.chunk_size - self.filled).min(data.len());
            self.buf[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
        }
        Ok(total)
    }

    /// Seals the final chunk, fsyncs, atomically renames over the target and fsyncs the
    /// directory. Returns the target path.
    pub fn finish(mut self) -> Result<PathBuf, AtRestError> {
        if self.poisoned {
            return Err(AtRestError::WriterPoisoned {
                path: self.path.clone(),
            });
        }
        self.seal_and_write(true)?;
        let temp = self
            .temp
            .take()
            .ok_or_else(|| AtRestError::WriterPoisoned {
                path: self.path.clone(),
            })?;
        temp.as_file()
            .sync_all()
            .map_err(|e| AtRestError::io(temp.path(), "fsync", e))?;
        temp.persist(&self.path)
            .map_err(|e| AtRestError::io(&self.path, "renaming temporary file over", e.error))?;
        sync_parent_dir(&self.path)?;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Write for EncryptedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(buf).map_err(AtRestError::into_io)
    }

    /// Does nothing: a partial chunk cannot be written before it is complete (its tag would be
    /// final), and durability comes from [`finish`](EncryptedWriter::finish).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Makes a rename durable: the directory entry lives in the directory, not the file.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), AtRestError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AtRestError::io(dir, "fsync directory", e))
}

enum ReadState {
    /// More chunks to read.
    Open,
    /// The final chunk authenticated; what is buffered is the last of the plaintext.
    Done,
    /// A chunk failed; every later read returns this failure again.
    Failed,
}

/// Reads an encrypted file through [`std::io::Read`], one authenticated chunk at a time.
///
/// A chunk's bytes are handed out only after its tag verified, so no byte of a modified chunk
/// ever reaches the caller, and after a failure every later `read` fails too.
///
/// **Truncation is detected only at the end.** A file cut at a chunk boundary looks fine until
/// the reader reaches the cut and finds that the last chunk present was not sealed as final. A
/// consumer that must not act on a truncated file (apply a checkpoint, count records) must read
/// to EOF (`read` returning `Ok(0)`) before acting on anything it read; [`decrypt_to_vec`] and
/// [`decrypt_to_writer`] do exactly that.
pub struct EncryptedReader {
    path: PathBuf,
    file: File,
    key: LessSafeKey,
    aad: [u8; FIXED_LEN],
    chunk_size: usize,
    kek_id: String,
    /// `chunk_size + TAG_LEN + 1` bytes: one ciphertext chunk plus one byte of look-ahead, which
    /// tells whether this chunk is the last one (and must therefore carry the final flag).
    buf: Vec<u8>,
    /// Whether `buf[0]` holds the look-ahead byte carried over from the previous fill.
    carry: Option<u8>,
    pos: usize,
    end: usize,
    index: u64,
    offset: u64,
    state: ReadState,
    error: Option<(u64, u64, bool)>,
}

impl std::fmt::Debug for EncryptedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedReader")
            .field("path", &self.path)
            .field("chunk_size", &self.chunk_size)
            .field("kek_id", &self.kek_id)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl EncryptedReader {
    /// Opens `path`, parses its header and unwraps its data key under `kek`.
    pub fn open(path: impl AsRef<Path>, kek: &dyn KeyEncryptionKey) -> Result<Self, AtRestError> {
        let path = path.as_ref().to_owned();
        let mut file = File::open(&path).map_err(|e| AtRestError::io(&path, "opening", e))?;
        let header = Header::read(&mut file, &path)?;
        let data_key = header.unwrap_key(&path, kek)?;
        let offset = (FIXED_LEN + 3 + header.kek_id.len() + header.wrapped.len()) as u64;
        let chunk_size = header.chunk_size as usize;
        Ok(Self {
            path,
            file,
            key: chunk_key(&data_key),
            aad: header.fixed,
            chunk_size,
            kek_id: header.kek_id,
            buf: vec![0u8; chunk_size + TAG_LEN + 1],
            carry: None,
            pos: 0,
            end: 0,
            index: 0,
            offset,
            state: ReadState::Open,
            error: None,
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the KEK the file's data key is wrapped under.
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// Plaintext bytes per chunk of this file.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size as u32
    }

    fn failure(&self) -> AtRestError {
        match self.error {
            Some((index, offset, last)) => AtRestError::ChunkAuthentication {
                path: self.path.clone(),
                index,
                offset,
                last,
            },
            None => AtRestError::Truncated {
                path: self.path.clone(),
                reason: format!(
                    "chunk {} at byte offset {} is shorter than its 16-byte tag",
                    self.index, self.offset
                ),
            },
        }
    }

    /// Reads, verifies and decrypts the next chunk into `buf[..end]`.
    fn next_chunk(&mut self) -> Result<(), AtRestError> {
        let want = self.chunk_size + TAG_LEN + 1;
        let mut filled = 0;
        if let Some(b) = self.carry.take() {
            self.buf[0] = b;
            filled = 1;
        }
        while filled < want {
            match self.file.read(&mut self.buf[filled..want]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.state = ReadState::Failed;
                    return Err(AtRestError::io(&self.path, "reading chunk", e));
                }
            }
        }
        // A full buffer means at least one byte follows this chunk, so it is not the last one.
        let last = filled < want;
        let ct_len = if last { filled } else { want - 1 };
        if !last {
            self.carry = Some(self.buf[want - 1]);
        }
        if ct_len < TAG_LEN {
            self.state = ReadState::Failed;
            return Err(self.failure());
        }
        let body = ct_len - TAG_LEN;
        let mut tag_bytes = [0u8; TAG_LEN];
        tag_bytes.copy_from_slice(&self.buf[body..ct_len]);
        let opened = self.key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(chunk_nonce(self.index, last)),
            Aad::from(&self.aad),
            Tag::from(tag_bytes),
            &mut self.buf[..body],
            0..,
        );
        if opened.is_err() {
            // Whatever ring left in the buffer is never handed out: `end` stays 0.
            self.pos = 0;
            self.end = 0;
            self.error = Some((self.index, self.offset, last));
            self.state = ReadState::Failed;
            return Err(self.failure());
        }
        self.pos = 0;
        self.end = body;
        self.index += 1;
        self.offset += ct_len as u64;
        if last {
            self.state = ReadState::Done;
        }
        Ok(())
    }
}

impl Read for EncryptedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.end {
                let n = (self.end - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match self.state {
                ReadState::Done => return Ok(0),
                ReadState::Failed => return Err(self.failure().into_io()),
                ReadState::Open => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    self.next_chunk().map_err(AtRestError::into_io)?;
                }
            }
        }
    }
}

/// Encrypts everything `plaintext` yields into a new encrypted file at `dst`.
pub fn encrypt_reader(
    plaintext: &mut impl Read,
    dst: impl AsRef<Path>,
    kek: &dyn KeyEncryptionKey,
    options: EncryptOptions,
) -> Result<PathBuf, AtRestError> {
    let mut w = EncryptedWriter::create_with(dst, kek, options)?;
    io::copy(plaintext, &mut w).map_err(|e| unwrap_io(e, w.path(), "encrypting"))?;
    w.finish()
}

/// Encrypts the (plaintext) file `src` into a new encrypted file at `dst`.
pub fn encrypt_file(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    kek: &dyn KeyEncryptionKey,
    options: EncryptOptions,
) -> Result<PathBuf, AtRestError> {
    let src = src.as_ref();
    let mut f = File::open(src).map_err(|e| AtRestError::io(src, "opening plaintext source", e))?;
    let mut w = EncryptedWriter::create_with(dst, kek, options)?;
    // `io::copy` would blame the destination for a source read error; copy by hand to name the
    // right file.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(AtRestError::io(src, "reading plaintext source", e)),
        };
        w.write_inner(&buf[..n])?;
    }
    w.finish()
}

/// Writes `data` as a new encrypted file at `dst`.
pub fn encrypt_bytes(
    data: &[u8],
    dst: impl AsRef<Path>,
    kek: &dyn KeyEncryptionKey,
    options: EncryptOptions,
) -> Result<PathBuf, AtRestError> {
    let mut w = EncryptedWriter::create_with(dst, kek, options)?;
    w.write_inner(data)?;
    w.finish()
}

/// Decrypts the whole file `path` into memory; fails, returning nothing, if any chunk fails or the
/// file is truncated or extended.
pub fn decrypt_to_vec(
    path: impl AsRef<Path>,
    kek: &dyn KeyEncryptionKey,
) -> Result<Vec<u8>, AtRestError> {
    let mut r = EncryptedReader::open(path, kek)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .map_err(|e| unwrap_io(e, r.path(), "decrypting"))?;
    Ok(out)
}

/// Decrypts `path` into `out`, streaming. `out` receives only authenticated bytes, but if the
/// file turns out to be truncated or modified further on, it will already have received the
/// earlier chunks: the caller must discard them when this returns an error.
pub fn decrypt_to_writer(
    path: impl AsRef<Path>,
    kek: &dyn KeyEncryptionKey,
    out: &mut impl Write,
) -> Result<u64, AtRestError> {
    let mut r = EncryptedReader::open(path, kek)?;
    io::copy(&mut r, out).map_err(|e| unwrap_io(e, r.path(), "decrypting"))
}

/// Gets our own error back out of an `io::Error` produced by the `Read`/`Write` impls, or wraps a
/// foreign one with the path it concerns.
fn unwrap_io(e: io::Error, path: &Path, op: &'static str) -> AtRestError {
    if e.get_ref().is_some_and(|inner| inner.is::<AtRestError>()) {
        if let Some(inner) = e.into_inner()
            && let Ok(ours) = inner.downcast::<AtRestError>()
        {
            return *ours;
        }
        // Unreachable in practice: checked `is` just above.
        return AtRestError::io(path, op, io::Error::other("lost inner error"));
    }
    AtRestError::io(path, op, e)
}

/// A temporary file (named with [`TEMP_PREFIX`], which rotation skips) in `path`'s directory, so
/// that the final rename into `path` stays on one filesystem and is atomic.
pub(crate) fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile, AtRestError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&dir)
        .map_err(|e| AtRestError::io(&dir, "creating temporary file", e))
}
