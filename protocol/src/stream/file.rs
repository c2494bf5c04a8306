//! Models as safetensors files: the sink that stores a received stream as one
//! ([`SafetensorsFileSink`]), the source that sends one ([`SafetensorsFileSource`]), and storing and
//! loading whole models ([`store_model`], [`load_model`]). A stored file's header lists the tensors
//! in manifest order, back to back, so that reading it gives the manifest it was written from and
//! the stream digest it is named by.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{SinkError, StreamDigest, StreamError, TensorSink, TensorSource};
use crate::tensor::{DType, Manifest, TensorSpec};

/// Writes a received model as a safetensors file, atomically: the bytes go to a hidden temporary
/// file in the target directory, which becomes the target only after the digest verified
/// (`fsync`, then rename). Dropped without a commit, the temporary file is deleted.
pub struct SafetensorsFileSink {
    dir: PathBuf,
    target: Target,
    file: Option<BufWriter<tempfile::NamedTempFile>>,
}

enum Target {
    /// `<dir>/<hex digest>.safetensors`
    ContentAddressed,
    Path(PathBuf),
}

impl SafetensorsFileSink {
    /// Stores the model as `<dir>/<hex digest>.safetensors`.
    pub fn content_addressed(dir: impl Into<PathBuf>) -> Self {
        SafetensorsFileSink {
            dir: dir.into(),
            target: Target::ContentAddressed,
            file: None,
        }
    }

    /// Stores the model at `path`, replacing it atomically.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        SafetensorsFileSink {
            dir,
            target: Target::Path(path),
            file: None,
        }
    }
}

impl TensorSink for SafetensorsFileSink {
    type Output = PathBuf;

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        let header = manifest.safetensors_header().map_err(|e| {
            SinkError::Rejected(format!(
                "the manifest cannot be written as safetensors: {e}"
            ))
        })?;
        let tmp = tempfile::Builder::new()
            .prefix(".incoming-")
            .suffix(".part")
            .tempfile_in(&self.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.dir.display())))?;
        let mut w = BufWriter::with_capacity(1 << 20, tmp);
        w.write_all(&header)?;
        self.file = Some(w);
        Ok(())
    }

    fn write(&mut self, _index: usize, _offset: u64, data: &[u8]) -> Result<(), SinkError> {
        // The decoder guarantees order and contiguity, and the header lays tensors out back to
        // back in manifest order, so the next byte always goes at the end of the file.
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| SinkError::Io(io::Error::other("write before begin")))?;
        file.write_all(data)?;
        Ok(())
    }

    fn commit(mut self, digest: &[u8; 32]) -> Result<PathBuf, SinkError> {
        let writer = self
            .file
            .take()
            .ok_or_else(|| SinkError::Io(io::Error::other("commit before begin")))?;
        let tmp = writer.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        let target = match &self.target {
            Target::ContentAddressed => self
                .dir
                .join(format!("{}.safetensors", hex::encode(digest))),
            Target::Path(p) => p.clone(),
        };
        tmp.persist(&target).map_err(|e| SinkError::Io(e.error))?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(target)
    }
}

/// A safetensors file to send, read sequentially (tensors in the order of their data offsets, so
/// the file is read front to back once, never mapped or loaded whole).
pub struct SafetensorsFileSource {
    manifest: Manifest,
    file: File,
}

impl SafetensorsFileSource {
    pub fn open(path: &Path) -> Result<Self, StreamError> {
        let bad = |why: String| {
            StreamError::Source(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            ))
        };
        let mut file = File::open(path).map_err(|e| {
            StreamError::Source(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        })?;
        let file_len = file.metadata().map_err(StreamError::Source)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| bad("too short for a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        // The safetensors crate's own limit on header size.
        if header_len > 100_000_000 || header_len + 8 > file_len {
            return Err(bad(format!("header length {header_len} is not plausible")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("reading the header: {e}")))?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
        let tensor_map = meta.tensors();
        // Tensors in the order of their data, and tensors at the same offset (empty ones) in the
        // order the header lists them, which is the manifest's order when the file sink wrote it.
        // `Metadata::offset_keys` breaks those ties by hash-map order: a stored model with two
        // empty tensors read back with another manifest, so it was served under a stream digest
        // other than the one it is named by (found by the `stream_frames` fuzz target).
        let listed = header_key_order(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
        let position: std::collections::HashMap<&str, usize> = listed
            .iter()
            .enumerate()
            .map(|(i, key)| (key.as_str(), i))
            .collect();
        let mut names: Vec<&String> = tensor_map.keys().collect();
        names.sort_by_key(|name| {
            (
                tensor_map[*name].data_offsets,
                position.get(name.as_str()).copied(),
            )
        });
        let mut specs = Vec::with_capacity(tensor_map.len());
        for name in names {
            let info = tensor_map[name];
            let name = name.clone();
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?} has dtype {:?}, which Tutela does not carry",
                    info.dtype
                ))
            })?;
            specs.push(TensorSpec::new(
                name,
                dtype,
                info.shape.iter().map(|&d| d as u64).collect(),
            ));
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let manifest = Manifest::new(specs, metadata)?;
        if 8 + header_len + meta.data_len() as u64 != file_len {
            return Err(bad(format!(
                "the header describes {} data bytes but the file holds {}",
                meta.data_len(),
                file_len - 8 - header_len
            )));
        }
        file.seek(SeekFrom::Start(8 + header_len))
            .map_err(StreamError::Source)?;
        Ok(SafetensorsFileSource { manifest, file })
    }
}

