"""NATS over TLS: with CAKE_NATS_TLS_CA the services speak TLS and check the server's
certificate; a client without it, or trusting another CA, gets nowhere."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.launcher.nats_server import NatsServer
from shared.core.errors import ConfigError, ConnectionLost
from shared.runtime.config import Settings
from shared.wire.bus import Bus
from shared.wire.messages import Accepted


def write_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA; its certificate in directory/<name>.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def write_server_cert(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
                      ) -> tuple[str, str]:  # fmt: skip
    """A certificate for 127.0.0.1 signed by the CA: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[NatsServer, Path]]:
    ca, ca_key = write_ca(tmp_path, "ca")
    write_ca(tmp_path, "other-ca")
    server = NatsServer.start(tls=write_server_cert(tmp_path, ca, ca_key))
    try:
        yield server, tmp_path
    finally:
        server.stop()


async def test_services_speak_tls_to_a_server_their_ca_vouches_for(
    tls_server: tuple[NatsServer, Path],
) -> None:
    server, certs = tls_server
    url = f"nats://127.0.0.1:{server.port}"
    settings = Settings(nats_url=url, nats_tls_ca=str(certs / "ca.pem"))
    responder = await Bus.connect(url, "tls-responder", tls=settings.nats_tls())
    asker = await Bus.connect(url, "tls-asker", tls=settings.nats_tls())
    try:

        async def answer(_: object, __: str) -> Accepted:
            return Accepted(node="over-tls")

        await responder.handle("cake.tls.test", answer)
        await responder.flush()
        reply = await asker.request("cake.tls.test", Accepted(), Accepted, 5.0)
        assert reply.node == "over-tls"
    finally:
        await asker.close()
        await responder.close()
    with pytest.raises(ConnectionLost):  # plain TCP to a TLS server
        await Bus.connect(url, "plain", timeout_s=1.0)
    stranger = Settings(nats_url=url, nats_tls_ca=str(certs / "other-ca.pem")).nats_tls()
    with pytest.raises(ConnectionLost):  # a server this CA does not vouch for
        await Bus.connect(url, "stranger", timeout_s=1.0, tls=stranger)


def test_tls_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        Settings(nats_tls_ca=str(tmp_path / "missing.pem")).nats_tls()
    with pytest.raises(ConfigError, match="without CAKE_NATS_TLS_CERT"):
        Settings(nats_tls_ca=None, nats_tls_cert=None, nats_tls_key="k.pem").nats_tls()
    assert Settings().nats_tls() is None
