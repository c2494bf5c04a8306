//! Tensor streaming through the real gRPC service over mutual TLS: random tensors of every dtype
//! round-trip bit-exactly, and every malformed stream is refused without leaving a file behind.

use crate::common;

use bytes::Bytes;
use common::*;
use rand::{Rng, SeedableRng};
use tonic::Code;
use tutela_protocol::Principal;
use tutela_protocol::pb::model_exchange_client::ModelExchangeClient;
use tutela_protocol::pb::{self, DownloadRequest, tensor_frame::Frame};
use tutela_protocol::pki::{LeafOptions, Validity};
use tutela_protocol::stream::{self, MAX_CHUNK_BYTES, MemorySink, MemorySource, StreamDigest};
use tutela_protocol::tensor::{DType, Manifest, TensorSpec};

async fn setup(
    dir: &std::path::Path,
) -> (TestServer, ModelExchangeClient<tonic::transport::Channel>) {
    let ca = ca(CONSORTIUM);
    let server = start_server(dir, &ca, Principal::Coordinator).await;
    let issued = ca
        .issue(
            &node("st-mary"),
            &LeafOptions::new(Validity::days_from_now(1)),
        )
        .unwrap();
    let tls = client_tls(&dir.join("c"), &ca, &issued, None);
    let ch = channel(server.addr, tls).await.unwrap();
    let client = ModelExchangeClient::new(ch)
        .max_decoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(tutela_protocol::server::MAX_MESSAGE_BYTES);
    (server, client)
}

fn random_model(seed: u64) -> Vec<(TensorSpec, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (i, dtype) in DType::ALL.iter().enumerate() {
        let dims = rng.random_range(0..=3);
        let shape: Vec<u64> = (0..dims).map(|_| rng.random_range(1..40)).collect();
        let spec = TensorSpec::new(format!("layer{i}.{dtype}"), *dtype, shape);
        let mut data = vec![0u8; spec.byte_len().unwrap() as usize];
        rng.fill(&mut data[..]);
        out.push((spec, data));
    }
    // One tensor spanning several chunks, with a length that is not a multiple of the chunk size.
    let big = TensorSpec::new(
        "big.weight",
        DType::F32,
        vec![(MAX_CHUNK_BYTES as u64 / 4) * 2 + 3],
    );
    let mut data = vec![0u8; big.byte_len().unwrap() as usize];
    rng.fill(&mut data[..]);
    out.push((big, data));
    out.push((TensorSpec::new("empty", DType::F16, vec![0, 7]), vec![]));
    out
}

