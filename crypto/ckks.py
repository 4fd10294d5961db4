"""CKKS building blocks for ``mode: ckks``: one key-holder silo, additive aggregation under its public key.

The key-holder silo creates a CKKS key pair (:func:`new_secret_context`) and publishes the public
context (:func:`public_context_bytes`). Every silo encrypts its update under it (:func:`encrypt`);
the aggregator, which only ever holds the public context, weights and sums the ciphertexts
(:func:`scale`, :func:`add`) and hands the key holder one encrypted sum, which the key holder
decrypts (:func:`decrypt_sum`). Without the secret key a ciphertext is IND-CPA secure (RLWE at the
HE-standard 128-bit level, which SEAL enforces when it builds a context), so the aggregator learns
nothing from the individual vectors.

Trust model, stated plainly: the aggregator must never hold the secret context, and the key holder
must never see an individual silo's ciphertext; if the two collude, every vector is in the clear.
The secret context therefore travels only between silos, encrypted under pairwise keys
(:func:`secret_context_bytes`). The key holder cannot tell a sum from a single contribution that
was re-randomised; see :func:`decrypt_sum` and silo_agent/ckks_round.py for what the signed
contributions do and do not guarantee.

Parameters. Degree 8192, moduli 60-40-58-60 bits (218 bits: the most SEAL allows at 128-bit
security), scale ``2**58``. The scale is as large as the chain allows because the flooding noise
(below) is ``2**20`` times the decryption error, which is fixed in absolute terms (coefficient
units), so only a larger scale makes it small in value units.

Levels. A multiplication by a plaintext scalar is rescaled away by the 58-bit prime, leaving 100
bits, so values up to ``2**41`` in magnitude decrypt correctly; there is no second 58-bit prime, so a
second :func:`scale` is refused (SEAL: scale out of bounds; :attr:`CkksParams.max_multiplications`
is 1). Scale every term before summing: then all terms sit at the same level. (TenSEAL mod-switches
the fresher operand of a mixed-level :func:`add` down, which is correct.)

Error model. CKKS is approximate; the exact decryption of a weighted sum carries a lattice error
``e`` that depends on the secret key. Measured at the defaults (3 keys, sums of ``n = 1..10``
vectors of 4096 entries, weights 0.01..3, imaginary and real parts of all 4096 slots): the l2 norm
over a chunk's slots of the key-dependent error is about ``3.5e-13 * sqrt(n)`` for weights up to 1
(the rescale's rounding dominates and does not shrink with the weight) and ``2.5e-13`` per unit of
weight above 1, i.e. ``~2**16.6 / 2**58`` per term. :func:`decryption_noise_bound` takes
``B = 2**(20 - 58) * sqrt(sum max(1, |w_i|)**2)``, about 10x the measurement, as the bound.
:func:`scale` also leaves a deterministic relative error of about ``1e-12`` (TenSEAL resets the scale
to ``2**58`` after dividing by a prime only close to it); it does not depend on the key.

Releasing decryptions (noise flooding). Li and Micciancio (Eurocrypt 2021) recovered CKKS secret keys
from exact decryptions of ciphertexts the attacker knows, and a key holder that decrypts whatever it
is sent gives the key away outright: ``(c0, c1) = (0, t)``, built from the public parameters,
decrypts to ``t * s``, and two such ciphertexts reveal every coefficient of ``s``
(tests/integration/test_attack_ckks.py does this against the old code). :func:`decrypt_sum` therefore
(1) decrypts every chunk to all its complex slots and refuses the chunk if the imaginary parts have
l2 norm over ``B``: a sum of encrypted real vectors has imaginary parts that are decryption error
only, while a crafted ciphertext's key-dependent part ``c1 * s`` has slot values of unknown phase,
so it passes only if it is itself about as small as ``B``; and (2) releases the real parts plus
independent Gaussian noise of ``sigma = 2**20 * B`` per coordinate (:func:`flooding_sigma`), drawn
from ``os.urandom`` (Box-Muller), the noise-flooding countermeasure of Li-Micciancio and of
OpenFHE's ``NOISE_FLOODING_DECRYPT``. For an honest sum the released vector's distribution is then
within KL divergence ``||e||**2 / (2 sigma**2) <= 2**-41`` of one that does not depend on the key:
40 bits of statistical security per decrypted chunk; the divergences of ``Q`` decryptions add up,
so a run that decrypts ``Q`` chunks keeps ``40 - log2(Q)`` bits (about 23 for 10**5 chunks). For a
crafted ciphertext that passes (1) the same holds only heuristically (the phase argument above, not
a proof), and each refusal tells the aggregator one bit (refused or not) about the key; a refusal
never happens in an honest run, so it is proof of a malicious aggregator.
Cost: sigma is ``2**-18 * sqrt(sum max(1, |w_i|)**2) ~ 3.8e-6 * sqrt(sum ...)`` per coordinate of
a group sum, e.g. 6.6e-6 for 3 contributors with weights up to 1 and 7.6e-6 for 4 (measured std
7.5e-6, largest of 5300 coordinates 2.8e-5, tests/integration/test_attack_ckks.py); after division by the
group's total weight the global model moves by about that much per coordinate.

Untrusted bytes. Every context or ciphertext that arrives from elsewhere is size-limited by
``max_ciphertext_bytes``, its protobuf layout is checked (crypto/ckks_layout.py) before TenSEAL sees it (TenSEAL
indexes chunk sizes and ciphertexts without bounds checks), and every TenSEAL or SEAL exception
becomes a :class:`CkksError`. TenSEAL parses protobuf and SEAL's own binary format; nothing is
unpickled. CKKS has no integrity: a silo (or the aggregator) can add anything to a sum, and
corrupted coefficients decrypt to garbage, not to an error.

Signed contributions. :func:`chunks_digest`, :func:`contribution_bytes`, :func:`sign_contribution`
and :func:`verify_contribution` are what a silo signs for each unit it uploads (run, attempt, silo,
unit, group, digest) and how the aggregator and the key holder check it (crypto/key_agreement.py's
:func:`~crypto.key_agreement.verify_silo_signature`, against the verifier's own CA).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi  # registers seal::Modulus, so parameter checks can read bit sizes

from crypto.key_agreement import (
    KeyAgreementError,
    SignatureError,
    encode_fields,
    sign_as_silo,
    verify_silo_signature,
)
from crypto.ckks_layout import CkksError, check_context_layout, chunk_layout

MAX_CIPHERTEXT_BYTES = 2_000_000
STATISTICAL_SECURITY_BITS = 40  # flooding: sigma = 2**(40 / 2) * the decryption-error bound
# log2 of the bound on the l2 norm, over a chunk's slots, of one contributor's share of the decryption
# error, in units of 2**-scale_bits (measured ~2**16.6 at degree 8192: ~10x margin; module docstring)
NOISE_BOUND_BITS = 20
CONTRIBUTION_TAG = "fcmoe/ckks-contribution/v1"
CHUNKS_TAG = "fcmoe/ckks-chunks/v1"
_MIN_DEGREE, _MAX_DEGREE = 1024, 32768
# What TenSEAL and SEAL raise (std::invalid_argument, std::logic_error and I/O errors arrive as
# ValueError or RuntimeError through pybind11); anything else is a bug here, not bad input.
_TENSEAL_ERRORS = (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, IndexError)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters; the defaults give 128-bit security (all 218 bits allowed at degree 8192).

    The scale is as large as a 60-bit prime chain allows (``2**58``, rescaled away by the 58-bit
    prime), because the flooding noise added at decryption is ``2**20`` times the decryption error,
    and that error is fixed in absolute terms: a larger scale is what keeps the flood small.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 58, 60)
    scale_bits: int = 58
    max_ciphertext_bytes: int = MAX_CIPHERTEXT_BYTES

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if not _is_int(degree) or not _MIN_DEGREE <= degree <= _MAX_DEGREE or degree & (degree - 1):
            raise CkksError(f"poly_modulus_degree must be a power of two in [{_MIN_DEGREE}, {_MAX_DEGREE}], "
                            f"got {degree!r}")
        sizes = self.coeff_mod_bit_sizes
        if not isinstance(sizes, tuple) or len(sizes) < 2 or not all(_is_int(b) and 1 <= b <= 60 for b in sizes):
            raise CkksError(f"coeff_mod_bit_sizes must be a tuple of at least 2 ints in [1, 60], got {sizes!r}")
        if not _is_int(self.scale_bits) or not 1 <= self.scale_bits < sizes[0]:
            raise CkksError(f"scale_bits must be an int in [1, {sizes[0]}) (below the first prime), "
                            f"got {self.scale_bits!r}")
        if not _is_int(self.max_ciphertext_bytes) or self.max_ciphertext_bytes < 1:
            raise CkksError(f"max_ciphertext_bytes must be a positive int, got {self.max_ciphertext_bytes!r}")

    @property
    def slots(self) -> int:
        """Floats per ciphertext: CKKS packs ``degree / 2`` complex slots; we use their real parts."""
        return self.poly_modulus_degree // 2

    @property
    def max_multiplications(self) -> int:
        """Plaintext multiplications a fresh ciphertext can take: one per ``scale_bits``-sized prime at
        the end of the chain (special prime excluded), each of which a rescale divides away."""
        count = 0
        for bits in reversed(self.coeff_mod_bit_sizes[1:-1]):
            if bits != self.scale_bits:
                break
            count += 1
        return count

    @property
    def scale(self) -> float:
        """``2**scale_bits``: the fixed-point factor every value is encoded with."""
        return float(2 ** self.scale_bits)


DEFAULT_PARAMS = CkksParams()


def _check_bytes(data: object, max_bytes: int, what: str) -> bytes:
    """``data`` as bytes, refusing other types and anything longer than ``max_bytes`` before parsing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CkksError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CkksError(f"{what} is {len(data)} bytes, limit is {max_bytes}")
    if len(data) == 0:
        raise CkksError(f"{what} is empty")
    return bytes(data)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


