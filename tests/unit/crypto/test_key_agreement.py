"""crypto/key_agreement.py: signed key adverts (every forgery refused), pairwise X25519 secrets, AES-GCM sealing."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crypto.key_agreement import (
    AdvertError,
    ChannelError,
    KeyAdvert,
    KeyAgreementError,
    RoundKeys,
    open_sealed,
    pairwise_secret,
    seal,
    verify_advert,
)
from crypto.pki import PkiPaths, ensure_pki, issue_certificate, read_pem

RUN = "run-7"


SILOS = ["silo0", "silo1", "silo2"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return ensure_pki(tmp_path_factory.mktemp("pki"), SILOS)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return ensure_pki(tmp_path_factory.mktemp("other-pki"), SILOS)


def _advert(pki: PkiPaths, silo: str, round_: int = 3, signer: str | None = None) -> KeyAdvert:
    return RoundKeys(RUN, round_, silo).advert(read_pem(pki.silo_key(signer or silo)))


def _verify(pki: PkiPaths, advert: KeyAdvert, cert_of: str | None = None, run_id: str = RUN,
            round_: int = 3) -> None:
    cert = read_pem(pki.silo_cert(cert_of or advert.silo))
    verify_advert(advert, cert, read_pem(pki.ca_cert), run_id, round_)


def _flip(data: bytes, i: int, mask: int = 0xFF) -> bytes:
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


def _flip_text(text: str, i: int) -> str:
    # xor 0x01 keeps ASCII text valid and changes exactly one byte
    return _flip(text.encode(), i, 0x01).decode()


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def test_valid_advert_verifies(pki: PkiPaths) -> None:
    keys = RoundKeys(RUN, 3, "silo1")
    advert = keys.advert(read_pem(pki.silo_key("silo1")))
    assert (advert.run_id, advert.round, advert.silo) == (RUN, 3, "silo1")
    assert advert.mask_public == keys.mask_public and len(advert.mask_public) == 32
    assert advert.channel_public == keys.channel_public and len(advert.channel_public) == 32
    assert advert.mask_public != advert.channel_public
    _verify(pki, advert)


def test_round_keys_are_fresh_and_not_printed(pki: PkiPaths) -> None:
    a, b = RoundKeys(RUN, 3, "silo0"), RoundKeys(RUN, 3, "silo0")
    assert len({a.mask_public, a.channel_public, b.mask_public, b.channel_public}) == 4
    assert "silo0" in repr(a) and a.mask_private.private_bytes_raw().hex() not in repr(a)


@pytest.mark.parametrize("field", ["mask_public", "channel_public", "signature"])
def test_advert_flipped_byte_in_bytes_field_fails(pki: PkiPaths, field: str) -> None:
    advert = _advert(pki, "silo0")
    value: bytes = getattr(advert, field)
    for i in range(len(value)):
        tampered = replace(advert, **{field: _flip(value, i)})
        with pytest.raises(AdvertError, match="silo0"):
            _verify(pki, tampered)


def test_advert_flipped_byte_in_run_id_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0")
    for i in range(len(RUN)):
        run = _flip_text(RUN, i)
        tampered = replace(advert, run_id=run)
        with pytest.raises(AdvertError, match="run"):
            _verify(pki, tampered)
        with pytest.raises(AdvertError, match="signature"):  # even for a verifier expecting that run
            _verify(pki, tampered, run_id=run)


def test_advert_flipped_byte_in_round_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0", round_=3)
    for i in range(8):
        round_ = 3 ^ (0xFF << (8 * i))
        tampered = replace(advert, round=round_)
        with pytest.raises(AdvertError, match="round"):
            _verify(pki, tampered, round_=3)
        with pytest.raises(AdvertError, match="signature"):
            _verify(pki, tampered, round_=round_)


def test_advert_flipped_byte_in_silo_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0")
    for i in range(len("silo0")):
        with pytest.raises(AdvertError):
            _verify(pki, replace(advert, silo=_flip_text("silo0", i)), cert_of="silo0")
    # silo0 -> silo1 is a one-byte change that names another real silo: its key did not sign it
    with pytest.raises(AdvertError, match="signature"):
        _verify(pki, replace(advert, silo="silo1"))


def test_advert_signed_by_another_silo_fails(pki: PkiPaths) -> None:
    forged = _advert(pki, "silo1", signer="silo2")
    with pytest.raises(AdvertError, match="'silo1'.*signature"):
        _verify(pki, forged)
    with pytest.raises(AdvertError, match="certificate of 'silo2'"):
        _verify(pki, forged, cert_of="silo2")


def test_advert_with_certificate_of_another_ca_fails(pki: PkiPaths, other_pki: PkiPaths) -> None:
    advert = _advert(other_pki, "silo0")
    foreign_cert = read_pem(other_pki.silo_cert("silo0"))
    with pytest.raises(AdvertError, match="certificate rejected"):
        verify_advert(advert, foreign_cert, read_pem(pki.ca_cert), RUN, 3)


def test_advert_with_expired_certificate_fails(pki: PkiPaths, tmp_path: Path) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=10)
    cert, key = issue_certificate(read_pem(pki.ca_cert), read_pem(pki.ca_key), "silo0", server=False,
                                  not_before=past, not_after=past + timedelta(days=1))
    advert = RoundKeys(RUN, 3, "silo0").advert(key)
    with pytest.raises(AdvertError, match="expired"):
        verify_advert(advert, cert, read_pem(pki.ca_cert), RUN, 3)


def test_advert_signed_with_aggregator_certificate_fails(pki: PkiPaths) -> None:
    advert = RoundKeys(RUN, 3, "aggregator").advert(read_pem(pki.aggregator_key))
    with pytest.raises(AdvertError, match="not a silo"):
        verify_advert(advert, read_pem(pki.aggregator_cert), read_pem(pki.ca_cert), RUN, 3)


def test_advert_replayed_into_next_round_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0", round_=3)
    _verify(pki, advert, round_=3)
    with pytest.raises(AdvertError, match="round 3, expected 4"):
        _verify(pki, advert, round_=4)
    with pytest.raises(AdvertError, match="signature"):
        _verify(pki, replace(advert, round=4), round_=4)


def test_advert_replayed_into_another_run_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0")
    with pytest.raises(AdvertError, match="run"):
        _verify(pki, advert, run_id="run-8")


def test_advert_wrong_key_length_fails(pki: PkiPaths) -> None:
    advert = _advert(pki, "silo0")
    for field in ("mask_public", "channel_public"):
        for value in (b"", getattr(advert, field)[:31], getattr(advert, field) + b"\x00"):
            with pytest.raises(AdvertError, match=field):
                _verify(pki, replace(advert, **{field: value}))


def test_advert_encoding_is_unambiguous() -> None:
    base = {"round": 1, "mask_public": b"m" * 32, "channel_public": b"c" * 32, "signature": b""}
    a = KeyAdvert(run_id="ab", silo="c", **base)  # type: ignore[arg-type]
    b = KeyAdvert(run_id="a", silo="bc", **base)  # type: ignore[arg-type]
    assert a.signed_bytes() != b.signed_bytes()
    assert a.signed_bytes().startswith(b"\x00\x00\x00\x0ffcmoe/advert/v1")
    assert replace(a, signature=b"x").signed_bytes() == a.signed_bytes()


def test_advert_refuses_non_p256_identity_key(pki: PkiPaths) -> None:
    with pytest.raises(KeyAgreementError):
        RoundKeys(RUN, 3, "silo0").advert(b"not a key")


def test_pairwise_secret_symmetric() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    for purpose in ("mask", "channel"):
        ab = pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo1", purpose)
        ba = pairwise_secret(b, _pub(a), RUN, 3, "silo1", "silo0", purpose)
        assert ab == ba and len(ab) == 32


def test_pairwise_secret_differs_by_purpose_round_run_and_pair() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    base = pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo1", "mask")
    variants = [
        pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo1", "channel"),
        pairwise_secret(a, _pub(b), RUN, 4, "silo0", "silo1", "mask"),
        pairwise_secret(a, _pub(b), "run-8", 3, "silo0", "silo1", "mask"),
        pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo2", "mask"),  # same keys, other pair ids
        pairwise_secret(a, _pub(c), RUN, 3, "silo0", "silo2", "mask"),  # other peer
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_pairwise_secret_refuses_bad_input() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    with pytest.raises(KeyAgreementError, match="purpose"):
        pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo1", "other")
    with pytest.raises(KeyAgreementError, match="distinct"):
        pairwise_secret(a, _pub(b), RUN, 3, "silo0", "silo0", "mask")
    with pytest.raises(AdvertError):
        pairwise_secret(a, _pub(b)[:31], RUN, 3, "silo0", "silo1", "mask")
    with pytest.raises(AdvertError, match="low-order"):
        pairwise_secret(a, bytes(32), RUN, 3, "silo0", "silo1", "mask")


def test_seal_round_trip() -> None:
    key = secrets.token_bytes(32)
    for plaintext in (b"", b"x", secrets.token_bytes(1000)):
        blob = seal(key, plaintext, b"aad")
        assert len(blob) == 12 + len(plaintext) + 16
        assert open_sealed(key, blob, b"aad") == plaintext
    assert seal(key, b"same", b"") != seal(key, b"same", b"")  # random nonce


def test_seal_wrong_key_or_aad_fails() -> None:
    key = secrets.token_bytes(32)
    blob = seal(key, b"share bytes", b"silo0->silo1|round 3")
    with pytest.raises(ChannelError):
        open_sealed(secrets.token_bytes(32), blob, b"silo0->silo1|round 3")
    with pytest.raises(ChannelError):
        open_sealed(key, blob, b"silo0->silo2|round 3")
    with pytest.raises(ChannelError):
        open_sealed(key[:16], blob, b"silo0->silo1|round 3")


def test_seal_any_flipped_byte_fails() -> None:
    key = secrets.token_bytes(32)
    blob = seal(key, b"share bytes", b"aad")
    for i in range(len(blob)):
        with pytest.raises(ChannelError):
            open_sealed(key, _flip(blob, i, 0x01), b"aad")
    for truncated in (b"", blob[:27], blob[:-1]):
        with pytest.raises(ChannelError):
            open_sealed(key, truncated, b"aad")
