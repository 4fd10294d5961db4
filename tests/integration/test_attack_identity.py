"""Identity attacks against the real silo agent and aggregator over gRPC + mutual TLS: a silo whose
configured name is not its certificate's, a second live process under a joined name, a TLS 1.2 client.

Each must fail safely with one clear line (or, for TLS 1.2, get exactly what docs/threat-model.md says).
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ROOT, silo_config, smoke_config

from crypto.pki import PkiPaths, ensure_pki, read_pem
from crypto.tls import ACCEPTED_TLS, channel_credentials
from fcmoe.config import Config, dump_config, parse_config
from fcmoe.errors import PkiError
from protos import fcmoe_pb2 as pb
from protos import fcmoe_pb2_grpc as pb_grpc
from silo_agent.agent import SiloAgent
from silo_agent.client import RpcFailure

pytestmark = [pytest.mark.subprocess, pytest.mark.tls]

SILOS = ["silo0", "silo1", "silo2"]


def _events(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={name} ")]


def _with_silo(config: Config, **silo) -> Config:
    data = config.model_dump(mode="json")
    data["silo"].update(silo)
    return parse_config(data)


def test_attack_silo_named_unlike_its_certificate_stops_with_one_line(tmp_path):
    """The operator of silo0 installed silo1's certificate and key under silo0's file names."""
    config = smoke_config(tmp_path)
    real = ensure_pki(config.aggregator.pki_dir, SILOS)
    mixed = PkiPaths(tmp_path / "silo0-certs")
    mixed.directory.mkdir()
    shutil.copy(real.ca_cert, mixed.ca_cert)
    shutil.copy(real.silo_cert("silo1"), mixed.silo_cert("silo0"))
    shutil.copy(real.silo_key("silo1"), mixed.silo_key("silo0"))
    silo = _with_silo(silo_config(config, "silo0", 1), pki_dir=str(mixed.directory))
    with pytest.raises(PkiError, match="silo.name 'silo0' differs from the common name 'silo1'"):
        SiloAgent(silo)
    path = tmp_path / "silo0.yaml"
    dump_config(silo, path)
    done = subprocess.run([sys.executable, "-m", "fcmoe", "silo", str(path), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fcmoe: error:")]
    assert errors == [f"fcmoe: error: silo.name 'silo0' differs from the common name 'silo1' of its certificate "
                      f"{mixed.silo_cert('silo0')}: the aggregator would know this silo as 'silo1'"]


def test_attack_join_claiming_another_name_is_refused(tmp_path, aggregator_factory, caplog):
    """A hand-written client with silo0's certificate joins claiming to be silo1."""
    config = smoke_config(tmp_path)
    pki = ensure_pki(config.aggregator.pki_dir, SILOS)
    agg = aggregator_factory(config)
    caplog.set_level(logging.INFO)
    coordinator = agg.coordinator
    creds = channel_credentials(pki.ca_cert, pki.silo_cert("silo0"), pki.silo_key("silo0"))
    with grpc.secure_channel(f"127.0.0.1:{agg.port}", creds) as channel:
        stub = pb_grpc.FederationStub(channel)
        request = pb.JoinRequest(layout_hash=coordinator.layout_hash, base_fingerprint=coordinator.base_fingerprint,
                                 num_train_examples=1, silo_name="silo1", instance="a1")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details() == "configured silo name 'silo1' differs from the certificate's common name 'silo0'"
    assert _events(caplog, "silo_name_mismatch_refused") == ["event=silo_name_mismatch_refused silo=silo0 configured=silo1"]
    assert "silo0" not in coordinator.machine.joined and "silo1" not in coordinator.machine.joined


def test_attack_second_live_process_under_a_joined_name_is_refused(tmp_path, aggregator_factory, caplog):
    config = smoke_config(tmp_path, silo_lease_s=4)  # the duplicate window is min(15 s, lease)
    ensure_pki(config.aggregator.pki_dir, SILOS)
    agg = aggregator_factory(config)
    caplog.set_level(logging.INFO)
    silo = silo_config(config, "silo0", agg.port)
    silo = _with_silo(silo, connect_timeout_s=1)  # a short retry budget for a refused Join
    first = SiloAgent(silo)
    second = SiloAgent(silo)  # the same config, started twice by mistake
    try:
        first.join()
        assert first.client.get_task(first.run_id, wait_s=0.1).kind == pb.Task.WAIT
        with pytest.raises(RpcFailure, match="ALREADY_EXISTS: silo 'silo0' is already joined from another live "
                                             "process") as refused:
            second.join()
        assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert len(_events(caplog, "duplicate_silo_refused")) >= 1
        # the first keeps its place
        assert agg.coordinator.machine.instances["silo0"] == first.instance
        assert first.client.get_task(first.run_id, wait_s=0.1).kind == pb.Task.WAIT

        # the first falls silent (crashed): after the window a restarted process is let in ...
        time.sleep(4.5)
        second.join()
        assert agg.coordinator.machine.instances["silo0"] == second.instance
        assert len(_events(caplog, "silo_process_replaced")) == 1
        # ... and the old one, if it was only stuck, is told to stop
        with pytest.raises(RpcFailure, match="FAILED_PRECONDITION: another process joined as 'silo0'"):
            first.client.get_task(first.run_id, wait_s=0.1)
        assert len(_events(caplog, "stale_silo_process_refused")) == 1
        assert first.run() == 2  # the agent's loop: rejoining is refused, it stops with one line
        assert second.client.get_task(second.run_id, wait_s=0.1).kind == pb.Task.WAIT
    finally:
        first.client.close()
        second.client.close()


def _client_context(pki: PkiPaths, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki.ca_cert))
    context.load_cert_chain(str(pki.silo_cert("silo0")), str(pki.silo_key("silo0")))
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version() or "", tls.cipher()[0]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_attack_tls12_client_gets_only_the_documented_suites(tmp_path, aggregator_factory):
    """A raw TLS client with a valid silo certificate that offers at most TLS 1.2, against the real server."""
    config = smoke_config(tmp_path)
    pki = ensure_pki(config.aggregator.pki_dir, SILOS)
    agg = aggregator_factory(config)

    version, cipher = _handshake(agg.port, _client_context(pki, ssl.TLSVersion.TLSv1_3))
    assert version == "TLSv1.3" and cipher in ACCEPTED_TLS["TLSv1.3"]
    version, cipher = _handshake(agg.port, _client_context(pki, ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2" and cipher in ACCEPTED_TLS["TLSv1.2"]
    offered = {c["name"] for c in _client_context(pki, ssl.TLSVersion.TLSv1_2, "ALL:@SECLEVEL=0").get_ciphers()
               if c["protocol"] == "TLSv1.2"}
    accepted = set()
    for name in sorted(offered):
        try:
            accepted.add(_handshake(agg.port, _client_context(pki, ssl.TLSVersion.TLSv1_2, name + ":@SECLEVEL=0"))[1])
        except (ssl.SSLError, ConnectionError):
            pass
    assert accepted == ACCEPTED_TLS["TLSv1.2"]  # forward-secret ECDHE with AES-GCM, nothing else
    with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.1 and older: refused
        _handshake(agg.port, _client_context(pki, ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0"))

    # docs/threat-model.md says exactly this
    channel = (ROOT / "docs" / "threat-model.md").read_text().split("## Channel", 1)[1].split("\n## ", 1)[0]
    for names in ACCEPTED_TLS.values():
        for name in names:
            assert name in channel, name
    assert "TLS 1.2" in channel and "TLS 1.1" in channel
    assert read_pem(pki.aggregator_cert)  # the server's certificate is ECDSA: no RSA suites can be chosen
