"""gRPC mutual-TLS glue: credentials for the aggregator (server) and the silos (clients), the
client's identity as the server sees it, and one-line descriptions of failed connections.

What each side records when a silo is refused (measured with grpcio 1.85.1 and its bundled
BoringSSL, real server and client over 127.0.0.1):

* The handshake runs inside gRPC's C core; the Python server never sees the refused connection
  (no servicer call, no interceptor, no exception). The only server-side record is the line gRPC
  core prints on the aggregator's stderr, one per refused connection attempt, in absl format::

    I1124 06:53:29.566367    4084 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate

  (``<severity><MMDD> <HH:MM:SS.micros> <thread-id> <file>:<line>] Handshake failed with error
  <reason>``; :data:`HANDSHAKE_FAILURE_RE` parses it). The reason by case:

  - silo certificate from another CA: ``CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate``
  - expired silo certificate:         ``CERTIFICATE_VERIFY_FAILED: certificate has expired``
  - no client certificate at all:     ``PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context``
  - a server-only certificate used as client certificate:
                                      ``CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose``

  The line does not name the peer's address or certificate. It is logged at INFO severity, so it
  appears when ``GRPC_VERBOSITY`` is unset (absl's default sends everything to stderr), ``INFO`` or
  ``DEBUG`` (these two also print one "Log level ... is not suitable for production" warning at
  start), and is suppressed by ``GRPC_VERBOSITY=ERROR`` or ``NONE``. An unknown value (e.g.
  ``WARNING``) prints an "Unknown log verbosity" error line and behaves like unset. The variable is
  read when ``grpc`` is imported: setting it later in the process has no effect. No other line is
  printed for successful connections, so the log stays quiet in normal operation.
  ``GRPC_TRACE=handshaker`` adds the peer address, but as several long multi-line records per
  connection; it is not suitable for production logs. gRPC Python offers no hook to receive these
  messages in Python. :func:`handshake_failures_logged` tells the aggregator whether its environment
  lets the line through, so it can warn at start-up.

* The client whose certificate the server refused gets ``grpc.RpcError`` with code
  ``UNAVAILABLE`` and details ``failed to connect to all addresses; last error: UNAVAILABLE:
  ipv4:127.0.0.1:PORT: Socket closed``, identical for wrong CA, expired and missing certificate.
  As TLS 1.3 allows, the client completes its side of the handshake before the server has checked
  the client certificate, and the server's alert is not surfaced (not even with ``GRPC_TRACE=tsi,handshaker``).
  The client cannot tell *why* it was refused; :func:`describe_rpc_error` says so in one line.

* A client that refuses the *server's* certificate gets the reason in the error details
  (``... Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...CERTIFICATE_VERIFY_FAILED:
  unable to get local issuer certificate``; a server certificate without the dialled host in its
  SANs gives ``Hostname Verification Check failed``), and the client's own stderr gets the same
  ``Handshake failed with error ...`` line. The server then logs nothing.

Protocol versions (:data:`ACCEPTED_TLS`, measured the same way with a raw ``ssl`` client): the
aggregator negotiates TLS 1.3 with any client that offers it, and **also accepts TLS 1.2**. gRPC
Python cannot refuse 1.2: ``grpc.ssl_server_credentials`` has no version option (core's legacy SSL
server credentials fix the range at 1.2-1.3; the Python option is still an open pull request,
grpc/grpc#43074 and #43080), and ``GRPC_SSL_CIPHER_SUITES`` limited to TLS 1.3 suites makes the
server fail to bind. Under 1.2 the server's ECDSA certificate limits the suites to the two
ECDHE-ECDSA AES-GCM ones gRPC core offers: ephemeral keys (forward secrecy) and AEAD, no RSA key
exchange, no CBC; the client certificate is required either way. TLS 1.1 and older are refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import grpc

from crypto.pki import PkiPaths, check_key_pair, read_pem, verify_issued_by
from fcmoe.errors import PkiError

#: Parses gRPC core's server-side (or client-side) handshake failure line; group ``reason``.
HANDSHAKE_FAILURE_RE = re.compile(
    r"^(?P<severity>[DIWEF])(?P<date>\d{4}) (?P<time>\d\d:\d\d:\d\d\.\d+)\s+(?P<thread>\d+) "
    r"(?P<source>[\w./-]+:\d+)\] Handshake failed with error (?P<reason>.*)$"
)

_MAX_DESCRIPTION = 300

#: What the aggregator's TLS endpoint negotiates: protocol version -> cipher suites (OpenSSL names).
#: TLS 1.2 cannot be switched off from gRPC Python (see the module docstring); these are its only suites.
ACCEPTED_TLS: dict[str, frozenset[str]] = {
    "TLSv1.3": frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}),
    "TLSv1.2": frozenset({"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"}),
}


# --------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------


def server_credentials(paths: PkiPaths) -> grpc.ServerCredentials:
    """Aggregator credentials: present ``aggregator.pem``, require a client certificate issued by
    ``ca.pem``. Raises :class:`PkiError` if a file is missing, the key does not match, or the
    aggregator certificate is not currently valid under the CA."""
    ca = read_pem(paths.ca_cert)
    cert = read_pem(paths.aggregator_cert)
    key = read_pem(paths.aggregator_key)
    try:
        check_key_pair(cert, key)
        verify_issued_by(cert, ca)
    except PkiError as err:
        raise PkiError(f"{paths.aggregator_cert}: {err}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(ca_cert: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """Silo credentials: trust ``ca_cert`` for the server, present ``cert``/``key`` as client.
    Raises :class:`PkiError` naming the path if a file is missing or unreadable."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(Path(ca_cert)),
        private_key=read_pem(Path(key)),
        certificate_chain=read_pem(Path(cert)),
    )


