"""Deployment over gRPC: the SuperLink and SuperNode command lines, and key registration.

The one place that knows how fedllama starts Flower's processes. ``scripts/start-superlink.sh``
and ``scripts/start-supernode.sh`` call ``fedllama deploy superlink|supernode``, which build the
command here and ``exec`` it; the deployment tests run those scripts; the guides
(``docs/deploy-coordinator.md``, ``docs/deploy-institution.md``) document them.

Secure by default:

* the SuperLink serves TLS with the deployment's own CA (``fedllama credentials create``) and
  requires SuperNode authentication (``--enable-supernode-auth``): only registered public keys
  may connect;
* its Control API (what ``flwr run`` and ``flwr supernode register`` talk to, HTTPS, **no
  authentication**) listens on 127.0.0.1 only; operators reach it on the SuperLink's host or
  through an SSH tunnel. Only the Fleet API (gRPC) is meant to be reachable by institutions;
* starting without TLS needs ``--insecure-local-test``, which logs a warning on every start and
  is meant for loopback tests only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllama.deploy import credentials

log = logging.getLogger("fedllama.deploy")


LOOPBACK = "127.0.0.1"


DEFAULT_FLEET_ADDRESS = "0.0.0.0:9092"
"""Where the SuperLink's Fleet API (gRPC) listens: the one port institutions reach."""


DEFAULT_CONTROL_PORT = 8000
"""Flower 1.39's default port of the SuperLink's HTTP API (Control + ServerApp runtime)."""


DEFAULT_SUPERNODE_PORT = 9094
"""Flower 1.39's default port of a SuperNode's local runtime API (one per SuperNode on a host)."""


DEFAULT_CONNECTION = "fedllama"
"""Name of the ``flwr`` CLI connection ``fedllama deploy superlink`` writes."""


DEVICES = ("auto", "cpu", "cuda")


INSECURE_WARNING = (
    "INSECURE: TLS and SuperNode authentication are OFF (--insecure-local-test). Traffic is "
    "unencrypted and any process that reaches the Fleet API can join and receive the global "
    "adapter. Use this only for tests on loopback, never across institutions."
)


class DeployError(ValueError):
    """A deployment setting is invalid (the message names it and what was expected)."""


def _check_address(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"{what}={address!r}: expected HOST:PORT, e.g. 0.0.0.0:9092")
    return host, int(port)


def _check_port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise DeployError(f"{what}={port}: expected a TCP port in 1..65535")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class SuperLinkSettings:
    """How to start the coordinator's SuperLink.

    Attributes:
        credentials: directory from ``fedllama credentials create`` (``ca.crt``,
            ``superlink.crt``, ``superlink.key``); required unless ``insecure``.
        fleet_address: Fleet API bind address (gRPC, what institutions dial).
        control_port: port of the HTTP API (Control + ServerApp runtime) on 127.0.0.1.
        database: SQLite file for the SuperLink's state (registered keys, runs); ``None`` (the
            default, as Flower's) keeps it in memory, so keys must be registered again after a
            restart. Flower 1.39's SQLite state failed a run here with ``database is locked``
            under heavy load (2 CPU cores, NF4 clients on the same machine).
        insecure: no TLS, no SuperNode authentication (loopback tests only).
    """

    credentials: Path | None = None
    fleet_address: str = DEFAULT_FLEET_ADDRESS
    control_port: int = DEFAULT_CONTROL_PORT
    database: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        host, _ = _check_address(self.fleet_address, "fleet address")
        _check_port(self.control_port, "control port")
        if self.insecure and not is_loopback(host):
            raise DeployError(
                f"fleet address {self.fleet_address!r} with --insecure-local-test: an insecure "
                "SuperLink may listen on loopback only (e.g. 127.0.0.1:9092)"
            )
        if not self.insecure:
            if self.credentials is None:
                raise DeployError(
                    "no credentials directory: pass --credentials DIR (made by `fedllama "
                    "credentials create`); --insecure-local-test starts without TLS for "
                    "loopback tests only"
                )
            missing = [
                str(p) for p in credentials.superlink_files(self.credentials) if not p.is_file()
            ]
            if missing:
                raise DeployError(
                    f"credentials {str(self.credentials)!r}: {missing[0]} is missing; create "
                    "them with `fedllama credentials create DIR --address HOST`"
                )

    @property
    def control_address(self) -> str:
        """Where ``flwr`` reaches the Control API (always loopback)."""
        return f"{LOOPBACK}:{self.control_port}"

    @property
    def ca_cert(self) -> Path | None:
        """The CA certificate the ``flwr`` CLI and SuperNodes verify the SuperLink with."""
        if self.insecure or self.credentials is None:
            return None
        return credentials.superlink_files(self.credentials)[0].resolve()


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``."""
    cmd = ["flower-superlink"]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        assert settings.credentials is not None  # checked in SuperLinkSettings.__post_init__
        ca, cert, key = (p.resolve() for p in credentials.superlink_files(settings.credentials))
        cmd += [
            "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key),
            "--enable-supernode-auth",
        ]  # fmt: skip
    cmd += [
        "--fleet-api-address", settings.fleet_address,
        # The HTTP API (Control + ServerApp runtime) has no authentication: loopback only.
        "--host", LOOPBACK,
        "--port", str(settings.control_port),
        # Dependencies are installed by the operator, never fetched by the SuperLink at run time.
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if settings.database is not None:
        cmd += ["--database", str(settings.database.expanduser().resolve())]
    return cmd


def flwr_home() -> Path:
    """Flower's home directory (``$FLWR_HOME``, default ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(
    name: str, address: str, ca_cert: Path | None, home: Path | None = None
) -> Path:
    """Add (or replace) connection ``name`` in ``$FLWR_HOME/config.toml`` and make it the
    default, keeping every other entry; return the file's path.

    ``ca_cert=None`` writes ``insecure = true`` (only for ``--insecure-local-test``).
    """
    # flwr reads and writes this file with tomli/tomli_w (both are flwr dependencies).
    import tomli
    import tomli_w

    path = (home or flwr_home()) / "config.toml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomli.loads(path.read_text())
        except tomli.TOMLDecodeError as err:
            raise DeployError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(ca_cert)
    links[name] = entry
    links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


