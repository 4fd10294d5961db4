"""A small private PKI for the federation: one CA, one aggregator (server) certificate, one client
certificate per silo.

All keys are ECDSA P-256. The CA signs every leaf; the aggregator requires a client certificate
signed by the same CA (mutual TLS, see :mod:`crypto.tls`), and each silo is identified by the common
name of its certificate. Everything is done with the ``cryptography`` library; nothing shells out.

Layout of a PKI directory (see :class:`PkiPaths`)::

    ca.pem  ca.key  aggregator.pem  aggregator.key  silo-<name>.pem  silo-<name>.key

Private keys are written with mode 0600, atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fcmoe.errors import PkiError
from fcmoe.fileio import write_atomic
from fcmoe.logs import log_event

logger = logging.getLogger("fcmoe.pki")

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
SILO_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

# Certificates are back-dated a little so that a peer whose clock is slightly behind accepts them.
_CLOCK_SKEW = timedelta(minutes=5)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_pem(path: Path) -> bytes:
    """The bytes of a PEM file; :class:`PkiError` names the path if it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PkiError(f"cannot read {path}: {reason}") from None


def _load_cert(pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise PkiError(f"{what} is not a valid PEM certificate: {err}") from None


def _load_key(pem: bytes, what: str = "private key") -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise PkiError(f"{what} is not a valid unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{what} is not an EC private key ({type(key).__name__})")
    return key


def check_key_pair(cert_pem: bytes, key_pem: bytes, what: str = "certificate") -> None:
    """Raise :class:`PkiError` unless ``key_pem`` is the private key of ``cert_pem``."""
    cert = _load_cert(cert_pem, what)
    key = _load_key(key_pem, f"private key of {what}")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError(f"private key does not match {what}")


# --------------------------------------------------------------------------------------------------
# Minting
# --------------------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fcmoe"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def create_ca(common_name: str = "fcmoe-ca", days: int = 3650) -> tuple[bytes, bytes]:
    """Create a self-signed CA. Returns ``(cert_pem, key_pem)``."""
    if days <= 0:
        raise PkiError(f"CA validity must be positive, got days={days}")
    key = _new_key()
    now = _now()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    server: bool,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    days: int = 825,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate signed by the CA. Returns ``(cert_pem, key_pem)``.

    ``server=True``: SANs for ``hosts`` (DNS names and IP addresses), ExtendedKeyUsage SERVER_AUTH.
    ``server=False`` (a silo): CN and a DNS SAN equal to ``common_name``, ExtendedKeyUsage CLIENT_AUTH.
    ``not_before``/``not_after`` override the validity window (default: now - 5 min .. now + days);
    tests use them to mint an expired certificate.
    """
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    ca_key = _load_key(ca_key_pem, "CA private key")
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise PkiError("CA private key does not match the CA certificate")
    if not common_name:
        raise PkiError("certificate common name must not be empty")

    now = _now()
    start = not_before if not_before is not None else now - _CLOCK_SKEW
    end = not_after if not_after is not None else now + timedelta(days=days)
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    if end <= start:
        raise PkiError(f"certificate validity ends ({end.isoformat()}) before it starts ({start.isoformat()})")

    if server:
        sans = _san_entries(hosts)
        if not sans:
            raise PkiError("a server certificate needs at least one host name or address")
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        sans = [x509.DNSName(common_name)]
        eku = ExtendedKeyUsageOID.CLIENT_AUTH

    key = _new_key()
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


# --------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------


def certificate_common_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate."""
    cert = _load_cert(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()!r} has no common name")
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else str(value)


def verify_issued_by(cert_pem: bytes, ca_cert_pem: bytes, at: datetime | None = None) -> None:
    """Raise :class:`PkiError` (one line) unless ``cert_pem`` is signed by ``ca_cert_pem`` and is
    within its validity period at ``at`` (default now; an auditor checks a past release at its time)."""
    cert = _load_cert(cert_pem)
    ca = _load_cert(ca_cert_pem, "CA certificate")
    subject = cert.subject.rfc4514_string()
    if cert.issuer != ca.subject:
        raise PkiError(
            f"certificate {subject!r} was issued by {cert.issuer.rfc4514_string()!r}, "
            f"not by CA {ca.subject.rfc4514_string()!r}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:
        detail = str(err) or type(err).__name__
        raise PkiError(
            f"certificate {subject!r} does not verify against CA {ca.subject.rfc4514_string()!r}: {detail}"
        ) from None
    now = at or _now()
    if now < cert.not_valid_before_utc:
        raise PkiError(f"certificate {subject!r} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate {subject!r} expired at {cert.not_valid_after_utc.isoformat()}")


# --------------------------------------------------------------------------------------------------
# On-disk layout
# --------------------------------------------------------------------------------------------------


def validate_silo_name(name: str) -> str:
    """Return ``name`` if it is a valid silo name, else raise :class:`PkiError` naming it."""
    if not isinstance(name, str) or not SILO_NAME_RE.fullmatch(name):
        raise PkiError(
            f"invalid silo name {name!r}: must match {SILO_NAME_RE.pattern} "
            "(letters, digits, '.', '_', '-'; at most 63 characters)"
        )
    return name


@dataclass(frozen=True)
class PkiPaths:
    """Where the files of one PKI directory live."""

    directory: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def aggregator_cert(self) -> Path:
        return self.directory / "aggregator.pem"

    @property
    def aggregator_key(self) -> Path:
        return self.directory / "aggregator.key"

    def silo_cert(self, name: str) -> Path:
        return self.directory / f"silo-{validate_silo_name(name)}.pem"

    def silo_key(self, name: str) -> Path:
        return self.directory / f"silo-{validate_silo_name(name)}.key"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode)


def _write_pair(cert_path: Path, key_path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    # Key first: a certificate on disk is taken as "this pair exists".
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert_pem, 0o644)


def ensure_pki(
    directory: Path,
    silo_names: Sequence[str],
    aggregator_hosts: Sequence[str] = DEFAULT_HOSTS,
) -> PkiPaths:
    """Create ``directory`` and whatever CA, aggregator and silo files are missing.

    Idempotent: an existing CA or certificate is never overwritten. If the CA has to be created,
    every leaf is (re-)issued, since leaves signed by a previous CA would no longer verify.
    """
    names = [validate_silo_name(n) for n in silo_names]
    paths = PkiPaths(Path(directory))
    try:
        paths.directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PkiError(f"cannot create PKI directory {paths.directory}: {err.strerror}") from None

    have_cert, have_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if have_cert != have_key:
        missing = paths.ca_key if have_cert else paths.ca_cert
        raise PkiError(f"incomplete CA in {paths.directory}: {missing} is missing; refusing to replace the CA")
    new_ca = not have_cert
    if new_ca:
        ca_cert_pem, ca_key_pem = create_ca()
        _write_pair(paths.ca_cert, paths.ca_key, ca_cert_pem, ca_key_pem)
        log_event(logger, "pki_ca_created", path=paths.ca_cert)
    else:
        ca_cert_pem, ca_key_pem = read_pem(paths.ca_cert), read_pem(paths.ca_key)
        _load_cert(ca_cert_pem, f"certificate {paths.ca_cert}")
        _load_key(ca_key_pem, f"private key {paths.ca_key}")

    leaves: list[tuple[str, Path, Path, bool, Sequence[str]]] = [
        ("aggregator", paths.aggregator_cert, paths.aggregator_key, True, tuple(aggregator_hosts))
    ]
    leaves += [(n, paths.silo_cert(n), paths.silo_key(n), False, ()) for n in names]
    for cn, cert_path, key_path, server, hosts in leaves:
        if not new_ca and cert_path.exists() and key_path.exists():
            continue
        kwargs = {"hosts": hosts} if server else {}
        cert_pem, key_pem = issue_certificate(ca_cert_pem, ca_key_pem, cn, server=server, **kwargs)
        _write_pair(cert_path, key_path, cert_pem, key_pem)
        log_event(logger, "pki_cert_issued", common_name=cn, role="server" if server else "silo", path=cert_path)
    return paths