# --------------------------------------------------------------------------------------------------
# Identity and diagnostics
# --------------------------------------------------------------------------------------------------


def _auth_value(context: grpc.ServicerContext, key: str) -> bytes | None:
    """The first value of ``key`` in the peer's verified TLS auth context, or None."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without transport security
        return None
    values = auth.get(key) or []
    if not values:
        return None
    return values[0] if isinstance(values[0], bytes) else str(values[0]).encode()


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client's certificate, or None if the peer presented none."""
    value = _auth_value(context, "x509_common_name")
    return value.decode("utf-8", "replace") if value is not None else None


def peer_certificate_pem(context: grpc.ServicerContext) -> bytes | None:
    """The client's verified certificate (PEM) as gRPC core's auth context holds it, or None: what
    the aggregator checks a silo's signed ledger receipts against, without a copy of silo certificates."""
    return _auth_value(context, "x509_pem_cert")


def handshake_failures_logged(environ: Mapping[str, str] | None = None) -> bool:
    """Whether gRPC core in a process started with ``environ`` prints its ``Handshake failed``
    line (INFO severity) to stderr. False for ``GRPC_VERBOSITY`` ``ERROR`` or ``NONE``."""
    env = os.environ if environ is None else environ
    return env.get("GRPC_VERBOSITY", "").strip().upper() not in {"ERROR", "NONE"}


def parse_handshake_failure(line: str) -> str | None:
    """The reason from a gRPC core ``Handshake failed with error ...`` log line, else None."""
    m = HANDSHAKE_FAILURE_RE.match(line.strip())
    return m.group("reason") if m else None


_LAST_ERROR_RE = re.compile(r"last error: (?:[A-Z_]+: )?(?P<addr>(?:ipv4|ipv6|unix|dns):\S+?): (?P<reason>.*)$")
_SSL_REASON_RE = re.compile(r"SSL routines:(?:OPENSSL_internal:)?(?P<reason>[A-Z0-9_]+(?:: [^:]+)?)")


UNTRUSTED_SERVER = "server certificate not trusted"  # how describe_rpc_error says it; a silo stops on it


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 3] + "..."


def _classify(details: str) -> str:
    m = _LAST_ERROR_RE.search(details)
    addr, reason = (m.group("addr"), m.group("reason")) if m else ("", details)
    where = f" ({addr})" if addr else ""
    low = reason.lower()
    if "socket closed" in low or "connection reset" in low or "broken pipe" in low:
        return (
            f"connection closed{where}: during TLS setup the server likely refused our client certificate "
            "(other CA, expired or missing; see the aggregator log), later a cut link or a restart"
        )
    ssl = _SSL_REASON_RE.search(reason)
    if "handshake failed" in low:
        detail = ssl.group("reason").strip() if ssl else reason.strip()
        return f"TLS handshake failed{where}: {UNTRUSTED_SERVER}: {detail}"
    if "hostname verification" in low:
        return f"server certificate does not cover the host dialled{where}: {reason.strip()}"
    if "connection refused" in low:
        return f"connection refused{where}: is the aggregator running and listening there?"
    return f"{reason.strip()}{where}" if reason.strip() else "no details"


def describe_rpc_error(err: grpc.RpcError) -> str:
    """One line (at most 300 characters) saying why an RPC failed: the status code name and a
    short reason, with known TLS and connection failures translated into plain words."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    try:
        code = code_fn() if callable(code_fn) else None
    except Exception:
        code = None
    try:
        details = details_fn() if callable(details_fn) else None
    except Exception:
        details = None
    name = code.name if isinstance(code, grpc.StatusCode) else type(err).__name__
    details = details or str(err) or ""
    if isinstance(code, grpc.StatusCode) and code is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = "deadline exceeded before the aggregator answered"
    else:
        reason = _classify(details)
    return _one_line(f"{name}: {reason}")
