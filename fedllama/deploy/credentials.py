"""Credentials for a deployment: a CA, the SuperLink's TLS certificate, SuperNode key pairs.

Everything is generated with ``cryptography``; nothing here implements a primitive. Layout of a
credentials directory (``fedllama credentials create DIR ...``)::

    ca.crt               CA certificate: every institution gets a copy (--root-certificates)
    ca.key               CA private key (0600): stays with the coordinator, ideally offline
    superlink.crt        the SuperLink's certificate, signed by the CA; SANs = its addresses
    superlink.key        the SuperLink's private key (0600)
    nodes/NAME.key       institution NAME's SuperNode private key (0600, OpenSSH format):
                         goes to that institution only
    nodes/NAME.pub       its public key (OpenSSH), registered with the SuperLink

Private keys are created with mode 0600 (never chmod-ed after the fact) and directories 0700;
certificates and public keys are public (0644). An existing file is never overwritten unless
``force`` is set, and all targets are checked before anything is written.

Keys are ECDSA on NIST P-384: Flower's SuperNode authentication accepts only ECDSA keys on a
NIST curve (it rejects ed25519 and RSA), and using the same curve for TLS keeps one key type.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
HASH = hashes.SHA384()
LOOPBACK = "127.0.0.1"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
NODES_DIR = "nodes"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$")


class CredentialsError(ValueError):
    """A credentials request is invalid, or would overwrite existing files."""


@dataclass(frozen=True)
class NodeKeyPaths:
    """An institution's SuperNode key pair."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CredentialPaths:
    """Files written by :func:`create`."""

    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    nodes: dict[str, NodeKeyPaths]


def superlink_files(directory: Path) -> tuple[Path, Path, Path]:
    """``(ca.crt, superlink.crt, superlink.key)`` in a credentials directory."""
    return directory / CA_CERT, directory / SUPERLINK_CERT, directory / SUPERLINK_KEY


def node_key_files(directory: Path, name: str) -> NodeKeyPaths:
    """Where institution ``name``'s key pair lives in a credentials directory."""
    check_name(name)
    return NodeKeyPaths(
        directory / NODES_DIR / f"{name}.key", directory / NODES_DIR / f"{name}.pub"
    )


def check_name(name: str) -> None:
    """Institution names become file names: letters, digits, ``.``, ``_``, ``-`` only.

    Raises:
        CredentialsError: the name has other characters, or is empty or over 64 characters.
    """
    if not _NAME.match(name):
        raise CredentialsError(
            f"institution name {name!r}: expected 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )


def subject_alt_names(addresses: Sequence[str]) -> list[x509.GeneralName]:
    """SANs for the given host names and IP addresses, with 127.0.0.1 always included.

    An address may carry a port (``host:9092``, ``[::1]:9092``); the port is dropped.

    Raises:
        CredentialsError: an address is neither an IP address nor a valid DNS name.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in [*addresses, LOOPBACK]:
        host = _strip_port(raw.strip())
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _HOST.match(host):
            raise CredentialsError(
                f"address {raw!r}: expected a host name (superlink.example.org) or an IP "
                "address, optionally with :PORT"
            )
        names.append(x509.DNSName(host))
    return names


def _strip_port(address: str) -> str:
    if address.startswith("["):  # [IPv6]:port
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
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
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllama"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    # A little slack for clocks that are slightly behind the coordinator's.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE)
    name = _name(common_name)
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, HASH)
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    addresses: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for ``addresses`` and 127.0.0.1."""
    sans = subject_alt_names(addresses)
    key = ec.generate_private_key(CURVE)
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedllama SuperLink {first}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, HASH)
    )
    return key, cert


def make_node_key(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode key pair as Flower takes it: ``(OpenSSH private key, OpenSSH public key)``.

    The public key line ends with ``comment`` (the institution's name), as ``ssh-keygen -C``
    would write it.
    """
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def _check_free(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CredentialsError(
            f"{existing[0]} already exists ({len(existing)} existing file(s)); refusing to "
            "overwrite credentials (pass --force to replace them, which invalidates every "
            "copy already handed out)"
        )


def _mkdir_private(directory: Path) -> None:
    """Create ``directory`` and each missing parent with mode 0700 whatever the umask
    (``mkdir(parents=True)`` gives the parents the umask's mode, 0777 under umask 000);
    directories that already exist are left as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions)."""
    if path.exists() or path.is_symlink():
        path.unlink()  # only reached with force: _check_free ran first
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # a umask may have removed bits we meant to set (0644)


def write_node_key(directory: Path, name: str, force: bool = False) -> NodeKeyPaths:
    """Create institution ``name``'s key pair under ``directory/nodes/``.

    Raises:
        CredentialsError: a bad name, or the files exist and ``force`` is false.
    """
    paths = node_key_files(directory, name)
    _check_free([paths.private_key, paths.public_key], force)
    _mkdir_private(paths.private_key.parent)
    private, public = make_node_key(name)
    _write(paths.private_key, private, 0o600)
    _write(paths.public_key, public, 0o644)
    return paths


def create(
    directory: Path,
    addresses: Sequence[str],
    institutions: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> CredentialPaths:
    """Create a CA, the SuperLink's certificate and one SuperNode key pair per institution.

    Args:
        directory: where to write (created 0700 if missing).
        addresses: host names or IPs the institutions dial to reach the SuperLink (its Fleet
            API); 127.0.0.1 is always added (the Control API and the ServerApp use loopback).
        institutions: names of the institutions that get a key pair (may be empty: each
            institution can create its own with ``fedllama credentials node-key``).
        days: validity of the certificates.
        force: replace existing files.

    Raises:
        CredentialsError: a bad address, name or validity, or existing files without ``force``.
    """
    if days < 1:
        raise CredentialsError(f"days={days}: expected a validity of at least 1 day")
    if len(set(institutions)) != len(institutions):
        raise CredentialsError(f"institutions {list(institutions)}: names must be unique")
    subject_alt_names(addresses)  # validate before writing anything
    ca_cert_path, cert_path, key_path = superlink_files(directory)
    ca_key_path = directory / CA_KEY
    nodes = {name: node_key_files(directory, name) for name in institutions}
    targets = [ca_cert_path, ca_key_path, cert_path, key_path]
    for pair in nodes.values():
        targets += [pair.private_key, pair.public_key]
    _check_free(targets, force)

    _mkdir_private(directory)
    ca_key, ca_cert = make_ca("fedllama deployment CA", days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, addresses, days)
    _write(ca_key_path, _private_pem(ca_key), 0o600)
    _write(ca_cert_path, _cert_pem(ca_cert), 0o644)
    _write(key_path, _private_pem(server_key), 0o600)
    _write(cert_path, _cert_pem(server_cert), 0o644)
    written = {name: write_node_key(directory, name, force) for name in institutions}
    return CredentialPaths(ca_cert_path, ca_key_path, cert_path, key_path, written)
