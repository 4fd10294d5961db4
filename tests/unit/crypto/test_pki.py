"""PKI and mutual TLS: real certificates, a real gRPC server on loopback, real clients."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from crypto.pki import (
    PkiPaths,
    certificate_common_name,
    create_ca,
    ensure_pki,
    issue_certificate,
    verify_issued_by,
)
from crypto.tls import (
    HANDSHAKE_FAILURE_RE,
    channel_credentials,
    describe_rpc_error,
    handshake_failures_logged,
    parse_handshake_failure,
    peer_common_name,
    server_credentials,
)
from fcmoe.errors import PkiError

pytestmark = [pytest.mark.tls]

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVICE = "fcmoe.test.Echo"
PING = f"/{SERVICE}/Ping"


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def _ping(request: bytes, context: grpc.ServicerContext) -> bytes:
    cn = peer_common_name(context)
    return request + b"|" + (cn or "<none>").encode()


def _start_server(paths: PkiPaths) -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(_ping)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(paths))
    assert port > 0
    server.start()
    return server, port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return ensure_pki(tmp_path_factory.mktemp("pki"), ["alpha", "beta"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A second, unrelated CA with the same names: same subject DNs, different keys."""
    return ensure_pki(tmp_path_factory.mktemp("other-pki"), ["alpha"])


@pytest.fixture
def server(pki: PkiPaths):
    srv, port = _start_server(pki)
    try:
        yield port
    finally:
        srv.stop(0)


def _call(port: int, creds: grpc.ChannelCredentials, payload: bytes = b"ping") -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return channel.unary_unary(PING)(payload, timeout=5)


def _refused(port: int, creds: grpc.ChannelCredentials) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call(port, creds)
    return info.value


