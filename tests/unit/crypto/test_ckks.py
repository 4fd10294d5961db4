"""CKKS building blocks: weighted sums under a public context, key separation, refusal of bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal as ts

from crypto import ckks, ckks_layout
from crypto.ckks import CkksError, CkksParams

LENGTH = 5000  # two chunks of 4096 slots at the default parameters
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def secret_ctx() -> ts.Context:
    return ckks.new_secret_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: ts.Context) -> ts.Context:
    return ckks.load_public_context(ckks.public_context_bytes(secret_ctx))


@pytest.fixture(scope="module")
def chunks(public_ctx: ts.Context) -> list[bytes]:
    return ckks.encrypt(public_ctx, np.linspace(-1, 1, LENGTH))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    body = _varint(len(payload)) + payload if wire == 2 else payload
    return _varint(number << 3 | wire) + body


def _vector_proto(sizes: list[int], ciphertexts: list[bytes], scale: float) -> bytes:
    """A TenSEAL CKKSVectorProto built by hand, to produce layouts TenSEAL itself never writes."""
    out = _field(1, 2, b"".join(_varint(s) for s in sizes)) if sizes else b""
    out += b"".join(_field(2, 2, ct) for ct in ciphertexts)
    return out + _field(3, 1, struct.pack("<d", scale))


def _seal_ciphertext(chunk: bytes) -> bytes:
    (ct,) = [bytes(v) for f, _, v in ckks_layout._wire_fields(chunk, "test") if f == 2]
    return ct


@pytest.mark.parametrize("silos", range(2, 11))
def test_weighted_sum_under_public_context(secret_ctx: ts.Context, public_ctx: ts.Context, silos: int) -> None:
    rng = np.random.default_rng(silos)
    vectors = rng.uniform(-1, 1, size=(silos, LENGTH))
    alphas = rng.uniform(0, 1, size=silos)
    alphas[alphas == 0] = 1.0
    terms = [ckks.scale(public_ctx, ckks.encrypt(public_ctx, vector), float(alpha))
             for vector, alpha in zip(vectors, alphas, strict=True)]
    total = terms[0]
    for term in terms[1:]:
        total = ckks.add(public_ctx, total, term)
    assert len(total) == 2
    out = ckks.decrypt_sum(secret_ctx, total, LENGTH, contributors=silos, min_group_size=2)
    assert out.shape == (LENGTH,) and out.dtype == np.float64
    assert np.max(np.abs(out - alphas @ vectors)) < TOLERANCE


def test_secret_context_round_trip_decrypts(secret_ctx: ts.Context, chunks: list[bytes]) -> None:
    restored = ckks.load_secret_context(ckks.secret_context_bytes(secret_ctx))
    out = ckks.decrypt_sum(restored, chunks, LENGTH, contributors=3, min_group_size=3)
    assert np.max(np.abs(out - np.linspace(-1, 1, LENGTH))) < TOLERANCE


def test_decryptions_are_flooded_with_fresh_noise_of_the_stated_sigma(secret_ctx: ts.Context,
                                                                      chunks: list[bytes]) -> None:
    weights = [0.5, 1.0, 3.0]
    sigma = ckks.flooding_sigma(ckks.decryption_noise_bound(secret_ctx, weights))
    assert sigma == pytest.approx(2.0**-18 * np.sqrt(1 + 1 + 9))  # 2**20 * 2**(20 - 58) per unit weight
    first, second = (ckks.decrypt_sum(secret_ctx, chunks, LENGTH, 3, 3, weights=weights) for _ in range(2))
    error = first - np.linspace(-1, 1, LENGTH)
    assert np.std(error) == pytest.approx(sigma, rel=0.1) and abs(np.mean(error)) < 5 * sigma / np.sqrt(LENGTH)
    assert not np.any(first == second)  # fresh noise every time: nothing to average out by asking twice
    with pytest.raises(CkksError, match="2 weights for 3 contributors"):
        ckks.decrypt_sum(secret_ctx, chunks, LENGTH, 3, 3, weights=weights[:2])


def test_mixed_levels_add_correctly(secret_ctx: ts.Context, public_ctx: ts.Context, chunks: list[bytes]) -> None:
    total = ckks.add(public_ctx, chunks, ckks.scale(public_ctx, chunks, 0.5))
    out = ckks.decrypt_sum(secret_ctx, total, LENGTH, 2, 2)
    assert np.max(np.abs(out - 1.5 * np.linspace(-1, 1, LENGTH))) < TOLERANCE


def test_levels_allow_one_scale_then_refuse(secret_ctx: ts.Context, public_ctx: ts.Context,
                                            chunks: list[bytes]) -> None:
    assert CkksParams().max_multiplications == 1
    assert CkksParams(coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40).max_multiplications == 2
    once = ckks.scale(public_ctx, chunks, 0.5)
    out = ckks.decrypt_sum(secret_ctx, once, LENGTH, 1, 1)
    assert np.max(np.abs(out - 0.5 * np.linspace(-1, 1, LENGTH))) < TOLERANCE
    with pytest.raises(CkksError, match="no level left"):
        ckks.scale(public_ctx, once, 0.5)


def test_public_context_cannot_decrypt(secret_ctx: ts.Context, public_ctx: ts.Context,
                                       chunks: list[bytes]) -> None:
    assert secret_ctx.is_private() and not public_ctx.is_private()
    assert not ts.context_from(ckks.public_context_bytes(secret_ctx)).is_private()
    with pytest.raises(CkksError, match="no secret key"):
        ckks.decrypt_sum(public_ctx, chunks, LENGTH, contributors=5, min_group_size=2)
    with pytest.raises(CkksError, match="no secret key"):
        ckks.secret_context_bytes(public_ctx)


def test_load_public_context_refuses_secret_material(secret_ctx: ts.Context) -> None:
    with pytest.raises(CkksError, match="secret key"):
        ckks.load_public_context(ckks.secret_context_bytes(secret_ctx))
    with pytest.raises(CkksError, match="secret key"):
        ckks.load_public_context(secret_ctx.serialize(save_secret_key=True))
    with pytest.raises(CkksError, match="evaluation keys"):
        ckks.load_public_context(secret_ctx.serialize(save_secret_key=False))
    with pytest.raises(CkksError, match="no secret key"):
        ckks.load_secret_context(ckks.public_context_bytes(secret_ctx))


def test_load_public_context_refuses_other_parameters() -> None:
    other = ckks.new_secret_context(CkksParams(scale_bits=30))
    with pytest.raises(CkksError, match="scale"):
        ckks.load_public_context(ckks.public_context_bytes(other))
    assert ckks.load_public_context(ckks.public_context_bytes(other), CkksParams(scale_bits=30)).is_public()


@pytest.mark.parametrize("data", [b"", b"\x00", b"garbage" * 10, b"\xff" * 20])
def test_load_public_context_refuses_garbage(data: bytes) -> None:
    with pytest.raises(CkksError):
        ckks.load_public_context(data)


def test_load_public_context_refuses_truncated_and_oversized(secret_ctx: ts.Context) -> None:
    data = ckks.public_context_bytes(secret_ctx)
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(CkksError):
            ckks.load_public_context(data[:cut])
    with pytest.raises(CkksError, match="limit"):
        ckks.load_public_context(data, CkksParams(max_ciphertext_bytes=len(data) - 1))


def test_decrypt_sum_refuses_small_groups(secret_ctx: ts.Context, chunks: list[bytes]) -> None:
    with pytest.raises(CkksError, match="min_group_size"):
        ckks.decrypt_sum(secret_ctx, chunks, LENGTH, contributors=2, min_group_size=3)
    with pytest.raises(CkksError, match="min_group_size"):
        ckks.decrypt_sum(secret_ctx, chunks, LENGTH, contributors=0, min_group_size=0)


def test_decrypt_sum_refuses_mismatched_chunks(secret_ctx: ts.Context, chunks: list[bytes]) -> None:
    with pytest.raises(CkksError, match="chunks"):
        ckks.decrypt_sum(secret_ctx, chunks[:1], LENGTH, 3, 3)
    with pytest.raises(CkksError, match="chunks"):
        ckks.decrypt_sum(secret_ctx, chunks + chunks[:1], LENGTH, 3, 3)
    with pytest.raises(CkksError, match="chunks"):
        ckks.decrypt_sum(secret_ctx, chunks, 4096, 3, 3)
    with pytest.raises(CkksError, match="expected"):
        ckks.decrypt_sum(secret_ctx, chunks, LENGTH + 1, 3, 3)  # same chunk count, wrong last chunk
    with pytest.raises(CkksError, match="expected"):
        ckks.decrypt_sum(secret_ctx, chunks[::-1], LENGTH, 3, 3)
    with pytest.raises(CkksError):
        ckks.decrypt_sum(secret_ctx, [], LENGTH, 3, 3)


def test_add_refuses_mismatched_operands(public_ctx: ts.Context, chunks: list[bytes]) -> None:
    with pytest.raises(CkksError, match="chunks"):
        ckks.add(public_ctx, chunks, chunks[:1])
    with pytest.raises(CkksError, match="floats"):
        ckks.add(public_ctx, chunks, chunks[::-1])


def _operations(secret_ctx: ts.Context, public_ctx: ts.Context, chunks: list[bytes]):
    """Each way untrusted chunk bytes enter the module, with a bad first chunk spliced in."""
    return [
        lambda bad: ckks.add(public_ctx, [bad, chunks[1]], chunks),
        lambda bad: ckks.add(public_ctx, chunks, [bad, chunks[1]]),
        lambda bad: ckks.scale(public_ctx, [bad, chunks[1]], 0.5),
        lambda bad: ckks.decrypt_sum(secret_ctx, [bad, chunks[1]], LENGTH, 3, 3),
    ]


def test_truncated_and_oversized_ciphertexts_raise(secret_ctx: ts.Context, public_ctx: ts.Context,
                                                   chunks: list[bytes]) -> None:
    good = chunks[0]
    bad_inputs = [good[:cut] for cut in (0, 1, 5, 100, len(good) // 2, len(good) - 1)]
    bad_inputs += [good + b"\x00" * 5, b"\x00" * 64, bytes(range(256)) * 4, "not bytes"]
    for op in _operations(secret_ctx, public_ctx, chunks):
        for bad in bad_inputs:
            with pytest.raises(CkksError):
                op(bad)
    with pytest.raises(CkksError, match="limit"):
        ckks.add(public_ctx, chunks, chunks, max_bytes=len(good) - 1)
    with pytest.raises(CkksError, match="limit"):
        ckks.decrypt_sum(secret_ctx, chunks, LENGTH, 3, 3, max_bytes=len(good) - 1)


def test_hand_crafted_layouts_raise(secret_ctx: ts.Context, public_ctx: ts.Context, chunks: list[bytes]) -> None:
    ct = _seal_ciphertext(chunks[0])
    scale = public_ctx.global_scale
    assert ckks.add(public_ctx, [_vector_proto([4096], [ct], scale), chunks[1]], chunks)  # the layout is right
    bad_inputs = [
        _vector_proto([4096, 4096], [ct], scale),  # more sizes than ciphertexts: TenSEAL would read past the end
        _vector_proto([4096], [ct, ct], scale),
        _vector_proto([], [ct], scale),
        _vector_proto([4097], [ct], scale),  # more floats than slots
        _vector_proto([0], [ct], scale),
        _vector_proto([4096], [ct], 2.0 ** 20),  # wrong scale would silently rescale the sum
        _vector_proto([4096], [ct], scale) + _field(9, 0, b"\x01"),
        _vector_proto([4096], [ct[: len(ct) // 2]], scale),
    ]
    for op in _operations(secret_ctx, public_ctx, chunks):
        for bad in bad_inputs:
            with pytest.raises(CkksError):
                op(bad)


def test_ciphertext_from_other_parameters_raises(public_ctx: ts.Context, chunks: list[bytes]) -> None:
    other = ckks.new_secret_context(CkksParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60)))
    foreign = ckks.encrypt(other, np.zeros(10))
    with pytest.raises(CkksError):
        ckks.add(public_ctx, foreign, foreign)


def test_corrupted_ciphertexts_never_crash(secret_ctx: ts.Context, public_ctx: ts.Context,
                                           chunks: list[bytes]) -> None:
    """CKKS has no integrity, so some flips decrypt to garbage; none may escape as another error."""
    rng = np.random.default_rng(0)
    raised = 0
    for trial in range(40):
        bad = bytearray(chunks[0])
        for position in rng.integers(0, len(bad), size=1 + trial % 4):
            bad[position] ^= int(rng.integers(1, 256))
        try:
            ckks.decrypt_sum(secret_ctx, [bytes(bad), chunks[1]], LENGTH, 3, 3)
        except CkksError:
            raised += 1
    assert raised > 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_refused(public_ctx: ts.Context, value: float) -> None:
    vector = np.zeros(LENGTH)
    vector[4500] = value
    with pytest.raises(CkksError, match="non-finite"):
        ckks.encrypt(public_ctx, vector)


def test_bad_shapes_and_factors_refused(public_ctx: ts.Context, chunks: list[bytes]) -> None:
    with pytest.raises(CkksError, match="1-D"):
        ckks.encrypt(public_ctx, np.zeros((2, 3)))
    with pytest.raises(CkksError, match="1-D"):
        ckks.encrypt(public_ctx, np.zeros(0))
    for factor in (float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(CkksError):
            ckks.scale(public_ctx, chunks, factor)


def test_params_validated() -> None:
    assert CkksParams().slots == 4096
    for bad in ({"poly_modulus_degree": 1000}, {"coeff_mod_bit_sizes": [60, 40, 60]},
                {"coeff_mod_bit_sizes": (60,)}, {"scale_bits": 60}, {"max_ciphertext_bytes": 0}):
        with pytest.raises(CkksError):
            CkksParams(**bad)
    with pytest.raises(CkksError, match="SEAL refuses"):  # 300 bits exceed the 128-bit bound at degree 8192
        ckks.new_secret_context(CkksParams(coeff_mod_bit_sizes=(60, 60, 60, 60, 60)))
