"""A stock Python gRPC client (grpcio, BoringSSL) talking to a Tutela server over mutual TLS.

It generates its stubs from the project's own .proto files with grpcio-tools at run time, so it
checks that the wire protocol is usable from outside Rust. Used by the end-to-end test
`tests/tests/python_client.rs`; run by hand as:

    python tests/python/grpc_client.py --addr localhost:7443 --ca ca.crt --cert user.crt \
        --key user.key [--site SITE]

It prints one JSON object: the identity the server saw, the health status, and (with
--upload) the id the server gave an uploaded model.
"""

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "protocol", "proto")


def generate_stubs(out_dir):
    """Compiles tutela/v1/*.proto into importable Python modules under out_dir."""
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = ["tutela/v1/tensor.proto", "tutela/v1/transport.proto", "tutela/v1/federation.proto"]
    rc = protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        + protos
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)


def canonical_manifest(tensors, metadata):
    """The digest's canonical manifest encoding (see tutela_protocol::tensor::Manifest)."""
    out = bytearray()

    def put_str(s):
        b = s.encode()
        out.extend(struct.pack("<Q", len(b)))
        out.extend(b)

    out.extend(struct.pack("<Q", len(tensors)))
    for name, dtype, shape, data in tensors:
        put_str(name)
        out.extend(struct.pack("<I", dtype))
        out.extend(struct.pack("<Q", len(shape)))
        for d in shape:
            out.extend(struct.pack("<Q", d))
        out.extend(struct.pack("<Q", len(data)))
    out.extend(struct.pack("<Q", len(metadata)))
    for k in sorted(metadata):
        put_str(k)
        put_str(metadata[k])
    return bytes(out)


def upload_frames(pb, tensors):
    digest = hashlib.sha256()
    digest.update(b"tutela/tensor-stream/v1\0")
    digest.update(canonical_manifest(tensors, {}))
    manifest = pb.ModelManifest(
        tensors=[pb.TensorInfo(name=n, dtype=dt, shape=s, byte_length=len(d)) for n, dt, s, d in tensors]
    )
    yield pb.TensorFrame(manifest=manifest)
    total = 0
    for i, (_, _, _, data) in enumerate(tensors):
        digest.update(data)
        total += len(data)
        yield pb.TensorFrame(chunk=pb.TensorChunk(tensor_index=i, offset=0, data=data))
    yield pb.TensorFrame(trailer=pb.StreamTrailer(sha256=digest.digest(), total_bytes=total))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--site", default="")
    p.add_argument("--upload", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as gen:
        generate_stubs(gen)
        import tutela.v1.tensor_pb2 as tensor_pb
        import tutela.v1.transport_pb2 as transport_pb
        import tutela.v1.transport_pb2_grpc as transport_grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=open(args.ca, "rb").read(),
            private_key=open(args.key, "rb").read(),
            certificate_chain=open(args.cert, "rb").read(),
        )
        result = {}
        with grpc.secure_channel(args.addr, creds) as channel:
            try:
                me = transport_grpc.IdentityStub(channel).WhoAmI(
                    transport_pb.WhoAmIRequest(act_for_site=args.site), timeout=10
                )
                result["identity"] = me.identity
                result["role"] = me.role
                result["serial"] = me.serial
            except grpc.RpcError as e:
                result["error_code"] = e.code().name
                result["error"] = e.details()
            if "error_code" not in result:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="tutela.v1.Identity"), timeout=10
                )
                result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                if args.upload:
                    data = struct.pack("<6f", 1.0, -2.0, 3.5, 0.0, 1e-3, 42.0)
                    tensors = [("w", tensor_pb.DTYPE_F32, [2, 3], data)]
                    receipt = transport_grpc.ModelExchangeStub(channel).Upload(
                        upload_frames(tensor_pb, tensors), timeout=30
                    )
                    result["model_id"] = receipt.model_id
        print(json.dumps(result))


if __name__ == "__main__":
    main()