# --- contexts ------------------------------------------------------------------------------------

def _context_degree(ctx: ts.Context) -> int:
    return int(ctx.seal_context().data.key_context_data().parms().poly_modulus_degree())


def _check_params(ctx: ts.Context, params: CkksParams, what: str) -> None:
    """Refuse a context whose parameters differ from the configured ones (a weaker key, a wrong scale)."""
    parms = ctx.seal_context().data.key_context_data().parms()
    if getattr(parms.scheme(), "name", None) != "CKKS":
        raise CkksError(f"{what} is not a CKKS context")
    bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
    if int(parms.poly_modulus_degree()) != params.poly_modulus_degree or bits != params.coeff_mod_bit_sizes:
        raise CkksError(f"{what} has degree {parms.poly_modulus_degree()} and moduli {bits}, expected "
                        f"{params.poly_modulus_degree} and {params.coeff_mod_bit_sizes}")
    try:
        global_scale = ctx.global_scale
    except _TENSEAL_ERRORS:
        raise CkksError(f"{what} has no global scale") from None
    if global_scale != params.scale:
        raise CkksError(f"{what} has scale {global_scale!r}, expected 2**{params.scale_bits}")


def _set_auto_flags(ctx: ts.Context) -> ts.Context:
    """Rescale and mod-switch automatically, whatever the sender's flags said: :func:`scale` and
    :func:`add` rely on both."""
    ctx.auto_rescale = True
    ctx.auto_mod_switch = True
    ctx.auto_relin = True
    return ctx


