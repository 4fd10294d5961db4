"""crypto/shamir.py: any t shares recover the secret, t - 1 fit any other, and malformed shares are refused."""

from __future__ import annotations

import itertools
import secrets

import pytest

from crypto.shamir import PRIME, SHARE_BYTES, ShamirError, Share, combine, decode_secret, encode_secret, split


def _interpolate(points: list[tuple[int, int]], x: int) -> int:
    """The polynomial of degree len(points) - 1 through ``points``, at ``x`` (Lagrange, mod PRIME)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * (x - xj) * pow(xi - xj, -1, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


@pytest.mark.parametrize("n,t", [(1, 1), (3, 1), (3, 2), (3, 3), (5, 3), (7, 7), (10, 4)])
def test_shamir_any_t_shares_recover(n: int, t: int) -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, n, t)
    assert [s.x for s in shares] == list(range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert combine(list(subset), t) == secret
        assert combine(list(reversed(subset)), t) == secret
    assert combine(shares, t) == secret  # extra shares beyond t are fine


@pytest.mark.parametrize("n,t", [(3, 2), (3, 3), (5, 3), (10, 4)])
def test_shamir_fewer_than_t_shares_do_not_recover(n: int, t: int) -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, n, t)
    other = secrets.token_bytes(32)
    for subset in itertools.combinations(shares, t - 1):
        with pytest.raises(ShamirError, match="need"):
            combine(list(subset), t)
        # t - 1 shares fit any secret: with one more point, chosen for ``other``, they combine to it
        points = [(0, encode_secret(other))] + [(s.x, s.y) for s in subset]
        forged = Share(n + 1, _interpolate(points, n + 1))
        assert combine(list(subset) + [forged], t) == other != secret


@pytest.mark.parametrize("length", list(range(65)))
def test_shamir_every_length_round_trips(length: int) -> None:
    secret = secrets.token_bytes(length)
    assert combine(split(secret, 4, 3)[1:], 3) == secret


@pytest.mark.parametrize("secret", [b"\x00", b"\x00" * 32, b"\x00\x00\x01", b"\x00" * 63 + b"\xff", b"\x01" * 64])
def test_shamir_leading_zero_bytes_survive(secret: bytes) -> None:
    assert combine(split(secret, 3, 2)[::2], 2) == secret


@pytest.mark.parametrize("n,t,length", [(3, 0, 1), (3, 4, 1), (0, 0, 1), (65536, 2, 1), (3, 2, 65)])
def test_shamir_split_refuses_bad_parameters(n: int, t: int, length: int) -> None:
    with pytest.raises(ShamirError):
        split(bytes(length), n, t)


def test_shamir_share_bytes_round_trip() -> None:
    for share in split(secrets.token_bytes(32), 5, 3):
        raw = share.to_bytes()
        assert len(raw) == SHARE_BYTES == 68
        assert Share.from_bytes(raw) == share


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(67),
        bytes(69),
        bytes(68),  # x = 0 is the secret itself, never a share
        (1).to_bytes(2, "big") + PRIME.to_bytes(66, "big"),  # y = p is not a field element
        (1).to_bytes(2, "big") + b"\xff" * 66,
    ],
)
def test_shamir_malformed_share_bytes_refused(raw: bytes) -> None:
    with pytest.raises(ShamirError):
        Share.from_bytes(raw)


def test_shamir_bad_points_refused() -> None:
    for x, y in [(0, 1), (-1, 1), (65536, 1), (1, -1), (1, PRIME), (True, 1)]:
        with pytest.raises(ShamirError):
            Share(x, y)


def test_shamir_duplicates_refused() -> None:
    shares = split(b"k" * 32, 4, 2)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[0]], 2)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], Share(shares[0].x, (shares[0].y + 1) % PRIME), shares[1]], 2)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[1], shares[1]], 2)  # even beyond the first t


def test_shamir_bad_threshold_in_combine_refused() -> None:
    shares = split(b"k", 3, 2)
    for t in (0, -1, 65536):
        with pytest.raises(ShamirError):
            combine(shares, t)


def test_shamir_shares_of_different_secrets_do_not_mix() -> None:
    """Shamir has no integrity (crypto/shamir.py): mixed shares give the interpolation of what they are,
    which the marker check refuses unless it happens to look like a secret; never either secret."""
    secret_a, secret_b = secrets.token_bytes(32), secrets.token_bytes(32)
    a, b = split(secret_a, 3, 2), split(secret_b, 3, 2)
    value = _interpolate([(a[0].x, a[0].y), (b[1].x, b[1].y)], 0)
    try:
        expected = decode_secret(value)
    except ShamirError:
        with pytest.raises(ShamirError, match="do not combine"):
            combine([a[0], b[1]], 2)
    else:  # about 1 time in 500
        assert combine([a[0], b[1]], 2) == expected
        assert expected not in (secret_a, secret_b)
