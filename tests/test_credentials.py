"""Credentials: CA, SuperLink certificate, SuperNode keys; file modes; no silent overwrite."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from fedllama.deploy import credentials
from fedllama.deploy.credentials import CredentialsError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def made(tmp_path: Path) -> credentials.CredentialPaths:
    return credentials.create(
        tmp_path / "creds", ["superlink.example.org", "10.0.0.5:9092"], ["hospital-a", "law-firm"]
    )


def test_private_keys_are_0600_and_public_files_0644(made: credentials.CredentialPaths) -> None:
    private = [made.ca_key, made.superlink_key, *(p.private_key for p in made.nodes.values())]
    public = [made.ca_cert, made.superlink_cert, *(p.public_key for p in made.nodes.values())]
    assert {_mode(p) for p in private} == {0o600}
    assert {_mode(p) for p in public} == {0o644}
    assert _mode(made.ca_cert.parent) == 0o700
    assert _mode(made.nodes["law-firm"].private_key.parent) == 0o700


def test_superlink_certificate_is_signed_by_the_ca_for_the_given_addresses(
    made: credentials.CredentialPaths,
) -> None:
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(made.superlink_cert.read_bytes())

    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(made.superlink_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()


def test_node_keys_are_openssh_ecdsa_that_flower_accepts(
    made: credentials.CredentialPaths,
) -> None:
    pair = made.nodes["hospital-a"]
    private = load_ssh_private_key(pair.private_key.read_bytes(), None)  # as flower-supernode
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert pair.public_key.read_text().rstrip().endswith(" hospital-a")
    # `flwr supernode register` loads the .pub with this and rejects non-NIST-EC keys.
    assert try_load_public_key(pair.public_key)  # exits the process if Flower rejects it
    other = load_ssh_private_key(made.nodes["law-firm"].private_key.read_bytes(), None)
    assert isinstance(other, ec.EllipticCurvePrivateKey)
    assert other.private_numbers() != private.private_numbers()


def test_existing_credentials_are_not_overwritten_without_force(
    made: credentials.CredentialPaths,
) -> None:
    directory = made.ca_cert.parent
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}

    with pytest.raises(CredentialsError, match=r"ca\.crt already exists.*--force"):
        credentials.create(directory, ["superlink.example.org"], ["hospital-a"])

    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before


def test_force_replaces_credentials(made: credentials.CredentialPaths) -> None:
    old_ca = made.ca_cert.read_bytes()
    old_key = made.nodes["hospital-a"].private_key.read_bytes()

    again = credentials.create(
        made.ca_cert.parent, ["superlink.example.org"], ["hospital-a"], force=True
    )

    assert again.ca_cert.read_bytes() != old_ca
    assert again.nodes["hospital-a"].private_key.read_bytes() != old_key
    assert _mode(again.ca_key) == 0o600


def test_one_existing_node_key_stops_create_before_anything_is_written(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    credentials.write_node_key(directory, "law-firm")

    with pytest.raises(CredentialsError, match=r"law-firm\.key already exists"):
        credentials.create(directory, ["superlink.example.org"], ["hospital-a", "law-firm"])

    assert not (directory / "ca.crt").exists()
    assert not (directory / "nodes" / "hospital-a.key").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addresses": ["bad host!"]}, r"address 'bad host!': expected a host name"),
        ({"institutions": ["../etc"]}, r"institution name '\.\./etc'"),
        ({"institutions": ["a", "a"]}, r"names must be unique"),
        ({"days": 0}, r"days=0: expected a validity of at least 1 day"),
    ],
)
def test_bad_requests_are_refused_naming_the_value(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"addresses": ["localhost"], **kwargs}
    with pytest.raises(CredentialsError, match=message):
        credentials.create(tmp_path / "creds", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "creds").exists()


def _serve_tls_once(made: credentials.CredentialPaths) -> tuple[int, threading.Thread]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(made.superlink_cert, made.superlink_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused us: the test looks at the client side

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return int(listener.getsockname()[1]), thread


@pytest.mark.parametrize("server_name", ["127.0.0.1", "superlink.example.org"])
def test_a_client_trusting_the_ca_completes_a_tls_handshake(
    made: credentials.CredentialPaths, server_name: str
) -> None:
    port, thread = _serve_tls_once(made)
    ctx = ssl.create_default_context(cafile=str(made.ca_cert))  # hostname check on

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)


def test_a_client_trusting_another_ca_rejects_the_superlink(
    made: credentials.CredentialPaths, tmp_path: Path
) -> None:
    foreign = credentials.create(tmp_path / "foreign", ["127.0.0.1"])
    port, thread = _serve_tls_once(made)
    ctx = ssl.create_default_context(cafile=str(foreign.ca_cert))

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(10)


def test_cli_creates_credentials_and_refuses_to_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    fedllama = [str(Path(sys.executable).parent / "fedllama"), "credentials"]
    create = [*fedllama, "create", str(directory), "--address", "localhost"]

    first = subprocess.run([*create, "--institution", "hospital-a"], capture_output=True, text=True)
    again = subprocess.run(create, capture_output=True, text=True)
    node = subprocess.run([*fedllama, "node-key", str(directory), "law-firm"], capture_output=True)

    assert first.returncode == 0, first.stderr
    assert (directory / "nodes" / "hospital-a.pub").is_file()
    assert again.returncode == 2
    assert "ca.crt already exists" in again.stderr
    assert node.returncode == 0
    assert _mode(directory / "nodes" / "law-firm.key") == 0o600


def test_credential_folders_are_0700_whatever_the_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0)
    try:
        made = credentials.create(tmp_path / "a" / "b" / "creds", ["localhost"], ["clinic"])
    finally:
        os.umask(previous)

    for folder in (tmp_path / "a", tmp_path / "a" / "b", made.ca_cert.parent):
        assert _mode(folder) == 0o700, folder
    assert _mode(made.nodes["clinic"].private_key.parent) == 0o700
    assert _mode(made.nodes["clinic"].private_key) == 0o600