def _load_context(data: object, params: CkksParams, secret: bool) -> ts.Context:
    what = "secret context" if secret else "public context"
    raw = _check_bytes(data, params.max_ciphertext_bytes, what)
    check_context_layout(raw, secret)
    try:
        ctx = ts.context_from(raw)
    except _TENSEAL_ERRORS as error:
        raise CkksError(f"{what} does not parse: {_one_line(error)}") from None
    if ctx.is_private() != secret:
        raise CkksError(f"{what} {'lacks' if secret else 'carries'} a secret key")
    if not ctx.has_public_key():
        raise CkksError(f"{what} carries no public key")
    _check_params(ctx, params, what)
    return _set_auto_flags(ctx)


def new_secret_context(params: CkksParams = DEFAULT_PARAMS) -> ts.Context:
    """A fresh CKKS key pair for the key-holder silo, global scale set.

    No Galois keys are generated: we only add and multiply by scalars, never rotate. (TenSEAL
    always creates relinearization keys too; they are never serialized by this module.)
    """
    if not isinstance(params, CkksParams):
        raise CkksError(f"params must be CkksParams, got {type(params).__name__}")
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    except _TENSEAL_ERRORS as error:
        raise CkksError(f"SEAL refuses CKKS parameters {params}: {_one_line(error)}") from None
    ctx.global_scale = params.scale
    return _set_auto_flags(ctx)