NodeConfigValue = str | int | float | bool


def node_config_toml(values: Mapping[str, NodeConfigValue]) -> str:
    """Flower's ``--node-config`` string: space-separated TOML ``key=value`` pairs.

    Strings are quoted (Flower rejects unquoted ones); JSON string escapes are valid TOML.

    Raises:
        DeployError: a string holds a double quote or a line break, which Flower's
            ``--node-config`` parser cannot take.
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and ('"' in value or "\n" in value or "\r" in value):
            raise DeployError(
                f"node config {key}={value!r}: Flower's --node-config cannot carry a double "
                "quote or a line break; rename the path"
            )
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class SuperNodeSettings:
    """How an institution starts its SuperNode; the per-institution fields become its node
    config (``data-path``, ``lora-rank``, ``device``, ``batch-size``, ``local-steps``,
    ``cache-dir``).

    Attributes:
        superlink: the coordinator's Fleet API, ``HOST:PORT`` (HOST must be in the SuperLink
            certificate's SANs).
        data_path: this institution's JSONL/CSV file or directory (checked before starting).
        ca_cert: the deployment's ``ca.crt``; required unless ``insecure``.
        private_key: this institution's OpenSSH private key; required unless ``insecure``.
        lora_rank: this institution's LoRA rank (default: the run's ``lora.r``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default: the run's ``model.device``).
        batch_size: micro-batch size (default: the run's ``train.batch_size``).
        local_steps: optimizer steps per round (default: the run's ``train.local_steps``).
        cache_dir: where this machine caches the converted and NF4-quantized base model
            (default: the run's ``model.cache_dir``, ``~/.cache/fedllama``).
        port: the SuperNode's local runtime API port on 127.0.0.1 (one per SuperNode on a host).
        max_retries: connection attempts before giving up (``None``: retry forever).
        insecure: no TLS, no authentication (loopback tests only).
        secagg_roster: the federation's SuperNode public keys (one OpenSSH line each); with
            it the node checks its SecAgg+ neighbours' signed keys against them. The node
            signs its own round keys with ``private_key`` whenever it has one.
    """

    superlink: str
    data_path: Path
    ca_cert: Path | None = None
    private_key: Path | None = None
    lora_rank: int | None = None
    device: str | None = None
    batch_size: int | None = None
    local_steps: int | None = None
    cache_dir: Path | None = None
    port: int = DEFAULT_SUPERNODE_PORT
    max_retries: int | None = None
    insecure: bool = False
    secagg_roster: Path | None = None

    def __post_init__(self) -> None:
        host, _ = _check_address(self.superlink, "superlink")
        _check_port(self.port, "port")
        if self.insecure and not is_loopback(host):
            raise DeployError(
                f"superlink {self.superlink!r} with --insecure-local-test: an insecure "
                "SuperNode may connect to loopback only"
            )
        path = self.data_path.expanduser()
        if not path.exists() or not os.access(path, os.R_OK):
            raise DeployError(
                f"data path {str(self.data_path)!r} does not exist or is not readable; pass "
                "this institution's JSONL/CSV file or directory with --data-path"
            )
        for key in ("lora_rank", "batch_size", "local_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DeployError(f"{key.replace('_', '-')}={value}: expected an integer >= 1")
        if self.secagg_roster is not None and not self.secagg_roster.expanduser().is_file():
            raise DeployError(f"--secagg-roster {str(self.secagg_roster)!r}: no such file")
        if self.max_retries is not None and self.max_retries < 0:
            raise DeployError(f"max-retries={self.max_retries}: expected >= 0")
        if self.device is not None and not (
            self.device in DEVICES or self.device.startswith("cuda:")
        ):
            raise DeployError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not self.insecure:
            for what, value in (("--ca", self.ca_cert), ("--key", self.private_key)):
                if value is None:
                    raise DeployError(
                        f"{what} is required: the SuperLink uses TLS with the deployment's CA "
                        "(ca.crt) and admits only registered keys (your NAME.key)"
                    )
                if not value.expanduser().is_file():
                    raise DeployError(f"{what} {str(value)!r}: no such file")

    def node_config(self) -> dict[str, NodeConfigValue]:
        """The node config the ClientApp reads (``fedllama.client.settings.NodeSettings``)."""
        values: dict[str, NodeConfigValue] = {
            "data-path": str(self.data_path.expanduser().resolve())
        }
        optional = {
            "lora-rank": self.lora_rank,
            "device": self.device,
            "batch-size": self.batch_size,
            "local-steps": self.local_steps,
            "cache-dir": str(self.cache_dir.expanduser().resolve()) if self.cache_dir else None,
            "secagg-signing-key": (
                str(self.private_key.expanduser().resolve())
                if self.private_key and not self.insecure
                else None
            ),
            "secagg-roster": (
                str(self.secagg_roster.expanduser().resolve()) if self.secagg_roster else None
            ),
        }
        values.update({k: v for k, v in optional.items() if v is not None})
        return values


def supernode_command(settings: SuperNodeSettings) -> list[str]:
    """The ``flower-supernode`` command line for ``settings``."""
    cmd = ["flower-supernode", "--superlink", settings.superlink]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        assert settings.ca_cert is not None and settings.private_key is not None  # checked
        cmd += [
            "--root-certificates", str(settings.ca_cert.expanduser().resolve()),
            "--auth-supernode-private-key", str(settings.private_key.expanduser().resolve()),
        ]  # fmt: skip
    cmd += [
        "--node-config", node_config_toml(settings.node_config()),
        "--host", LOOPBACK,
        "--port", str(settings.port),
    ]  # fmt: skip
    if settings.max_retries is not None:
        cmd += ["--max-retries", str(settings.max_retries)]
    return cmd


def register_command(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register KEY.pub CONNECTION`` (JSON output, optional node name)."""
    cmd = ["flwr", "supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        cmd += ["--name", name]
    return cmd


def register(public_key: Path, connection: str) -> int:
    """Register one institution's public key with the SuperLink; return its node id.

    Raises:
        DeployError: the key file is missing or not an ECDSA OpenSSH key, or ``flwr`` refused
            it (the message carries flwr's output).
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        key = load_ssh_public_key(public_key.read_bytes())
    except (OSError, ValueError) as err:
        raise DeployError(
            f"public key {str(public_key)!r}: {err}; expected an OpenSSH public key "
            "(NAME.pub from `fedllama credentials`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeployError(
            f"public key {str(public_key)!r} is {type(key).__name__}: Flower accepts only "
            "ECDSA keys on a NIST curve (create one with `fedllama credentials node-key`)"
        )
    cmd = register_command(public_key, connection, name=public_key.stem)
    proc = subprocess.run([which(cmd[0]), *cmd[1:]], capture_output=True, text=True, check=False)
    output = (proc.stdout + proc.stderr).strip()
    start = output.find("{")
    try:
        reply = json.loads(output[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or not reply.get("success"):
        raise DeployError(f"flwr refused to register {public_key}: {output[-800:]}")
    return int(reply["node-id"])


def which(program: str) -> str:
    """``program`` from this Python's environment first (``.venv/bin``), then ``PATH``."""
    search = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    exe = shutil.which(program, path=search)
    if exe is None:
        raise DeployError(f"{program} is not installed here (pip install 'flwr>=1.39,<1.40')")
    return exe