impl TensorSource for SafetensorsFileSource {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn read_chunk(&mut self, len: usize) -> io::Result<Bytes> {
        // Straight from the file into a fresh buffer: chunks are large, so a BufReader would
        // only add a copy, and read_to_end does not zero the buffer first.
        let mut buf = Vec::with_capacity(len);
        (&mut self.file).take(len as u64).read_to_end(&mut buf)?;
        Ok(Bytes::from(buf))
    }
}

/// The top-level keys of a safetensors header, in the order it lists them (for a duplicated key,
/// its last place, as the value that counts is the last one).
fn header_key_order(header: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(key);
            }
            Ok(keys)
        }
    }
    serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_slice(header), Keys)
}

/// Stores a model held in memory in `dir` as `<stream digest>.safetensors`, exactly as if it had
/// been received as a stream (same file, same id). Returns the digest and the path.
pub fn store_model(
    dir: &Path,
    manifest: &Manifest,
    tensors: &[&[u8]],
) -> Result<([u8; 32], PathBuf), StreamError> {
    if tensors.len() != manifest.len() {
        return Err(StreamError::Source(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} data buffers for {} tensors",
                tensors.len(),
                manifest.len()
            ),
        )));
    }
    let mut sink = SafetensorsFileSink::content_addressed(dir);
    sink.begin(manifest)?;
    let mut digest = StreamDigest::new(manifest);
    for (i, data) in tensors.iter().enumerate() {
        if data.len() as u64 != manifest.byte_len(i) {
            return Err(StreamError::Source(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor {:?} has {} bytes, its shape needs {}",
                    manifest.tensors()[i].name,
                    data.len(),
                    manifest.byte_len(i)
                ),
            )));
        }
        digest.update(data);
        sink.write(i, 0, data)?;
    }
    let digest = digest.finish();
    let path = sink.commit(&digest)?;
    Ok((digest, path))
}

/// The stream digest of a safetensors model file (its model id: what the coordinator names it
/// by and the trail records), read one tensor at a time.
pub fn model_digest_of_file(path: &Path) -> Result<[u8; 32], StreamError> {
    let mut source = SafetensorsFileSource::open(path)?;
    let manifest = source.manifest().clone();
    let mut digest = StreamDigest::new(&manifest);
    for i in 0..manifest.len() {
        let bytes = source
            .read_chunk(manifest.byte_len(i) as usize)
            .map_err(|e| {
                StreamError::Source(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })?;
        digest.update(&bytes);
    }
    Ok(digest.finish())
}

/// Reads a whole safetensors model into memory: its manifest and each tensor's bytes.
pub fn load_model(path: &Path) -> Result<(Manifest, Vec<Vec<u8>>), StreamError> {
    let mut source = SafetensorsFileSource::open(path)?;
    let manifest = source.manifest().clone();
    let mut data = Vec::with_capacity(manifest.len());
    for i in 0..manifest.len() {
        let bytes = source
            .read_chunk(manifest.byte_len(i) as usize)
            .map_err(|e| {
                StreamError::Source(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })?;
        data.push(bytes.to_vec());
    }
    Ok((manifest, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `stream_frames` fuzz target: a model with several empty tensors (which share
    /// one data offset) was read back in hash-map order, so the coordinator served it with another
    /// manifest, under another stream digest than the one the file is named by.
    #[test]
    fn empty_tensors_read_back_in_manifest_order() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["e", "d", "weight", "c", "b", "a"];
        let specs: Vec<TensorSpec> = names
            .iter()
            .map(|&n| {
                let shape = if n == "weight" { vec![2] } else { vec![0, 3] };
                TensorSpec::new(n, DType::F32, shape)
            })
            .collect();
        let manifest = Manifest::new(specs, Default::default()).unwrap();
        let data: Vec<Vec<u8>> = (0..manifest.len())
            .map(|i| vec![7; manifest.byte_len(i) as usize])
            .collect();
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let (digest, path) = store_model(dir.path(), &manifest, &slices).unwrap();
        // Each read hashes the names anew: with five empty tensors, reading in hash-map order
        // gives the written order once in 120 reads.
        for _ in 0..20 {
            let (read, bytes) = load_model(&path).unwrap();
            assert_eq!(read, manifest);
            let mut again = StreamDigest::new(&read);
            bytes.iter().for_each(|b| again.update(b));
            assert_eq!(again.finish(), digest);
        }
    }
}
