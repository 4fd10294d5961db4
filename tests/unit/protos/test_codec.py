import hashlib

import numpy as np
import pytest

from fcmoe.errors import CodecError
from protos import codec
from protos import fcmoe_pb2 as pb


def _specs(tensors):
    return {k: codec.TensorSpec(codec.dtype_name(v), tuple(v.shape)) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint32", "uint64", "int64", "float64"])
def test_round_trip_all_dtypes_and_chunk_sizes(dtype):
    rng = np.random.default_rng(0)
    tensors = {"L0.E0": (rng.standard_normal((37, 5)) * 100).astype(dtype), "empty": np.zeros((0,), dtype)}
    for chunk_bytes in (1, 7, 64, 1 << 20):
        out = codec.decode(codec.encode(tensors, chunk_bytes), _specs(tensors))
        for k in tensors:
            assert out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k])


def test_chunks_respect_limit_and_carry_digest_of_whole_tensor():
    x = np.arange(300_000, dtype=np.float32)
    chunks = list(codec.encode({"x": x}, chunk_bytes=256 * 1024))
    assert len(chunks) == 5 and all(len(c.data) <= 256 * 1024 for c in chunks)
    assert chunks[0].sha256 == hashlib.sha256(x.tobytes()).digest()
    with pytest.raises(CodecError):
        list(codec.encode({"x": x}, chunk_bytes=codec.MAX_CHUNK_BYTES + 1))


def _chunks(x, name="u"):
    return list(codec.encode({name: x}, chunk_bytes=64))


def test_bad_digest_refused():
    x = np.ones(100, np.float32)
    chunks = _chunks(x)
    chunks[1].data = bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:]
    with pytest.raises(CodecError, match="SHA-256 mismatch"):
        codec.decode(chunks, {"u": codec.TensorSpec("float32", (100,))})


def test_wrong_shape_dtype_name_refused():
    x = np.ones(100, np.float32)
    with pytest.raises(CodecError, match="shape"):
        codec.decode(_chunks(x), {"u": codec.TensorSpec("float32", (10, 10))})
    with pytest.raises(CodecError, match="dtype"):
        codec.decode(_chunks(x), {"u": codec.TensorSpec("uint32", (100,))})
    with pytest.raises(CodecError, match="unexpected tensor"):
        codec.decode(_chunks(x, "v"), {"u": codec.TensorSpec("float32", (100,))})


def test_oversize_truncated_and_misordered_refused():
    spec = {"u": codec.TensorSpec("float32", (100,))}
    x = np.ones(100, np.float32)
    big = pb.TensorChunk(name="u", dtype="float32", shape=[100], total_bytes=400, sha256=b"0" * 32,
                         offset=0, data=b"\x00" * (codec.MAX_CHUNK_BYTES + 1))
    with pytest.raises(CodecError, match="exceeds"):
        codec.decode([big], spec)
    lying = pb.TensorChunk(name="u", dtype="float32", shape=[100], total_bytes=400, sha256=b"0" * 32,
                           offset=0, data=b"\x00" * 404)
    with pytest.raises(CodecError, match="more bytes"):
        codec.decode([lying], spec)
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(_chunks(x)[:-1], spec)
    chunks = _chunks(x)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(CodecError, match="offset"):
        codec.decode(chunks, spec)
    two = {"a": codec.TensorSpec("float32", (1,)), "b": codec.TensorSpec("float32", (1,))}
    with pytest.raises(CodecError, match="out of order"):
        codec.decode(codec.encode({"b": np.ones(1, np.float32), "a": np.ones(1, np.float32)}), two)
    with pytest.raises(CodecError, match="missing"):
        codec.decode(codec.encode({"a": np.ones(1, np.float32)}), two)


def test_payload_digest_from_the_checked_chunk_digests_equals_the_senders_and_binds_every_part():
    """The receiver rebuilds the sender's payload digest from the per-tensor digests it checked while
    assembling (no second pass over the bytes); changing a name, dtype, shape or one bit changes it."""
    payload = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float64),
               "empty": np.zeros(0, np.float32)}
    digests = codec.tensor_digests(payload)
    sent = codec.payload_digest(payload, digests)
    assert sent == codec.payload_digest(payload)
    assembler = codec.TensorAssembler(_specs(payload))
    for chunk in codec.encode(payload, 16, digests):
        assembler.add(chunk)
    received = assembler.finish()
    assert assembler.digests.keys() == payload.keys() and codec.payload_digest(received, assembler.digests) == sent
    changed = [{"c": payload["a"], "b": payload["b"], "empty": payload["empty"]},
               {**payload, "b": payload["b"].astype(np.float32)},
               {**payload, "a": payload["a"].reshape(4, 3)}]
    flipped = payload["a"].copy()
    flipped.view(np.uint32)[0, 0] ^= 1
    changed.append({**payload, "a": flipped})
    assert all(codec.payload_digest(other) != sent for other in changed)
