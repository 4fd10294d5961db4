"""Per-round X25519 keys, adverts signed with the silo's certificate key, pairwise keys, AES-GCM.

Silos never talk to each other directly: every public key and every encrypted share goes through
the aggregator, which secure aggregation must treat as an adversary. So:

* Each round a silo draws two fresh X25519 key pairs: one for pairwise mask seeds, one for the
  channel that carries its Shamir shares to peers. Fresh per round, so a key recovered to unmask a
  dropped silo in round r says nothing about round r + 1.
* It publishes them in a :class:`KeyAdvert` signed with its ECDSA P-256 identity key, the same key
  its mutual-TLS client certificate certifies. A peer checks the certificate against the CA it
  trusts itself, so the relaying aggregator can neither read anything useful (these are public
  keys) nor substitute its own keys (it holds no silo certificate key and its own certificate is
  a server certificate, which :func:`verify_advert` refuses).
* Run id and round are inside the signature, so an advert cannot be replayed into another round or
  run; the encoding is length-prefixed and domain-separated, so no two field tuples sign the same.
* :func:`pairwise_secret` binds purpose, run, round, both silo ids and both public keys into the
  HKDF info, so the mask and channel keys of a pair are independent and both sides agree.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID

from crypto.pki import certificate_common_name, verify_issued_by
from fcmoe.errors import FcMoeError, PkiError

ADVERT_TAG = "fcmoe/advert/v1"
PAIRWISE_TAG = "fcmoe/pairwise/v1"
PURPOSES = ("mask", "channel")
PUBLIC_KEY_BYTES = 32
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_MAX_ROUND = 2**64 - 1


class KeyAgreementError(FcMoeError):
    """Invalid parameters for key agreement or sealing (a caller bug, not an attack)."""


class SignatureError(KeyAgreementError):
    """A signed message is not by the silo it names: certificate not from the verifier's CA, not a
    silo certificate of that name, or a signature that does not verify."""


class AdvertError(SignatureError):
    """A peer's key advert is not authentic, not for this run/round, or unusable."""


class ChannelError(KeyAgreementError):
    """A sealed message failed to open: wrong key, wrong associated data, or tampered bytes."""


# --------------------------------------------------------------------------------------------------
# Canonical encoding
# --------------------------------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    """4-byte big-endian length, then the bytes: no concatenation of fields is ambiguous."""
    return struct.pack(">I", len(data)) + data


def _round_bytes(round_: int) -> bytes:
    if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ <= _MAX_ROUND:
        raise KeyAgreementError(f"round must be an integer in 0..2**64-1, got {round_!r}")
    return round_.to_bytes(8, "big")


