"""The one tensor codec: named arrays <-> TensorChunk messages.

Why raw bytes: nothing received from the network is unpickled. A tensor is its little-endian bytes
plus dtype, shape and the SHA-256 of the whole tensor; the receiver checks every chunk against what it
expects *before* buffering it, so a lying peer cannot make the server allocate more than the declared
(and expected) size. Masking or encryption (secure aggregation) wraps the arrays handed to this codec;
the codec itself is agnostic of what the numbers mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fcmoe.errors import CodecError
from protos import fcmoe_pb2 as pb

MAX_CHUNK_BYTES = 4 * 1024 * 1024  # hard protocol limit per message payload
DEFAULT_CHUNK_BYTES = 1024 * 1024
# gRPC message limit: the largest chunk plus room for the envelope (name, shape, digest).
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024

_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "uint8": np.dtype("u1"),
    "int64": np.dtype("<i8"),
}


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver accepts for one named tensor."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize


def dtype_name(array: np.ndarray) -> str:
    for name, dt in _DTYPES.items():
        if array.dtype.newbyteorder("<") == dt:
            return name
    raise CodecError(f"dtype {array.dtype} cannot be sent (allowed: {', '.join(_DTYPES)})")


def _wire_bytes(array: np.ndarray) -> tuple[str, bytes]:
    dtype = dtype_name(array)
    return dtype, np.ascontiguousarray(array, dtype=_DTYPES[dtype]).tobytes()


def tensor_digests(tensors: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """Each tensor's SHA-256 over the bytes it travels as (what its first chunk carries)."""
    return {name: hashlib.sha256(_wire_bytes(array)[1]).digest() for name, array in tensors.items()}


def encode(
    tensors: Mapping[str, np.ndarray], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    digests: Mapping[str, bytes] | None = None,
) -> Iterator[pb.TensorChunk]:
    """Yield TensorChunk messages for every tensor, in mapping order (``digests``: the tensors' own,
    from :func:`tensor_digests`, when the sender has them already)."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk_bytes={chunk_bytes} outside 1..{MAX_CHUNK_BYTES}")
    for name, array in tensors.items():
        dtype, raw = _wire_bytes(array)
        digest = digests[name] if digests is not None else hashlib.sha256(raw).digest()
        shape = list(array.shape)
        offsets = range(0, len(raw), chunk_bytes) if raw else [0]
        for i, offset in enumerate(offsets):
            first = i == 0
            yield pb.TensorChunk(
                name=name,
                dtype=dtype if first else "",
                shape=shape if first else [],
                total_bytes=len(raw),
                sha256=digest if first else b"",
                offset=offset,
                data=raw[offset : offset + chunk_bytes],
            )


def payload_digest(tensors: Mapping[str, np.ndarray], digests: Mapping[str, bytes] | None = None) -> bytes:
    """SHA-256 naming a whole payload (names, dtypes, shapes, and each tensor's SHA-256): an interrupted
    upload resumes only into the same payload. Built on the tensors' own digests, which the sender
    computes once for its chunks and the receiver checks as they arrive (``TensorAssembler.digests``),
    so neither side reads the bytes a second time."""
    digests = digests if digests is not None else tensor_digests(tensors)
    h = hashlib.sha256()
    for name, array in tensors.items():
        h.update(f"{name}\0{dtype_name(array)}\0{list(array.shape)}\0".encode())
        h.update(digests[name])
    return h.digest()


class TensorAssembler:
    """Rebuilds tensors from chunks, refusing anything that deviates from the expected specs.

    ``expected`` fixes the names, order, dtypes and shapes the receiver will accept; every violation
    raises CodecError naming the tensor and the problem. ``finish`` checks all tensors arrived.
    """

    def __init__(self, expected: Mapping[str, TensorSpec]):
        self._expected = dict(expected)
        self._order = list(expected)
        self._done: dict[str, np.ndarray] = {}
        self._current: str | None = None
        self._buffer: bytearray | None = None
        self._digest = b""
        self.digests: dict[str, bytes] = {}  # each finished tensor's SHA-256, checked against its bytes
        self.bytes_received = 0
        self.chunks_received = 0  # accepted so far: where an interrupted stream resumes

    def add(self, chunk: pb.TensorChunk) -> None:
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise CodecError(f"tensor {chunk.name!r}: chunk of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}")
        if self._current is None or chunk.name != self._current:
            self._start(chunk)
            if self._current is None:  # an empty tensor completes on its first chunk
                if chunk.data or chunk.offset:
                    raise CodecError(f"tensor {chunk.name!r}: data for an empty tensor")
                self.chunks_received += 1
                return
        assert self._buffer is not None
        if chunk.offset != len(self._buffer):
            raise CodecError(
                f"tensor {chunk.name!r}: chunk at offset {chunk.offset}, expected {len(self._buffer)}"
            )
        spec = self._expected[chunk.name]
        if chunk.total_bytes != spec.nbytes or len(self._buffer) + len(chunk.data) > spec.nbytes:
            raise CodecError(f"tensor {chunk.name!r}: more bytes than its shape {spec.shape} allows")
        self._buffer += chunk.data
        if len(self._buffer) == spec.nbytes:
            self._close()
        self.bytes_received += len(chunk.data)
        self.chunks_received += 1

    def _start(self, chunk: pb.TensorChunk) -> None:
        if self._current is not None:
            raise CodecError(f"tensor {self._current!r} incomplete before {chunk.name!r} started")
        index = len(self._done)
        if chunk.name not in self._expected:
            raise CodecError(f"unexpected tensor {chunk.name!r}")
        if index >= len(self._order) or self._order[index] != chunk.name:
            raise CodecError(f"tensor {chunk.name!r} out of order (expected {self._order[index:index+1]})")
        spec = self._expected[chunk.name]
        if chunk.dtype != spec.dtype:
            raise CodecError(f"tensor {chunk.name!r}: dtype {chunk.dtype!r}, expected {spec.dtype!r}")
        if tuple(chunk.shape) != spec.shape:
            raise CodecError(f"tensor {chunk.name!r}: shape {tuple(chunk.shape)}, expected {spec.shape}")
        if len(chunk.sha256) != 32:
            raise CodecError(f"tensor {chunk.name!r}: missing or malformed SHA-256")
        self._current, self._buffer, self._digest = chunk.name, bytearray(), chunk.sha256
        if spec.nbytes == 0:
            self._close()

    def _close(self) -> None:
        assert self._current is not None and self._buffer is not None
        name, spec = self._current, self._expected[self._current]
        if hashlib.sha256(self._buffer).digest() != self._digest:
            raise CodecError(f"tensor {name!r}: SHA-256 mismatch")
        self.digests[name] = self._digest
        array = np.frombuffer(self._buffer, dtype=_DTYPES[spec.dtype]).reshape(spec.shape)  # writable, no copy
        self._done[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
        self._current, self._buffer = None, None

    def finish(self) -> dict[str, np.ndarray]:
        if self._current is not None:
            raise CodecError(f"tensor {self._current!r} truncated")
        missing = [n for n in self._order if n not in self._done]
        if missing:
            raise CodecError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return self._done


def decode(chunks: Iterable[pb.TensorChunk], expected: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    assembler = TensorAssembler(expected)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
