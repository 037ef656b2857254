"""``fedllama credentials ...`` and ``fedllama deploy ...``: argument parsing and dispatch."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllama.deploy import credentials
from fedllama.deploy.commands import (
    DEFAULT_CONNECTION,
    DEFAULT_CONTROL_PORT,
    DEFAULT_FLEET_ADDRESS,
    DEFAULT_SUPERNODE_PORT,
    INSECURE_WARNING,
    DeployError,
    SuperLinkSettings,
    SuperNodeSettings,
    register,
    superlink_command,
    supernode_command,
    which,
    write_connection,
)

log = logging.getLogger(__name__)


def add_commands(sub: Any) -> None:
    """Add ``credentials`` and ``deploy`` to the ``fedllama`` command's subparsers."""
    _add_credentials(sub)
    _add_deploy(sub)


def _add_credentials(sub: Any) -> None:
    cred = sub.add_parser("credentials", help="create the CA, SuperLink certificate and keys")
    cred_sub = cred.add_subparsers(dest="action", required=True)
    create = cred_sub.add_parser(
        "create", help="a CA, the SuperLink's TLS certificate, and key pairs for institutions"
    )
    create.add_argument("dir", type=Path, help="output directory (created 0700)")
    create.add_argument(
        "--address",
        action="append",
        default=[],
        required=True,
        help="host name or IP the institutions dial (repeat; 127.0.0.1 is always added)",
    )
    create.add_argument(
        "--institution", action="append", default=[], help="name of an institution (repeat)"
    )
    create.add_argument("--days", type=int, default=365, help="certificate validity")
    create.add_argument("--force", action="store_true", help="replace existing files")
    node_key = cred_sub.add_parser(
        "node-key", help="one SuperNode key pair (an institution can make its own)"
    )
    node_key.add_argument("dir", type=Path, help="writes DIR/nodes/NAME.key and NAME.pub")
    node_key.add_argument("name", help="the institution's name")
    node_key.add_argument("--force", action="store_true", help="replace existing files")


def _add_deploy(sub: Any) -> None:
    dep = sub.add_parser("deploy", help="start a SuperLink or SuperNode, register keys")
    dep_sub = dep.add_subparsers(dest="action", required=True)
    link = dep_sub.add_parser("superlink", help="start the coordinator's SuperLink (TLS + auth)")
    link.add_argument("--credentials", type=Path, help="directory from `credentials create`")
    link.add_argument("--fleet-address", default=DEFAULT_FLEET_ADDRESS, help="HOST:PORT")
    link.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT)
    link.add_argument(
        "--database",
        type=Path,
        help="SQLite file for registered keys and runs (default: in memory, as Flower's)",
    )
    link.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr CLI connection")
    link.add_argument(
        "--insecure-local-test",
        action="store_true",
        help="no TLS, no SuperNode authentication; loopback fleet address only (tests)",
    )
    link.add_argument("--dry-run", action="store_true", help="print the command, start nothing")

    node = dep_sub.add_parser("supernode", help="start an institution's SuperNode")
    node.add_argument("--superlink", required=True, help="the SuperLink's Fleet API HOST:PORT")
    node.add_argument("--data-path", type=Path, required=True, help="JSONL/CSV file or dir")
    node.add_argument("--ca", type=Path, help="the deployment's ca.crt")
    node.add_argument("--key", type=Path, help="this institution's private key (NAME.key)")
    node.add_argument("--lora-rank", type=int)
    node.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    node.add_argument("--batch-size", type=int)
    node.add_argument("--local-steps", type=int)
    node.add_argument(
        "--cache-dir", type=Path, help="base-model cache on this machine (~/.cache/fedllama)"
    )
    node.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT, help="local API port")
    node.add_argument("--max-retries", type=int, help="give up after N failed connections")
    node.add_argument(
        "--secagg-roster",
        type=Path,
        help="the federation's SuperNode public keys (cat */*.pub): check SecAgg+ neighbours",
    )
    node.add_argument(
        "--insecure-local-test",
        action="store_true",
        help="no TLS, no key; only to a SuperLink on loopback (tests)",
    )
    node.add_argument("--dry-run", action="store_true", help="print the command, start nothing")

    reg = dep_sub.add_parser("register", help="register institutions' public keys")
    reg.add_argument("keys", type=Path, nargs="+", help="NAME.pub files")
    reg.add_argument("--connection", default=DEFAULT_CONNECTION, help="flwr CLI connection")


COMMANDS = ("credentials", "deploy")


def _exec(cmd: Sequence[str], dry_run: bool) -> int:
    if dry_run:
        print(shlex.join(cmd))
        return 0
    exe = which(cmd[0])
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    bin_dir = str(Path(exe).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, [exe, *cmd[1:]])  # the PID the caller started becomes Flower's process


def run_command(args: argparse.Namespace) -> int:
    """Run a ``credentials`` or ``deploy`` subcommand; return the exit code."""
    try:
        return _run(args)
    except (DeployError, credentials.CredentialsError) as err:
        print(f"fedllama: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "credentials":
        return _create(args) if args.action == "create" else _node_key(args)
    if args.action == "superlink":
        return _superlink(args)
    if args.action == "supernode":
        return _supernode(args)
    for key in args.keys:
        node_id = register(key, args.connection)
        print(f"registered {key} as node {node_id}")
    return 0


def _create(args: argparse.Namespace) -> int:
    paths = credentials.create(args.dir, args.address, args.institution, args.days, args.force)
    print(f"CA certificate (give to every institution): {paths.ca_cert}")
    print(f"CA key (keep private, offline):             {paths.ca_key}")
    print(
        f"SuperLink certificate and key:              {paths.superlink_cert}, {paths.superlink_key}"
    )
    for name, pair in paths.nodes.items():
        print(
            f"{name}: private key (give to {name} only) {pair.private_key}, "
            f"public key (register) {pair.public_key}"
        )
    return 0


def _node_key(args: argparse.Namespace) -> int:
    pair = credentials.write_node_key(args.dir, args.name, args.force)
    print(f"private key (keep): {pair.private_key}")
    print(f"public key (send to the coordinator): {pair.public_key}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    link = SuperLinkSettings(
        credentials=args.credentials,
        fleet_address=args.fleet_address,
        control_port=args.control_port,
        database=args.database,
        insecure=args.insecure_local_test,
    )
    if link.insecure:
        log.warning(INSECURE_WARNING)
    cmd = superlink_command(link)
    if not args.dry_run:
        if link.database is not None:  # sqlite does not create the directory
            link.database.expanduser().resolve().parent.mkdir(
                mode=0o700, parents=True, exist_ok=True
            )
        path = write_connection(args.connection, link.control_address, link.ca_cert)
        log.info(
            "flwr connection %r (%s) written to %s", args.connection, link.control_address, path
        )
    return _exec(cmd, args.dry_run)


def _supernode(args: argparse.Namespace) -> int:
    node = SuperNodeSettings(
        superlink=args.superlink,
        data_path=args.data_path,
        ca_cert=args.ca,
        private_key=args.key,
        lora_rank=args.lora_rank,
        device=args.device,
        batch_size=args.batch_size,
        local_steps=args.local_steps,
        cache_dir=args.cache_dir,
        port=args.port,
        max_retries=args.max_retries,
        insecure=args.insecure_local_test,
        secagg_roster=args.secagg_roster,
    )
    if node.insecure:
        log.warning(INSECURE_WARNING)
    return _exec(supernode_command(node), args.dry_run)