def public_context_bytes(secret_ctx: ts.Context) -> bytes:
    """The context without the secret key (and without evaluation keys): what the aggregator and
    the other silos receive. Enough to encrypt, add and scale; useless for decrypting."""
    _check_context(secret_ctx)
    return secret_ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                save_relin_keys=False)


def load_public_context(data: bytes, params: CkksParams = DEFAULT_PARAMS) -> ts.Context:
    """Parse a public context from untrusted bytes; refuse one that carries a secret key.

    A silo that received a context carrying the key holder's secret key could decrypt everyone's
    vectors, and an aggregator that did could too; refusing makes that mistake loud. Parameters
    must equal ``params``, so nobody can get silos to encrypt under a weaker key. Authenticity is
    not checked here: an aggregator that swaps in its own public key reads every vector, so callers
    must pin the context (e.g. a digest signed by the key holder) before encrypting under it.
    """
    return _load_context(data, params, secret=False)


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """The key holder's context WITH its secret key, for its own storage.

    Never send these bytes to the aggregator: with them it decrypts every silo's vector. In the
    protocol they travel only between silos (e.g. to a successor key holder), encrypted under the
    pairwise keys of :mod:`crypto.key_agreement`.
    """
    _check_context(ctx)
    if not ctx.is_private():
        raise CkksError("context holds no secret key")
    return ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                         save_relin_keys=False)


def load_secret_context(data: bytes, params: CkksParams = DEFAULT_PARAMS) -> ts.Context:
    """Parse a context written by :func:`secret_context_bytes`; refuse one without a secret key."""
    return _load_context(data, params, secret=True)


# --- ciphertexts ---------------------------------------------------------------------------------

def _check_context(ctx: object) -> None:
    if not isinstance(ctx, ts.Context):
        raise CkksError(f"context must be a tenseal.Context, got {type(ctx).__name__}")


def _slots(ctx: ts.Context) -> int:
    return _context_degree(ctx) // 2


def _global_scale(ctx: ts.Context) -> float:
    try:
        return float(ctx.global_scale)
    except _TENSEAL_ERRORS:
        raise CkksError("context has no global scale; build it with new_secret_context") from None


def _load_chunk(ctx: ts.Context, data: object, max_bytes: int) -> ts.CKKSVector:
    """Parse one untrusted chunk, checking size, layout and what SEAL decoded."""
    raw = _check_bytes(data, max_bytes, "ciphertext")
    expected_scale = _global_scale(ctx)
    length = chunk_layout(raw, _slots(ctx), expected_scale)
    try:
        vector = ts.ckks_vector_from(ctx, raw)
        ciphertexts = vector.ciphertext()
    except _TENSEAL_ERRORS as error:
        raise CkksError(f"ciphertext does not parse: {_one_line(error)}") from None
    if vector.size() != length or len(ciphertexts) != 1:
        raise CkksError("ciphertext chunk does not match its declared layout")
    ct = ciphertexts[0]
    if ct.size() != 2 or ct.scale != expected_scale or not ct.is_ntt_form():
        raise CkksError(f"ciphertext chunk has {ct.size()} polynomials at scale {ct.scale!r}; "
                        f"expected 2 in NTT form at {expected_scale!r}")
    return vector