def _write_pair(directory: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return cert, key


def _assert_one_line(text: str) -> None:
    assert "\n" not in text and 0 < len(text) <= 300, text


# --------------------------------------------------------------------------------------------------
# PKI on disk
# --------------------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_ensure_pki_layout_modes_and_idempotency(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    paths = ensure_pki(d, ["alpha", "site-2.b_c"])
    names = {p.name for p in d.iterdir()}
    assert names == {
        "ca.pem", "ca.key", "aggregator.pem", "aggregator.key",
        "silo-alpha.pem", "silo-alpha.key", "silo-site-2.b_c.pem", "silo-site-2.b_c.key",
    }
    for key in (paths.ca_key, paths.aggregator_key, paths.silo_key("alpha"), paths.silo_key("site-2.b_c")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    before = _snapshot(d)
    again = ensure_pki(d, ["alpha", "site-2.b_c"])
    assert again == paths
    assert _snapshot(d) == before  # nothing re-issued or rewritten

    # A new silo is added without touching the existing files.
    ensure_pki(d, ["alpha", "site-2.b_c", "gamma"])
    after = _snapshot(d)
    assert {k: after[k] for k in before} == before
    assert "silo-gamma.pem" in after
    verify_issued_by(after["silo-gamma.pem"], after["ca.pem"])
    assert certificate_common_name(after["silo-gamma.pem"]) == "gamma"
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_new_ca_reissues_all_leaves(tmp_path: Path) -> None:
    paths = ensure_pki(tmp_path, ["alpha"])
    old_silo = paths.silo_cert("alpha").read_bytes()
    paths.ca_cert.unlink()
    paths.ca_key.unlink()
    ensure_pki(tmp_path, ["alpha"])
    new_ca = paths.ca_cert.read_bytes()
    assert paths.silo_cert("alpha").read_bytes() != old_silo
    verify_issued_by(paths.silo_cert("alpha").read_bytes(), new_ca)
    verify_issued_by(paths.aggregator_cert.read_bytes(), new_ca)


def test_incomplete_ca_is_not_replaced(tmp_path: Path) -> None:
    paths = ensure_pki(tmp_path, [])
    paths.ca_key.unlink()
    with pytest.raises(PkiError, match="ca.key"):
        ensure_pki(tmp_path, [])


@pytest.mark.parametrize("bad", ["", "-lead", "has space", "a/b", "x" * 64, "../up", "é"])
def test_bad_silo_names_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PkiError) as info:
        ensure_pki(tmp_path / "pki", ["ok", bad])
    assert repr(bad) in str(info.value)
    assert not (tmp_path / "pki").exists()


def test_certificate_contents() -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_pem, ca_key = create_ca("test-ca")
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    srv = x509.load_pem_x509_certificate(
        issue_certificate(ca_pem, ca_key, "aggregator", server=True, hosts=["agg.example", "10.0.0.7", "::1"])[0]
    )
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    assert list(srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    aki = srv.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    silo_pem = issue_certificate(ca_pem, ca_key, "alpha", server=False)[0]
    silo = x509.load_pem_x509_certificate(silo_pem)
    assert certificate_common_name(silo_pem) == "alpha"
    assert silo.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["alpha"]
    assert list(silo.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    verify_issued_by(silo_pem, ca_pem)


def test_verify_issued_by_reasons() -> None:
    ca_pem, ca_key = create_ca()
    other_pem, other_key = create_ca()  # same subject DN, different key
    foreign = issue_certificate(other_pem, other_key, "alpha", server=False)[0]
    with pytest.raises(PkiError) as info:
        verify_issued_by(foreign, ca_pem)
    _assert_one_line(str(info.value))
    assert "does not verify" in str(info.value)

    now = datetime.now(timezone.utc)
    expired = issue_certificate(
        ca_pem, ca_key, "alpha", server=False, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )[0]
    with pytest.raises(PkiError, match="expired") as info:
        verify_issued_by(expired, ca_pem)
    _assert_one_line(str(info.value))


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(PkiError, match=str(missing)):
        channel_credentials(missing, tmp_path / "c.pem", tmp_path / "c.key")
    with pytest.raises(PkiError, match="ca.pem"):
        server_credentials(PkiPaths(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------------
# Mutual TLS over loopback
# --------------------------------------------------------------------------------------------------


def test_valid_silo_connects_and_server_sees_its_cn(pki: PkiPaths, server: int) -> None:
    for name in ("alpha", "beta"):
        creds = channel_credentials(pki.ca_cert, pki.silo_cert(name), pki.silo_key(name))
        assert _call(server, creds, b"hi") == b"hi|" + name.encode()


def test_silo_from_other_ca_is_refused_and_server_keeps_serving(
    pki: PkiPaths, other_pki: PkiPaths, server: int
) -> None:
    bad = channel_credentials(pki.ca_cert, other_pki.silo_cert("alpha"), other_pki.silo_key("alpha"))
    err = _refused(server, bad)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    text = describe_rpc_error(err)
    _assert_one_line(text)
    assert text.startswith("UNAVAILABLE: ")
    assert "refused our client certificate" in text

    good = channel_credentials(pki.ca_cert, pki.silo_cert("alpha"), pki.silo_key("alpha"))
    assert _call(server, good) == b"ping|alpha"


def test_expired_silo_certificate_is_refused(pki: PkiPaths, server: int, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    pair = issue_certificate(
        pki.ca_cert.read_bytes(), pki.ca_key.read_bytes(), "alpha", server=False,
        not_before=now - timedelta(days=30), not_after=now - timedelta(days=1),
    )
    cert, key = _write_pair(tmp_path, "expired", pair)
    err = _refused(server, channel_credentials(pki.ca_cert, cert, key))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    text = describe_rpc_error(err)
    _assert_one_line(text)
    assert "refused our client certificate" in text


def test_client_without_certificate_is_refused(pki: PkiPaths, server: int) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    err = _refused(server, creds)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    text = describe_rpc_error(err)
    _assert_one_line(text)
    assert "refused our client certificate" in text


def test_server_certificate_from_other_ca_is_refused_by_client(pki: PkiPaths, other_pki: PkiPaths) -> None:
    # The silo dials an aggregator whose certificate comes from another CA.
    srv, port = _start_server(other_pki)
    try:
        creds = channel_credentials(pki.ca_cert, pki.silo_cert("alpha"), pki.silo_key("alpha"))
        err = _refused(port, creds)
    finally:
        srv.stop(0)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    text = describe_rpc_error(err)
    _assert_one_line(text)
    assert "server certificate not trusted" in text
    assert "CERTIFICATE_VERIFY_FAILED" in text


def test_server_certificate_without_dialled_host_is_refused(pki: PkiPaths, tmp_path: Path) -> None:
    paths = PkiPaths(tmp_path)
    for src, dst in ((pki.ca_cert, paths.ca_cert), (pki.ca_key, paths.ca_key)):
        dst.write_bytes(src.read_bytes())
    pair = issue_certificate(
        pki.ca_cert.read_bytes(), pki.ca_key.read_bytes(), "aggregator", server=True, hosts=["elsewhere.example"]
    )
    paths.aggregator_cert.write_bytes(pair[0])
    paths.aggregator_key.write_bytes(pair[1])
    srv, port = _start_server(paths)
    try:
        creds = channel_credentials(pki.ca_cert, pki.silo_cert("alpha"), pki.silo_key("alpha"))
        text = describe_rpc_error(_refused(port, creds))
    finally:
        srv.stop(0)
    _assert_one_line(text)
    assert text.startswith("UNAVAILABLE: server certificate does not cover the host dialled")


def test_connection_refused_is_described(pki: PkiPaths) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = channel_credentials(pki.ca_cert, pki.silo_cert("alpha"), pki.silo_key("alpha"))
    text = describe_rpc_error(_refused(port, creds))
    _assert_one_line(text)
    assert text.startswith("UNAVAILABLE: connection refused")


def test_server_refuses_to_start_with_foreign_aggregator_cert(tmp_path: Path, other_pki: PkiPaths) -> None:
    paths = ensure_pki(tmp_path, [])
    paths.aggregator_cert.write_bytes(other_pki.aggregator_cert.read_bytes())
    paths.aggregator_key.write_bytes(other_pki.aggregator_key.read_bytes())
    with pytest.raises(PkiError, match="aggregator.pem"):
        server_credentials(paths)


# --------------------------------------------------------------------------------------------------
# Server-side record of a refused handshake (gRPC core's stderr line)
# --------------------------------------------------------------------------------------------------

_SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from concurrent import futures
    from pathlib import Path
    import grpc
    from crypto.pki import PkiPaths
    from crypto.tls import server_credentials
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(PkiPaths(Path(sys.argv[1]))))
    server.start()
    print(port, flush=True)
    sys.stdin.readline()  # run until the test closes stdin
    server.stop(0)
    """
)


@pytest.mark.parametrize("verbosity", [None, "INFO"])
@pytest.mark.subprocess
def test_server_logs_one_line_per_refused_handshake(
    pki: PkiPaths, other_pki: PkiPaths, tmp_path: Path, verbosity: str | None
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    if verbosity:
        env["GRPC_VERBOSITY"] = verbosity
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    assert handshake_failures_logged(env)
    stderr_path = tmp_path / "aggregator.err"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT, str(pki.directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO_ROOT,
        )
        try:
            port = int(proc.stdout.readline())
            now = datetime.now(timezone.utc)
            expired = _write_pair(tmp_path, "expired", issue_certificate(
                pki.ca_cert.read_bytes(), pki.ca_key.read_bytes(), "alpha", server=False,
                not_before=now - timedelta(days=30), not_after=now - timedelta(days=1),
            ))
            cases = [
                channel_credentials(pki.ca_cert, other_pki.silo_cert("alpha"), other_pki.silo_key("alpha")),
                channel_credentials(pki.ca_cert, *expired),
                grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes()),
            ]
            for creds in cases:
                _refused(port, creds)
            # A good client produces no line (and the server is still up).
            good = channel_credentials(pki.ca_cert, pki.silo_cert("alpha"), pki.silo_key("alpha"))
            with grpc.secure_channel(f"127.0.0.1:{port}", good) as channel:
                grpc.channel_ready_future(channel).result(timeout=5)
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lines = stderr_path.read_text().splitlines()
    failures = [line for line in lines if "Handshake failed" in line]
    assert len(failures) == 3, lines
    assert all(HANDSHAKE_FAILURE_RE.match(line) for line in failures), failures
    reasons = [parse_handshake_failure(line) for line in failures]
    assert "unable to get local issuer certificate" in reasons[0]
    assert "certificate has expired" in reasons[1]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons[2]


def test_handshake_failures_logged_reads_grpc_verbosity() -> None:
    assert handshake_failures_logged({})
    assert handshake_failures_logged({"GRPC_VERBOSITY": "info"})
    assert handshake_failures_logged({"GRPC_VERBOSITY": "DEBUG"})
    assert not handshake_failures_logged({"GRPC_VERBOSITY": "ERROR"})
    assert not handshake_failures_logged({"GRPC_VERBOSITY": "none"})
    assert parse_handshake_failure("event=round_closed round=3") is None