def _text(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise KeyAgreementError(f"{what} must be a non-empty string, got {value!r}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyAgreementError(f"{what} is not encodable as UTF-8: {value!r}") from None


def encode_fields(tag: str, parts: Sequence[bytes]) -> bytes:
    """Domain tag and every part, each length-prefixed."""
    return _field(tag.encode()) + b"".join(_field(p) for p in parts)


# --------------------------------------------------------------------------------------------------
# Adverts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvert:
    """A silo's two public keys for one round of one run, signed with its identity key."""

    run_id: str
    round: int
    silo: str
    mask_public: bytes
    channel_public: bytes
    signature: bytes
    secret_digest: bytes = b""  # digest of the run secret this silo holds (empty: none yet)
    sketch_mask_public: bytes = b""  # X25519 of the sketch stage's pairwise masks (crypto/secagg.py STAGES)

    def signed_bytes(self) -> bytes:
        """Every field but the signature, canonically encoded under ``fcmoe/advert/v1``."""
        return encode_fields(
            ADVERT_TAG,
            [
                _text(self.run_id, "run_id"),
                _round_bytes(self.round),
                _text(self.silo, "silo"),
                bytes(self.mask_public),
                bytes(self.channel_public),
                bytes(self.secret_digest),
                bytes(self.sketch_mask_public),
            ],
        )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_identity_key(identity_key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The silo's P-256 certificate key; anything else could not be checked by peers."""
    try:
        key = serialization.load_pem_private_key(identity_key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise KeyAgreementError(f"identity key is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyAgreementError(f"identity key must be ECDSA P-256, got {type(key).__name__}")
    return key


class RoundKeys:
    """Fresh X25519 key pairs (mask, channel) of one silo for one round of one run."""

    def __init__(self, run_id: str, round: int, silo: str) -> None:
        _text(run_id, "run_id")
        _round_bytes(round)
        _text(silo, "silo")
        self.run_id = run_id
        self.round = round
        self.silo = silo
        self._mask = X25519PrivateKey.generate()
        self._sketch_mask = X25519PrivateKey.generate()  # the sketch stage masks under its own key pair
        self._channel = X25519PrivateKey.generate()

    def __repr__(self) -> str:  # never print private keys
        return f"RoundKeys(run_id={self.run_id!r}, round={self.round}, silo={self.silo!r})"

    @property
    def mask_private(self) -> X25519PrivateKey:
        """For pairwise mask seeds; Shamir-shared so peers can unmask if this silo drops out."""
        return self._mask

    @property
    def channel_private(self) -> X25519PrivateKey:
        """For the encrypted channel that carries this silo's shares to each peer."""
        return self._channel

    def mask_private_bytes(self, stage: str = "update") -> bytes:
        """Raw 32-byte mask key of a stage, for Shamir sharing only: peers rebuild it if this silo drops
        out of that stage."""
        key = self._sketch_mask if stage == "sketch" else self._mask
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())

    @property
    def mask_public(self) -> bytes:
        return _raw_public(self._mask)

    @property
    def sketch_mask_public(self) -> bytes:
        return _raw_public(self._sketch_mask)

    @property
    def channel_public(self) -> bytes:
        return _raw_public(self._channel)

    def advert(self, identity_key_pem: bytes, secret_digest: bytes = b"") -> KeyAdvert:
        """The signed advert (ECDSA P-256, SHA-256) carrying both public keys."""
        unsigned = KeyAdvert(self.run_id, self.round, self.silo, self.mask_public, self.channel_public, b"",
                             secret_digest, self.sketch_mask_public)
        key = _load_identity_key(identity_key_pem)
        signature = key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        return KeyAdvert(self.run_id, self.round, self.silo, self.mask_public, self.channel_public, signature,
                         secret_digest, self.sketch_mask_public)


def _is_client_leaf(cert: x509.Certificate) -> bool:
    """A silo certificate: not a CA, and good for client auth (the aggregator's is server-only)."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return not basic.ca and ExtendedKeyUsageOID.CLIENT_AUTH in usage


def _advert_shape_error(advert: KeyAdvert) -> str | None:
    """What is structurally wrong with ``advert`` (field types and key lengths), if anything."""
    if not isinstance(advert.silo, str) or not isinstance(advert.run_id, str):
        return "silo and run_id must be strings"
    if not isinstance(advert.round, int) or isinstance(advert.round, bool):
        return "round must be an integer"
    for name in ("mask_public", "channel_public", "signature", "secret_digest", "sketch_mask_public"):
        if not isinstance(getattr(advert, name), bytes):
            return f"{name} must be bytes"
    if len(advert.secret_digest) not in (0, KEY_BYTES):
        return f"secret_digest is {len(advert.secret_digest)} bytes, expected 0 or {KEY_BYTES}"
    for name in ("mask_public", "channel_public", "sketch_mask_public"):
        if len(getattr(advert, name)) != PUBLIC_KEY_BYTES:
            return f"{name} is {len(getattr(advert, name))} bytes, expected {PUBLIC_KEY_BYTES}"
    return None


def verify_advert(advert: KeyAdvert, cert_pem: bytes, ca_pem: bytes, run_id: str, round: int) -> None:
    """Raise :class:`AdvertError` unless ``advert`` is ``advert.silo``'s, for this run and round.

    ``ca_pem`` must be the verifier's own trust anchor, never one relayed by the aggregator;
    ``cert_pem`` may be relayed, since it is checked against ``ca_pem``.
    """
    if not isinstance(advert, KeyAdvert):
        raise AdvertError(f"expected KeyAdvert, got {type(advert).__name__}")
    silo = advert.silo
    shape = _advert_shape_error(advert)
    if shape:
        raise AdvertError(f"advert of silo {silo!r}: {shape}")
    if advert.run_id != run_id:
        raise AdvertError(f"advert of silo {silo!r} is for run {advert.run_id!r}, expected {run_id!r}")
    if advert.round != round:
        raise AdvertError(f"advert of silo {silo!r} is for round {advert.round}, expected {round}")
    try:
        message = advert.signed_bytes()
    except KeyAgreementError:
        raise AdvertError(f"advert of silo {silo!r}: signature does not verify") from None
    verify_silo_signature(silo, message, advert.signature, cert_pem, ca_pem, f"advert of silo {silo!r}", AdvertError)


def sign_as_silo(identity_key_pem: bytes, message: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 over ``message`` with the silo's certificate key, which peers check
    with :func:`verify_silo_signature`."""
    return _load_identity_key(identity_key_pem).sign(message, ec.ECDSA(hashes.SHA256()))


def verify_silo_signature(silo: str, message: bytes, signature: bytes, cert_pem: bytes, ca_pem: bytes,
                          what: str, error: type[SignatureError] = SignatureError) -> None:
    """Raise ``error`` unless ``signature`` over ``message`` is by silo ``silo``.

    The certificate may be relayed by the aggregator: it must chain to ``ca_pem`` (the verifier's
    own trust anchor, never one the aggregator sent), be a silo (client-auth, non-CA) certificate
    whose common name is ``silo``, and hold a P-256 key; the aggregator's server certificate is
    refused, so it cannot sign in a silo's name. ``what`` names the message in the one-line error.
    """
    try:
        verify_issued_by(cert_pem, ca_pem)
        common_name = certificate_common_name(cert_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (PkiError, ValueError, TypeError) as err:
        raise error(f"{what}: certificate rejected: {err}") from None
    if common_name != silo:
        raise error(f"{what} comes with the certificate of {common_name!r}")
    if not _is_client_leaf(cert):
        raise error(f"{what}: certificate is not a silo (client) certificate")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise error(f"{what}: certificate key is not ECDSA P-256")
    try:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise error(f"{what}: signature does not verify") from None


# --------------------------------------------------------------------------------------------------
# Pairwise keys
# --------------------------------------------------------------------------------------------------


def pairwise_secret(
    my_private: X25519PrivateKey,
    peer_public: bytes,
    run_id: str,
    round: int,
    silo_a: str,
    silo_b: str,
    purpose: str,
) -> bytes:
    """32-byte key shared by two silos: X25519, then HKDF-SHA256.

    The info binds purpose, run, round, both silo ids (sorted) and both public keys (sorted), so
    both ends derive the same value, and a key for one purpose, round or pair says nothing about
    another. An all-zero exchange (a low-order peer key) raises :class:`AdvertError`.
    """
    if purpose not in PURPOSES:
        raise KeyAgreementError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    first, second = sorted((_text(silo_a, "silo_a"), _text(silo_b, "silo_b")))
    if first == second:
        raise KeyAgreementError(f"pairwise secret needs two distinct silos, got {silo_a!r} twice")
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise AdvertError(f"peer public key must be {PUBLIC_KEY_BYTES} bytes")
    try:
        shared = my_private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise AdvertError("peer public key is a low-order point (all-zero shared secret)") from None
    keys = sorted((_raw_public(my_private), peer_public))
    info = encode_fields(
        PAIRWISE_TAG,
        [purpose.encode(), _text(run_id, "run_id"), _round_bytes(round), first, second, *keys],
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


# --------------------------------------------------------------------------------------------------
# Authenticated encryption
# --------------------------------------------------------------------------------------------------


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ChannelError(f"AES-256-GCM key must be {KEY_BYTES} bytes")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; returns ``nonce (12 bytes) || ciphertext || tag``.

    A random nonce is safe here: a pairwise key encrypts a handful of messages per round, far from
    the 2**32 messages at which random 96-bit nonces start to risk a collision.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; :class:`ChannelError` on a wrong key or aad, or any altered byte."""
    aead = _aead(key)
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ChannelError(f"sealed message too short ({len(blob) if isinstance(blob, bytes) else '?'} bytes)")
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ChannelError("sealed message failed authentication (wrong key, wrong aad, or tampered)") from None