def _check_chunks(chunks: object, what: str) -> Sequence[bytes]:
    if not isinstance(chunks, (list, tuple)) or not chunks:
        raise CkksError(f"{what} must be a non-empty list of serialized chunks")
    return chunks


def encrypt(ctx: ts.Context, vector: np.ndarray) -> list[bytes]:
    """The 1-D float vector in ``slots``-sized chunks, each a serialized CKKS ciphertext.

    Works with the public context (every silo encrypts under the key holder's public key).
    Refuses non-finite values: a NaN or infinity has no fixed-point encoding and would poison the
    whole sum without anyone being able to tell which silo sent it.
    """
    _check_context(ctx)
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise CkksError(f"can only encrypt a non-empty 1-D vector, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise CkksError(f"cannot encrypt non-finite values ({int(np.sum(~np.isfinite(values)))} of {values.size})")
    _global_scale(ctx)
    slots = _slots(ctx)
    try:
        return [ts.ckks_vector(ctx, values[start : start + slots]).serialize()
                for start in range(0, values.size, slots)]
    except _TENSEAL_ERRORS as error:
        raise CkksError(f"encryption failed: {_one_line(error)}") from None


def add(ctx: ts.Context, a: list[bytes], b: list[bytes], *,
        max_bytes: int = MAX_CIPHERTEXT_BYTES) -> list[bytes]:
    """Chunk-wise homomorphic sum of two encrypted vectors of the same length.

    Needs only the public context: this is the aggregator's side. Add terms that have had the same
    number of :func:`scale` calls (see the module docstring on levels).
    """
    _check_context(ctx)
    a, b = _check_chunks(a, "left operand"), _check_chunks(b, "right operand")
    if len(a) != len(b):
        raise CkksError(f"cannot add vectors of {len(a)} and {len(b)} chunks")
    out = []
    for left, right in zip(a, b, strict=True):
        x, y = _load_chunk(ctx, left, max_bytes), _load_chunk(ctx, right, max_bytes)
        if x.size() != y.size():
            raise CkksError(f"cannot add chunks of {x.size()} and {y.size()} floats")
        try:
            out.append((x + y).serialize())
        except _TENSEAL_ERRORS as error:
            raise CkksError(f"homomorphic add failed: {_one_line(error)}") from None
    return out


def scale(ctx: ts.Context, a: list[bytes], factor: float, *,
          max_bytes: int = MAX_CIPHERTEXT_BYTES) -> list[bytes]:
    """Every chunk multiplied by the plaintext scalar ``factor`` (e.g. a silo's aggregation weight).

    Needs only the public context. Uses one level: the default parameters allow two such
    multiplications per ciphertext and refuse a third, but only the first keeps ample headroom
    (module docstring). ``factor`` is itself encoded at ``2**scale_bits``, so factors below
    ``2**-(scale_bits + 1)`` in magnitude round to zero and the result encrypts zeros.
    """
    _check_context(ctx)
    a = _check_chunks(a, "operand")
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating, np.integer)):
        raise CkksError(f"scale factor must be a real number, got {factor!r}")
    if not math.isfinite(float(factor)):
        raise CkksError(f"scale factor must be finite, got {factor!r}")
    out = []
    for data in a:
        vector = _load_chunk(ctx, data, max_bytes)
        try:
            out.append((vector * float(factor)).serialize())
        except _TENSEAL_ERRORS as error:
            raise CkksError(f"homomorphic scale failed (no level left?): {_one_line(error)}") from None
    return out


