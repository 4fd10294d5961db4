"""Mode ckks against a malicious aggregator: the attacks of the ckks decryption-oracle issue, each
driven through the real silo sessions (silo_agent/ckks_round.py) and the real CkksRound
(aggregator/ckks_round.py), with real TenSEAL keys, real certificates and protobuf messages
serialised across the boundary. The aggregator's misbehaviour is written here, in the test.

Each attack must now fail safely: the key holder raises SecAggError (which the agent logs as
``round_refused`` with the message as reason), nothing is decrypted and the key is not recovered.
"""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from aggregator.accumulate import Coefficients
from aggregator.ckks_round import CkksKeys, CkksRound
from crypto import ckks
from crypto.pki import PkiPaths, ensure_pki, read_pem
from crypto.secagg import SecAggError, sum_chunk_name, sum_name
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from protos import fcmoe_pb2 as pb
from silo_agent.ckks_round import CkksSession
from unit.crypto.test_ckks import _varint  # protobuf varints, to hand-build TenSEAL messages

RUN, SESSION, MIN_GROUP = "run-attack", 1 << 20, 3
NAMES = ["silo0", "silo1", "silo2", "silo3"]
SIZES = {"L0.E0": 5000, "L0.shared": 300}
TARGET = "L0.E0"  # the unit whose first chunk (4096 slots) the attacker replaces


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), NAMES).directory


def wire(message):
    return type(message).FromString(message.SerializeToString())


class Federation:
    """Four silos and one aggregator, honest up to the end of the uploads (min_group_size 3)."""

    def __init__(self, pki_dir, session: int = SESSION, alpha: float | None = None):
        settings = SecureAggregationConfig(mode="ckks")
        self.agg = CkksRound(RUN, session, SIZES, settings, MIN_GROUP, read_pem(pki_dir / "ca.pem"), CkksKeys())
        self.sessions = {s: CkksSession(RUN, session, s, pki_dir, MIN_GROUP) for s in NAMES}
        for s, session_ in self.sessions.items():
            advert = wire(session_.advert())
            self.agg.check_advert(s, advert)
            self.agg.keep_advert(s, advert)
        self.agg.open_sharing(set(NAMES))
        instructions = wire(self.agg.share_instructions())
        for s, session_ in self.sessions.items():
            submission = session_.make_shares(instructions)
            submission.run_id, submission.round = RUN, 1
            self.agg.add_shares(s, wire(submission))
        rng = np.random.default_rng(7)
        self.alpha = {s: {u: alpha if alpha is not None else float(rng.uniform(0.2, 1.0)) for u in SIZES}
                      for s in NAMES}
        self.agg.open_upload(set(NAMES), Coefficients(self.alpha, {s: {u: 0 for u in SIZES} for s in NAMES}), 1.0)
        self.deltas = {s: {u: (rng.standard_normal(n) / np.sqrt(n)).astype(np.float32) for u, n in SIZES.items()}
                       for s in NAMES}
        self.payloads: dict[str, dict[str, np.ndarray]] = {}
        self.headers: dict[str, pb.UpdateHeader] = {}

    def encrypt(self, silo: str) -> None:
        """The silo encrypts and signs its upload; the (wire) header carries its signed digests."""
        session = self.sessions[silo]
        self.payloads[silo] = session.update_payload(wire(self.agg.upload_instructions(silo)), self.deltas[silo])
        self.headers[silo] = wire(pb.UpdateHeader(run_id=RUN, contributions=session.contributions))

    def upload(self, silos) -> None:
        for s in silos:
            self.encrypt(s)
            self.agg.add(s, self.payloads[s], self.headers[s].contributions)

    @property
    def holder(self) -> CkksSession:
        return self.sessions[self.agg.key_holder]

    def honest_request(self) -> tuple[pb.DecryptInstructions, dict[str, np.ndarray]]:
        instructions = wire(self.agg.decrypt_instructions())
        fetched = self.agg.encrypted_sums(self.agg.key_holder)
        assert set(fetched) == set(self.holder.sum_specs(instructions))
        return instructions, fetched


