"""t-of-n Shamir secret sharing over GF(p), p = 2**521 - 1.

Secure aggregation needs each silo's 32-byte mask seed and mask private key to be recoverable by
any ``t`` surviving peers when a silo drops out, and by no coalition of fewer than ``t``. The
maintained libraries we looked at only share 16-byte secrets, so this is a deliberately small
implementation: one random polynomial of degree ``t - 1`` per secret, evaluated at ``x = 1..n``.

Why this prime: the Mersenne prime 2**521 - 1 exceeds every 65-byte integer, so a secret of up to
64 bytes plus a one-byte length marker (0x01 in front, so leading zero bytes survive the trip
through an integer) is a single field element; there is no chunking to get wrong.

What Shamir does NOT give:

* No integrity. Interpolation accepts any ``t`` points; a wrong or forged share silently yields a
  wrong secret (the marker check in :func:`combine` catches most garbage, not a deliberate forgery).
  The protocol therefore carries shares only inside AES-GCM under pairwise keys
  (:func:`crypto.key_agreement.seal`), which authenticates who sent which share.
* No verifiability. A dealer can hand out inconsistent shares; nobody can tell before combining.
* No protection of the secret once ``t`` shares meet in one place: whoever combines learns it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fcmoe.errors import FcMoeError

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64
MAX_SHARES = 65535
X_BYTES = 2
Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = X_BYTES + Y_BYTES
_MARKER = b"\x01"


class ShamirError(FcMoeError):
    """Bad sharing parameters, a malformed share, or shares that cannot be combined."""


def _check_point(x: object, y: object) -> None:
    """Refuse anything that is not a share point: x = 0 would be the secret itself."""
    if not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= MAX_SHARES:
        raise ShamirError(f"share x must be an integer in 1..{MAX_SHARES}, got {x!r}")
    if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < PRIME:
        raise ShamirError(f"share y of x={x} is not an element of GF(2**521 - 1)")


@dataclass(frozen=True)
class Share:
    """One point ``(x, f(x))`` of the sharing polynomial; validated on construction."""

    x: int
    y: int

    def __post_init__(self) -> None:
        _check_point(self.x, self.y)

    def to_bytes(self) -> bytes:
        """Fixed width (2-byte x, 66-byte y, big-endian), so a share's size leaks nothing."""
        return self.x.to_bytes(X_BYTES, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output; :class:`ShamirError` on wrong length or range."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ShamirError(f"share must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != SHARE_BYTES:
            raise ShamirError(f"share must be {SHARE_BYTES} bytes, got {len(raw)}")
        return cls(int.from_bytes(raw[:X_BYTES], "big"), int.from_bytes(raw[X_BYTES:], "big"))


def _check_threshold(n: int, t: int) -> None:
    for name, value in (("n", n), ("t", t)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ShamirError(f"{name} must be an integer, got {value!r}")
    if not 1 <= t <= n <= MAX_SHARES:
        raise ShamirError(f"need 1 <= t <= n <= {MAX_SHARES}, got t={t}, n={n}")


def encode_secret(secret: bytes) -> int:
    """The field element ``0x01 || secret``: the marker keeps leading zero bytes and the length."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise ShamirError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret must be at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    return int.from_bytes(_MARKER + bytes(secret), "big")


def decode_secret(value: int) -> bytes:
    """Inverse of :func:`encode_secret`; :class:`ShamirError` if ``value`` carries no marker."""
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw.startswith(_MARKER) or len(raw) - 1 > MAX_SECRET_BYTES:
        raise ShamirError("shares do not combine to an encoded secret (wrong, mixed or too few shares)")
    return raw[1:]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner's rule mod p; ``coefficients[0]`` is the constant term."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, n: int, t: int) -> list[Share]:
    """Split ``secret`` (0..64 bytes) into ``n`` shares, any ``t`` of which recover it.

    Coefficients come from :mod:`secrets`: a predictable polynomial would let fewer than ``t``
    shares reveal the secret.
    """
    _check_threshold(n, t)
    coefficients = [encode_secret(secret)] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in range(1, n + 1)]


def _lagrange_at_zero(points: Sequence[Share]) -> int:
    """``f(0)`` of the unique polynomial of degree ``len(points) - 1`` through ``points``."""
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * pj.x % PRIME
                den = den * (pj.x - pi.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Sequence[Share], t: int) -> bytes:
    """Recover the secret from the first ``t`` of ``shares``.

    Every share given is checked (range, duplicate x) even beyond the first ``t``: a repeated x
    means the caller mixed up its bookkeeping, and silently dropping one would hide that.
    Only the marker is checked on the result; see the module docstring on integrity.
    """
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= MAX_SHARES:
        raise ShamirError(f"threshold t must be an integer in 1..{MAX_SHARES}, got {t!r}")
    seen: set[int] = set()
    for share in shares:
        if not isinstance(share, Share):
            raise ShamirError(f"expected Share, got {type(share).__name__}")
        _check_point(share.x, share.y)
        if share.x in seen:
            raise ShamirError(f"duplicate share x={share.x}")
        seen.add(share.x)
    if len(seen) < t:
        raise ShamirError(f"need {t} shares to combine, got {len(seen)}")
    return decode_secret(_lagrange_at_zero(list(shares)[:t]))