def decryption_noise_bound(ctx: ts.Context, weights: Sequence[float]) -> float:
    """Bound on the l2 norm, over one chunk's slots, of the decryption error of a sum of fresh
    ciphertexts each multiplied once by ``weights[i]`` (value units).

    Each term contributes its scaled encryption noise plus the rounding of its rescale, which does
    not shrink with the weight, so each counts as ``max(1, |w|)`` (module docstring, "Releasing
    decryptions", for the measurement and the margin). Larger rings carry more noise per slot.
    """
    if not weights:
        raise CkksError("a sum needs at least one weight")
    values = np.asarray([float(w) for w in weights], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise CkksError("weights must be finite")
    ring = max(1.0, _context_degree(ctx) / 8192) ** 1.5
    per_term = math.ldexp(1.0, NOISE_BOUND_BITS) / _global_scale(ctx)
    return per_term * ring * float(np.sqrt(np.sum(np.maximum(1.0, np.abs(values)) ** 2)))


def flooding_sigma(noise_bound: float) -> float:
    """Standard deviation of the flooding noise: ``2**(STATISTICAL_SECURITY_BITS / 2)`` times the bound."""
    return math.ldexp(noise_bound, STATISTICAL_SECURITY_BITS // 2)


def _gaussian(count: int, sigma: float) -> np.ndarray:
    """``count`` draws of N(0, sigma**2) from the OS's cryptographic RNG (Box-Muller on 53-bit uniforms).

    Not numpy's generators: whoever predicts the flood subtracts it and reads the key-dependent
    decryption error underneath.
    """
    pairs = -(-count // 2)
    bits = np.frombuffer(os.urandom(16 * pairs), dtype="<u8") >> np.uint64(11)
    uniform = (bits.astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]: log never sees 0
    radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
    angle = 2.0 * np.pi * uniform[pairs:]
    return (sigma * np.concatenate([radius * np.cos(angle), radius * np.sin(angle)]))[:count]


def _decrypt_complex(secret_ctx: ts.Context, vector: ts.CKKSVector) -> np.ndarray:
    """Every slot of one chunk, real and imaginary parts, exactly as decrypted (never released)."""
    try:
        context = secret_ctx.seal_context().data
        plain = tenseal.sealapi.Plaintext()
        tenseal.sealapi.Decryptor(context, secret_ctx.secret_key().data).decrypt(vector.ciphertext()[0], plain)
        return np.asarray(tenseal.sealapi.CKKSEncoder(context).decode_complex(plain), dtype=np.complex128)
    except _TENSEAL_ERRORS as error:
        raise CkksError(f"decryption failed: {_one_line(error)}") from None


def decrypt_sum(secret_ctx: ts.Context, chunks: list[bytes], length: int, contributors: int,
                min_group_size: int, *, weights: Sequence[float] | None = None,
                max_bytes: int = MAX_CIPHERTEXT_BYTES) -> np.ndarray:
    """Decrypt an aggregated vector of ``length`` floats, if it claims at least ``min_group_size`` terms,
    and release it flooded with Gaussian noise.

    ``weights`` are the plaintext factors the ``contributors`` terms were multiplied by (all 1 if
    omitted); they set the noise bound ``B`` (:func:`decryption_noise_bound`). Every chunk is
    decrypted to all its complex slots: a sum of encrypted real vectors has imaginary parts that
    are decryption error only, so a chunk whose imaginary parts have l2 norm over ``B`` is refused
    (:class:`CkksError`) -- it is not such a sum, e.g. a ciphertext crafted to decrypt to a
    multiple of the secret key. The real parts of an accepted chunk are released plus N(0, sigma**2)
    per coordinate, sigma = ``2**20 * B`` (:func:`flooding_sigma`), drawn from ``os.urandom``, so
    that the key-dependent decryption error is hidden with 40 bits of statistical security (module
    docstring, "Releasing decryptions").

    What the contributor count does not guarantee: it is a claim, and a ciphertext carries no record
    of how many vectors were summed into it. The key holder (silo_agent/ckks_round.py) therefore
    also requires each contributor's signature over its upload; even so, one silo's ciphertext
    re-randomised by the aggregator (times 1, plus an encryption of zero) passes for a sum.
    """
    _check_context(secret_ctx)
    for name, value in (("length", length), ("contributors", contributors), ("min_group_size", min_group_size)):
        if not _is_int(value):
            raise CkksError(f"{name} must be an int, got {value!r}")
    if min_group_size < 1:
        raise CkksError(f"min_group_size must be at least 1, got {min_group_size}")
    if contributors < min_group_size:
        raise CkksError(f"refusing to decrypt a sum of {contributors} contributors; "
                        f"min_group_size is {min_group_size}")
    if weights is None:
        weights = [1.0] * int(contributors)
    if len(weights) != contributors:
        raise CkksError(f"{len(weights)} weights for {contributors} contributors")
    if not secret_ctx.is_private():
        raise CkksError("context holds no secret key; only the key-holder silo can decrypt")
    if length < 1:
        raise CkksError(f"length must be positive, got {length}")
    chunks = _check_chunks(chunks, "encrypted sum")
    slots = _slots(secret_ctx)
    expected = -(-int(length) // slots)
    if len(chunks) != expected:
        raise CkksError(f"encrypted sum has {len(chunks)} chunks; {length} floats need {expected}")
    bound = decryption_noise_bound(secret_ctx, weights)
    out = np.empty(int(length), dtype=np.float64)
    for index, data in enumerate(chunks):  # every chunk is checked before anything is released
        vector = _load_chunk(secret_ctx, data, max_bytes)
        start = index * slots
        want = min(slots, int(length) - start)
        if vector.size() != want:
            raise CkksError(f"chunk {index} holds {vector.size()} floats, expected {want}")
        values = _decrypt_complex(secret_ctx, vector)
        imaginary = float(np.linalg.norm(values.imag))
        if not imaginary <= bound:
            raise CkksError(f"chunk {index}: imaginary parts of norm {imaginary:.3g} exceed the noise bound "
                            f"{bound:.3g}; not a sum of encrypted real vectors (crafted ciphertext?)")
        out[start : start + want] = values.real[:want]
    return out + _gaussian(out.size, flooding_sigma(bound))


# --- signed contributions --------------------------------------------------------------------------

def chunks_digest(chunks: Sequence[bytes]) -> bytes:
    """SHA-256 of a unit's serialized ciphertext chunks, each length-prefixed under a domain tag."""
    return hashlib.sha256(encode_fields(CHUNKS_TAG, [bytes(c) for c in chunks])).digest()


def contribution_bytes(run_id: str, session: int, silo: str, unit: str, group: int, digest: bytes) -> bytes:
    """What a silo signs for one unit of its upload: run, attempt, itself, unit, group, ciphertext digest."""
    for name, value in (("session", session), ("group", group)):
        if not _is_int(value) or not 0 <= value < 2**64:
            raise CkksError(f"{name} must be an int in 0..2**64-1, got {value!r}")
    if not run_id or not silo or not unit:
        raise CkksError("run_id, silo and unit must be non-empty")
    return encode_fields(CONTRIBUTION_TAG, [run_id.encode(), int(session).to_bytes(8, "big"), silo.encode(),
                                            unit.encode(), int(group).to_bytes(8, "big"), bytes(digest)])


def sign_contribution(identity_key_pem: bytes, run_id: str, session: int, silo: str, unit: str, group: int,
                      digest: bytes) -> bytes:
    """The silo's ECDSA signature over :func:`contribution_bytes`."""
    try:
        return sign_as_silo(identity_key_pem, contribution_bytes(run_id, session, silo, unit, group, digest))
    except KeyAgreementError as exc:
        raise CkksError(f"cannot sign the contribution: {exc}") from None


def verify_contribution(silo: str, digest: bytes, signature: bytes, certificate_pem: bytes, ca_pem: bytes,
                        run_id: str, session: int, unit: str, group: int) -> None:
    """Raise :class:`CkksError` unless ``silo`` signed ``digest`` for this run, attempt, unit and group,
    with a silo certificate issued by ``ca_pem`` (the verifier's own CA)."""
    if len(digest) != hashlib.sha256().digest_size:
        raise CkksError(f"contribution of silo {silo!r}: digest is {len(digest)} bytes, expected 32")
    what = f"contribution of silo {silo!r} to unit {unit} group {group}"
    try:
        verify_silo_signature(silo, contribution_bytes(run_id, session, silo, unit, group, digest), signature,
                              certificate_pem, ca_pem, what)
    except SignatureError as exc:
        raise CkksError(str(exc)) from None