fn leftover_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn random_tensors_of_every_dtype_round_trip_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = setup(dir.path()).await;
    let model = random_model(7);

    let (frames, err) = stream::send_for_upload(MemorySource::new(model.clone()).unwrap());
    let receipt = client.upload(frames).await.unwrap().into_inner();
    assert!(err.lock().unwrap().is_none());
    assert_eq!(receipt.tensor_count as usize, model.len());
    let total: usize = model.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(receipt.total_bytes as usize, total);

    // The stored file is a valid safetensors file with the same bytes.
    let path = server
        .store_dir
        .join(format!("{}.safetensors", receipt.model_id));
    let file = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    for (spec, data) in &model {
        let view = st.tensor(&spec.name).unwrap();
        assert_eq!(view.data(), &data[..], "{}", spec.name);
        assert_eq!(
            view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
            spec.shape
        );
    }

    // Download it again and compare every byte and the digest.
    let frames = client
        .download(DownloadRequest {
            model_id: receipt.model_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let received = stream::receive(frames, MemorySink::default())
        .await
        .unwrap();
    assert_eq!(received.digest_hex(), receipt.model_id);
    assert_eq!(received.output, model);

    // Uploading the same model again yields the same id (content addressing).
    let (frames, _) = stream::send_for_upload(MemorySource::new(model).unwrap());
    assert_eq!(
        client.upload(frames).await.unwrap().into_inner().model_id,
        receipt.model_id
    );
    assert_eq!(leftover_files(&server.store_dir).len(), 1);
}

/// Hand-built frames for the malformed cases.
fn frames(
    manifest: pb::ModelManifest,
    data: &[&[u8]],
    digest: Option<[u8; 32]>,
    total: u64,
) -> Vec<pb::TensorFrame> {
    let mut out = vec![pb::TensorFrame {
        frame: Some(Frame::Manifest(manifest)),
    }];
    for (i, d) in data.iter().enumerate() {
        out.push(pb::TensorFrame {
            frame: Some(Frame::Chunk(pb::TensorChunk {
                tensor_index: i as u32,
                offset: 0,
                data: Bytes::copy_from_slice(d),
            })),
        });
    }
    if let Some(digest) = digest {
        out.push(pb::TensorFrame {
            frame: Some(Frame::Trailer(pb::StreamTrailer {
                sha256: digest.to_vec(),
                total_bytes: total,
            })),
        });
    }
    out
}

fn good_manifest() -> Manifest {
    Manifest::new(
        vec![TensorSpec::new("w", DType::F32, vec![2, 2])],
        Default::default(),
    )
    .unwrap()
}

fn digest_of(m: &Manifest, data: &[u8]) -> [u8; 32] {
    let mut d = StreamDigest::new(m);
    d.update(data);
    d.finish()
}

async fn upload_frames(
    client: &mut ModelExchangeClient<tonic::transport::Channel>,
    f: Vec<pb::TensorFrame>,
) -> tonic::Status {
    client
        .upload(futures::stream::iter(f))
        .await
        .expect_err("the upload must be refused")
}

#[tokio::test]
async fn malformed_streams_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = setup(dir.path()).await;
    let m = good_manifest();
    let data = [1u8; 16];
    let good = digest_of(&m, &data);

    // Digest mismatch: one flipped bit in the data.
    let mut flipped = data;
    flipped[3] ^= 0x10;
    let s = upload_frames(&mut client, frames(m.to_pb(), &[&flipped], Some(good), 16)).await;
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(s.message().contains("digest mismatch"), "{}", s.message());

    // Truncated: no trailer.
    let s = upload_frames(&mut client, frames(m.to_pb(), &[&data], None, 16)).await;
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(
        s.message().contains("without its trailer"),
        "{}",
        s.message()
    );

    // Truncated: trailer after half the bytes.
    let s = upload_frames(&mut client, frames(m.to_pb(), &[&data[..8]], Some(good), 8)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("truncated"), "{}", s.message());

    // Unknown dtype.
    let mut pbm = m.to_pb();
    pbm.tensors[0].dtype = 42;
    let s = upload_frames(&mut client, frames(pbm, &[&data], Some(good), 16)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("unknown dtype"), "{}", s.message());

    // Shape that does not match the byte count.
    let mut pbm = m.to_pb();
    pbm.tensors[0].shape = vec![3, 2];
    let s = upload_frames(&mut client, frames(pbm, &[&data], Some(good), 16)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("shape [3, 2]"), "{}", s.message());

    // More bytes than the shape allows.
    let s = upload_frames(
        &mut client,
        frames(m.to_pb(), &[&[0u8; 20]], Some(good), 20),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("past the tensor's 16 bytes"),
        "{}",
        s.message()
    );

    // No manifest first.
    let s = upload_frames(
        &mut client,
        frames(m.to_pb(), &[&data], Some(good), 16)[1..].to_vec(),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // The well-formed stream still goes through afterwards.
    client
        .upload(futures::stream::iter(frames(
            m.to_pb(),
            &[&data],
            Some(good),
            16,
        )))
        .await
        .unwrap();
    assert_eq!(
        leftover_files(&server.store_dir),
        vec![format!("{}.safetensors", hex::encode(good))]
    );
}

#[tokio::test]
async fn a_stream_broken_mid_transfer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = setup(dir.path()).await;
    let spec = TensorSpec::new("w", DType::U8, vec![3 * MAX_CHUNK_BYTES as u64]);
    let m = Manifest::new(vec![spec], Default::default()).unwrap();
    let first = vec![
        pb::TensorFrame {
            frame: Some(Frame::Manifest(m.to_pb())),
        },
        pb::TensorFrame {
            frame: Some(Frame::Chunk(pb::TensorChunk {
                tensor_index: 0,
                offset: 0,
                data: Bytes::from(vec![5u8; MAX_CHUNK_BYTES]),
            })),
        },
    ];
    // Send two frames, then hang; the client is then dropped mid-stream.
    let frames =
        futures::StreamExt::chain(futures::stream::iter(first), futures::stream::pending());
    let mut c = client.clone();
    let task = tokio::spawn(async move { c.upload(frames).await });
    // Wait until the server has started writing the temporary file.
    let mut saw_part = false;
    for _ in 0..200 {
        if leftover_files(&server.store_dir)
            .iter()
            .any(|f| f.ends_with(".part"))
        {
            saw_part = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(saw_part, "the server should have begun receiving");
    task.abort();
    drop(client);
    let mut clean = false;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        if leftover_files(&server.store_dir).is_empty() {
            clean = true;
            break;
        }
    }
    assert!(
        clean,
        "left behind: {:?}",
        leftover_files(&server.store_dir)
    );
}

#[tokio::test]
async fn an_unknown_or_malformed_model_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = setup(dir.path()).await;
    let s = client
        .download(DownloadRequest {
            model_id: "../../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = client
        .download(DownloadRequest {
            model_id: "a".repeat(64),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}

/// A stored model altered on the server's disk (the review of 2026-12-07: a registry consumer
/// fetching production when the coordinator's spool no longer matches the registered digest).
/// The server streams it under the digest it is named by (`send_known_digest`, as `Download`
/// and `Registry.FetchModel` do) without hashing; the receiver hashes every byte and refuses it.
#[tokio::test]
async fn a_model_altered_on_the_servers_disk_is_refused_by_the_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = setup(dir.path()).await;
    let model = random_model(11);
    let (frames, _) = stream::send_for_upload(MemorySource::new(model).unwrap());
    let receipt = client.upload(frames).await.unwrap().into_inner();
    let path = server
        .store_dir
        .join(format!("{}.safetensors", receipt.model_id));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let frames = client
        .download(DownloadRequest {
            model_id: receipt.model_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let err = stream::receive(frames, MemorySink::default())
        .await
        .expect_err("an altered model must not be received");
    assert!(
        matches!(err, stream::StreamError::DigestMismatch { .. }),
        "{err}"
    );
}