def replace_chunk(instructions: pb.DecryptInstructions, fetched: dict[str, np.ndarray], unit: str, index: int,
                  chunk: bytes) -> tuple[pb.DecryptInstructions, dict[str, np.ndarray]]:
    """The malicious aggregator's request: one chunk of a sum swapped for bytes of its choosing."""
    lie, sums = wire(instructions), dict(fetched)
    for s in lie.sums:
        if s.unit == unit:
            s.chunk_bytes[index] = len(chunk)
            sums[sum_chunk_name(s.unit, s.group, index)] = np.frombuffer(chunk, dtype=np.uint8)
    return wire(lie), sums


# --- the crafted-ciphertext attack: ciphertexts (0, t) and (0, t X^(N/2)) from the public context ---

def _tenseal_vector(seal_bytes: bytes, size: int, scale: float) -> bytes:
    """A TenSEAL CKKSVectorProto around one SEAL ciphertext."""
    sizes = _varint(size)
    return (_varint(1 << 3 | 2) + _varint(len(sizes)) + sizes + _varint(2 << 3 | 2) + _varint(len(seal_bytes))
            + seal_bytes + _varint(3 << 3 | 1) + struct.pack("<d", scale))


def _seal_file(write) -> bytes:
    path = tempfile.mktemp()
    try:
        write(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _seal_header(body: bytes) -> bytes:
    head = _seal_file(sealapi.Ciphertext().save)  # the SEAL version this TenSEAL build writes
    return struct.pack("<HBBBBHQ", 0xA15E, 16, head[3], head[4], 0, 0, 16 + len(body))


def crafted_chunk(public_ctx: ts.Context, t: int, times_i: bool = False, minus: np.ndarray | None = None) -> bytes:
    """What the attacker builds from the public context alone: c1 = t (the constant polynomial, so
    its NTT is t everywhere), c0 = 0; decrypted, it is t * s. ``times_i`` multiplies by the plaintext
    X^(N/2) (i in every slot up to sign), so the real parts then give the imaginary parts of t * s.
    ``minus``: c0 = -t * minus instead, to test a key candidate (decrypts to t * (s - minus))."""
    context = public_ctx.seal_context().data
    honest = (ts.ckks_vector(public_ctx, [0.0]) * 1.0).ciphertext()[0]  # the level of an honest sum
    parms_id, n = honest.parms_id(), honest.poly_modulus_degree()
    moduli = [m.value() for m in context.get_context_data(parms_id).parms().coeff_modulus()]
    data = np.zeros((2, len(moduli), n), dtype="<u8")
    for i, q in enumerate(moduli):
        data[1, i, :] = t % q
    body_array = struct.pack("<Q", data.size) + data.tobytes()
    body = (struct.pack("<4Q", *parms_id) + b"\x01" + struct.pack("<QQQd", 2, n, len(moduli), public_ctx.global_scale)
            + struct.pack("<Q", 1) + _seal_header(body_array) + body_array)
    blob = _seal_header(body) + body
    path = tempfile.mktemp()
    with open(path, "wb") as f:
        f.write(blob)
    ct = sealapi.Ciphertext()
    ct.load(context, path)
    os.unlink(path)
    encoder, evaluator = sealapi.CKKSEncoder(context), sealapi.Evaluator(context)
    if times_i:
        roots = [pow(3, j, 2 * n) for j in range(n // 2)]  # SEAL's slot j is the root zeta^(3^j)
        plain = sealapi.Plaintext()
        encoder.encode([1j if r % 4 == 1 else -1j for r in roots], parms_id, 1.0, plain)  # exactly X^(N/2)
        evaluator.multiply_plain_inplace(ct, plain)
    if minus is not None:
        plain = sealapi.Plaintext()
        scale = public_ctx.global_scale  # add_plain needs the ciphertext's scale: encode (-t * minus) / scale
        encoder.encode(list(-t * canonical_embedding(minus) / scale), parms_id, scale, plain)
        evaluator.add_plain_inplace(ct, plain)
    return _tenseal_vector(_seal_file(ct.save), n // 2, public_ctx.global_scale)


def _roots(n: int) -> np.ndarray:
    return np.array([pow(3, j, 2 * n) for j in range(n // 2)])


def canonical_embedding(coefficients: np.ndarray) -> np.ndarray:
    """p(zeta^(3^j)) for SEAL's slots j, zeta = exp(i pi / N)."""
    n = coefficients.size
    zeta = np.exp(1j * np.pi / n)
    values = n * np.fft.ifft(coefficients * zeta ** np.arange(n))  # p at zeta^(2m + 1), m = 0..N-1
    return values[(_roots(n) - 1) // 2]


def recover_key(real_parts: np.ndarray, imaginary_side: np.ndarray, t: int, scale: float, n: int) -> np.ndarray:
    """The attacker's estimate of s (real coefficients; round them for the ternary key) from the real
    parts of t*s/scale and of X^(N/2)*t*s/scale at SEAL's slots."""
    roots = _roots(n)
    sign = np.where(roots % 4 == 1, 1.0, -1.0)
    z = (np.asarray(real_parts) - 1j * sign * np.asarray(imaginary_side)) * scale / t
    values = np.empty(n, dtype=complex)
    values[(roots - 1) // 2] = z
    values[(2 * n - roots - 1) // 2] = np.conj(z)
    return (np.fft.fft(values) / n * np.exp(-1j * np.pi / n * np.arange(n))).real


def is_the_key(secret_ctx: ts.Context, candidate: np.ndarray) -> bool:
    """Ground truth, checked with the real key by plain TenSEAL (not the product's decryption):
    (c0, c1) = (-t * candidate, t) decrypts to t * (s - candidate), zero exactly when candidate = s."""
    t = 2**20
    chunk = crafted_chunk(secret_ctx, t, minus=np.round(candidate))
    return float(np.max(np.abs(ts.ckks_vector_from(secret_ctx, chunk).decrypt()))) < 0.5 * t / secret_ctx.global_scale


def true_key(secret_ctx: ts.Context) -> np.ndarray:
    """The secret key's coefficients, read by the test with the key (plain TenSEAL decryption)."""
    t, n = 2**48, ckks.DEFAULT_PARAMS.poly_modulus_degree
    a = ts.ckks_vector_from(secret_ctx, crafted_chunk(secret_ctx, t)).decrypt()
    b = ts.ckks_vector_from(secret_ctx, crafted_chunk(secret_ctx, t, times_i=True)).decrypt()
    key = np.round(recover_key(np.array(a), np.array(b), t, secret_ctx.global_scale, n))
    assert set(np.unique(key)) <= {-1.0, 0.0, 1.0} and is_the_key(secret_ctx, key)
    return key


def test_attack_ckks_crafted_ciphertexts_do_not_reveal_the_key(pki_dir):
    fed = Federation(pki_dir)
    fed.upload(NAMES)
    instructions, fetched = fed.honest_request()
    holder, public = fed.holder, fed.agg.keys.public
    n, scale = ckks.DEFAULT_PARAMS.poly_modulus_degree, public.global_scale
    slots = n // 2

    def ask(t: int, times_i: bool) -> np.ndarray:
        """One decryption request with the crafted chunk in place of the first chunk of TARGET's sum."""
        lie, sums = replace_chunk(instructions, fetched, TARGET, 0, crafted_chunk(public, t, times_i))
        return holder.decrypt(lie, sums)[sum_name(TARGET, 0)][:slots].astype(np.float64)

    # 1. The filed attack, at full strength: t large enough that t * s dominates everything.
    for t in (2**48, 2**40):
        for times_i in (False, True):
            with pytest.raises(SecAggError, match="imaginary parts .* exceed the noise bound"):
                ask(t, times_i)
    # 2. The adaptive attacker lowers t until the key holder answers (each refusal costs it a round)...
    t = 2**48
    while True:
        try:
            ask(t, False)
            break
        except SecAggError:
            t //= 2
            assert t >= 1, "the key holder refuses even t = 1"
    # ...then spends 8 more rounds on the same two queries and averages, to beat the noise down.
    real = np.mean([ask(t, False) for _ in range(8)], axis=0)
    imaginary = np.mean([ask(t, True) for _ in range(8)], axis=0)
    estimate = recover_key(real, imaginary, t, scale, n)
    key = true_key(holder.context)
    assert abs(np.corrcoef(estimate, key)[0, 1]) < 0.06  # nothing about s: ~1/sqrt(8192) by chance
    assert not is_the_key(holder.context, estimate) and not is_the_key(holder.context, -estimate)
    assert np.mean(np.round(np.clip(estimate, -1, 1)) == key) < 0.5  # no better than guessing the ternary key
    # and what the answers are made of: flooding noise, with the stated sigma (weights = the alphas)
    sigma = ckks.flooding_sigma(ckks.decryption_noise_bound(holder.context, [fed.alpha[s][TARGET] for s in NAMES]))
    assert np.std(real) == pytest.approx(sigma / np.sqrt(8), rel=0.15)


def test_attack_ckks_single_upload_relabelled_as_a_sum_is_refused(pki_dir):
    fed = Federation(pki_dir)
    fed.upload(NAMES)
    instructions, fetched = fed.honest_request()
    holder = fed.holder
    victim = "silo2"
    chunks = [fed.payloads[victim][f"{TARGET}#{i}"] for i in range(2)]

    def relabel(signatures) -> tuple[pb.DecryptInstructions, dict[str, np.ndarray]]:
        lie, sums = wire(instructions), dict(fetched)
        for s in lie.sums:
            if s.unit == TARGET:
                s.contributors = len(signatures) if signatures else MIN_GROUP
                del s.signed_contributions[:]
                s.signed_contributions.extend(signatures)
                s.chunk_bytes[:] = [c.size for c in chunks]
                for i, c in enumerate(chunks):
                    sums[sum_chunk_name(s.unit, s.group, i)] = c
        return wire(lie), sums

    # claimed as a sum of 3 with no signatures: refused
    with pytest.raises(SecAggError, match=f"sum of unit {TARGET} group 0 carries 0 contributor signatures"):
        holder.decrypt(*relabel([]))
    # with the real signatures of the round: the digest is the victim's signed one, refused
    real = [c for s in instructions.sums if s.unit == TARGET for c in s.signed_contributions]
    assert len(real) == 4
    with pytest.raises(SecAggError, match=f"is the upload of '{victim}' alone, relabelled as a sum"):
        holder.decrypt(*relabel(real))
    with pytest.raises(SecAggError, match=f"is the upload of '{victim}' alone"):
        holder.decrypt(*relabel([c for c in real if c.silo != holder.silo][:MIN_GROUP]))
    # the honest request still goes through after all this (the session is not poisoned)
    assert sum_name(TARGET, 0) in holder.decrypt(instructions, fetched)


def test_attack_ckks_forged_contributor_signature_is_refused(pki_dir):
    """Only silo0 and silo1 upload (a group of 2 < min_group_size 3); the aggregator claims a third
    contributor, silo2, with every signature it can come by."""
    fed = Federation(pki_dir)
    fed.encrypt("silo2")  # silo2 signs its upload, then 'drops out': the aggregator keeps the header only
    fed.upload(["silo0", "silo1"])
    fed.agg.check_group_sizes = lambda: None  # the malicious aggregator skips its own group-size check
    instructions, fetched = fed.honest_request()
    holder = fed.holder
    assert holder.silo == "silo0"
    paths = PkiPaths(pki_dir)
    key2, key3 = read_pem(paths.silo_key("silo2")), read_pem(paths.silo_key("silo3"))
    cert2 = read_pem(paths.silo_cert("silo2"))
    digest = os.urandom(32)

    def signed(key: bytes, cert: bytes, session: int = SESSION, unit: str = TARGET, group: int = 0,
               silo: str = "silo2", claimed: str = "silo2") -> pb.SignedContribution:
        signature = ckks.sign_contribution(key, RUN, session, silo, unit, group, digest)
        return pb.SignedContribution(silo=claimed, digest=digest, signature=signature, certificate_pem=cert)

    real_other_unit = fed.headers["silo2"].contributions[1]  # silo2's real signature, for L0.shared
    forgeries = {
        "signed with silo3's key": (signed(key3, cert2), "signature does not verify"),
        "silo3's own certificate": (signed(key3, read_pem(paths.silo_cert("silo3"))),
                                    "comes with the certificate of 'silo3'"),
        "another attempt of the round": (signed(key2, cert2, session=SESSION - 1), "signature does not verify"),
        "another group": (signed(key2, cert2, group=1), "signature does not verify"),
        "another unit (silo2's real signature)": (real_other_unit, "signature does not verify"),
        "the aggregator's certificate": (signed(read_pem(paths.aggregator_key), read_pem(paths.aggregator_cert)),
                                         "certificate"),
    }
    other_ca = ensure_pki(pki_dir.parent / "other-ca", ["silo2"]).directory
    forgeries["a certificate from another CA"] = (
        signed(read_pem(PkiPaths(other_ca).silo_key("silo2")), read_pem(PkiPaths(other_ca).silo_cert("silo2"))),
        "certificate rejected")
    for what, (forged, reason) in forgeries.items():
        lie = wire(instructions)
        for s in lie.sums:
            s.signed_contributions.append(forged)
            s.contributors = MIN_GROUP  # silo0, silo1 and the forged silo2
        with pytest.raises(SecAggError, match=reason):
            holder.decrypt(wire(lie), fetched)
        print(f"refused ({what})")
    # without a third signature the sum of two is refused too
    with pytest.raises(SecAggError, match="carries 2 contributor signatures; this silo's min_group_size is 3"):
        holder.decrypt(instructions, fetched)


def test_the_aggregator_refuses_an_upload_without_a_valid_signature(pki_dir):
    fed = Federation(pki_dir)
    fed.encrypt("silo1")
    payload, contributions = fed.payloads["silo1"], fed.headers["silo1"].contributions
    with pytest.raises(ProtocolError, match="0 signed contributions, expected one per unit") as missing:
        fed.agg.add("silo1", payload, [])
    assert missing.value.status == "INVALID_ARGUMENT"
    swapped = [contributions[1], contributions[0]]
    with pytest.raises(ProtocolError, match="not this silo's digest of its chunks"):
        fed.agg.add("silo1", payload, swapped)
    bad = wire(pb.UpdateHeader(contributions=contributions)).contributions
    bad[0].signature = bytes(bad[0].signature)[:-1] + bytes([bad[0].signature[-1] ^ 1])
    with pytest.raises(ProtocolError, match="signature does not verify"):
        fed.agg.add("silo1", payload, bad)
    assert not fed.agg.members and not fed.agg._sums  # nothing was added
    fed.agg.add("silo1", payload, contributions)
    assert fed.agg.members == {"silo1"}


def test_an_honest_ckks_round_decrypts_within_the_flooding_error(pki_dir):
    fed = Federation(pki_dir, alpha=0.25)
    fed.upload(NAMES)
    instructions, fetched = fed.honest_request()
    fed.agg.add_decryption(fed.agg.key_holder, fed.holder.decrypt(instructions, fetched))
    sums = fed.agg.result()
    sigma = ckks.flooding_sigma(ckks.decryption_noise_bound(fed.holder.context, [0.25] * 4))
    assert sigma == pytest.approx(2.0**-18 * 2)  # 2**20 * 2**(20 - 58) * sqrt(4 * max(1, 0.25)**2)
    errors = []
    for unit in SIZES:
        expected = sum(0.25 * fed.deltas[s][unit].astype(np.float64) for s in NAMES)
        got = sums[unit][0]
        assert got.count == 4 and got.weight == pytest.approx(1.0)
        errors.append(got.vector.astype(np.float64) - expected)
    error = np.concatenate(errors)
    print(f"flooding sigma {sigma:.3g}, measured std {np.std(error):.3g}, max {np.max(np.abs(error)):.3g}")
    assert np.std(error) == pytest.approx(sigma, rel=0.1) and np.max(np.abs(error)) < 6 * sigma
    # the global update divides by the weight (here 1): ~7.6e-6 per coordinate, well inside 1e-4
    assert np.max(np.abs(error)) < 1e-4
