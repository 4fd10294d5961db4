"""The layout of TenSEAL's serialized contexts and ciphertexts, checked before TenSEAL parses them.

TenSEAL indexes chunk sizes and ciphertexts without bounds checks, and a context's key material
decides what its holder can do, so untrusted bytes are read here first with a minimal protobuf wire
reader (top-level fields only, bounded varints): enough to refuse a wrong layout with a one-line
:class:`CkksError`, never to decode the key material itself.
"""

from __future__ import annotations

import struct

from fcmoe.errors import FcMoeError

_MAX_VARINT_BYTES = 10
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


class CkksError(FcMoeError):
    """Bad CKKS parameters, context, ciphertext or decryption request."""


def _read_varint(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    """``(value, next position)`` of the base-128 varint at ``pos``."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise CkksError(f"{what} is not well-formed protobuf: truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise CkksError(f"{what} is not well-formed protobuf: varint longer than {_MAX_VARINT_BYTES} bytes")


def _wire_fields(data: bytes | memoryview, what: str) -> list[tuple[int, int, int | memoryview]]:
    """Top-level ``(field number, wire type, value)`` triples; varints as int, the rest as bytes views."""
    view = memoryview(data)
    fields: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    while pos < len(view):
        key, pos = _read_varint(view, pos, what)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise CkksError(f"{what} is not well-formed protobuf: field number 0")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(view, pos, what)
            fields.append((field, wire, value))
            continue
        if wire == _WIRE_BYTES:
            length, pos = _read_varint(view, pos, what)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
            length = 8 if wire == _WIRE_FIXED64 else 4
        else:
            raise CkksError(f"{what} is not well-formed protobuf: wire type {wire} in field {field}")
        if pos + length > len(view):
            raise CkksError(f"{what} is not well-formed protobuf: field {field} runs past the end")
        fields.append((field, wire, view[pos : pos + length]))
        pos += length
    return fields


def _packed_varints(data: memoryview, what: str) -> list[int]:
    out = []
    pos = 0
    while pos < len(data):
        value, pos = _read_varint(data, pos, what)
        out.append(value)
    return out


def _double(value: int | memoryview) -> float:
    return struct.unpack("<d", bytes(value))[0]


def check_context_layout(data: bytes, secret: bool) -> None:
    """Refuse, before TenSEAL parses it, a context with the wrong kind of key material.

    A public context must carry exactly a public key: no private part (the secret key lives there)
    and no relinearization or Galois keys, which ``mode: ckks`` never uses and whose size an
    attacker controls. A secret context must carry the private part. Both must use public-key
    encryption, which is what lets silos other than the key holder encrypt.
    """
    what = "secret context" if secret else "public context"
    has_private = False
    public_key = False
    for field, wire, value in _wire_fields(data, what):
        if field == 1 and wire == _WIRE_BYTES:
            continue  # encryption parameters, checked after parsing
        if field == 2 and wire == _WIRE_BYTES:
            for inner, inner_wire, inner_value in _wire_fields(value, what):
                if inner == 1 and inner_wire == _WIRE_BYTES:
                    public_key = len(inner_value) > 0
                elif inner in (4, 5) and inner_wire == _WIRE_BYTES:
                    if len(inner_value):
                        raise CkksError(f"{what} carries evaluation keys, which mode ckks never uses")
                elif (inner, inner_wire) not in ((2, _WIRE_VARINT), (3, _WIRE_FIXED64)):
                    raise CkksError(f"{what} has unexpected field {inner} (wire type {inner_wire})")
        elif field == 3 and wire == _WIRE_BYTES:
            has_private = True
        elif field == 4 and wire == _WIRE_VARINT:
            if value != 0:
                raise CkksError(f"{what} uses symmetric encryption; silos need a public key")
        else:
            raise CkksError(f"{what} has unexpected field {field} (wire type {wire})")
    if has_private and not secret:
        raise CkksError("public context carries a secret key; refusing it")
    if secret and not has_private:
        raise CkksError("secret context carries no secret key")
    if not public_key:
        raise CkksError(f"{what} carries no public key")


def chunk_layout(data: bytes, slots: int, expected_scale: float) -> int:
    """Number of floats in one serialized chunk, refusing anything but one ciphertext at ``expected_scale``.

    TenSEAL's vector format lists chunk sizes and ciphertexts separately and indexes one by the
    other without bounds checks, so a mismatched or oversized list reads out of bounds.
    """
    sizes: list[int] = []
    ciphertexts = 0
    scales: list[float] = []
    for field, wire, value in _wire_fields(data, "ciphertext"):
        if field == 1 and wire == _WIRE_VARINT:
            sizes.append(int(value))
        elif field == 1 and wire == _WIRE_BYTES:
            sizes.extend(_packed_varints(value, "ciphertext"))
        elif field == 2 and wire == _WIRE_BYTES:
            ciphertexts += 1
        elif field == 3 and wire == _WIRE_FIXED64:
            scales.append(_double(value))
        else:
            raise CkksError(f"ciphertext has unexpected field {field} (wire type {wire})")
    if ciphertexts != 1 or len(sizes) != 1:
        raise CkksError(f"ciphertext chunk must hold 1 ciphertext and 1 size, got {ciphertexts} and {len(sizes)}")
    if not 1 <= sizes[0] <= slots:
        raise CkksError(f"ciphertext chunk claims {sizes[0]} floats, limit is {slots}")
    if scales != [expected_scale]:
        raise CkksError(f"ciphertext chunk has scale {scales}, expected {expected_scale!r}")
    return sizes[0]
