"""Deployment over gRPC on loopback: TLS, SuperNode authentication, per-institution node config,
and faults (a SuperNode killed mid-round; the ServerApp killed and started again).

The end-to-end tests run what the guides document: ``scripts/start-superlink.sh``,
``fedllama deploy register``, ``scripts/start-supernode.sh`` and ``flwr run . fedllama``. Each
test gives every machine it plays (coordinator, institutions) its own ``HOME`` and
``FLWR_HOME``, uses free ports, and stops every process it started, with their descendants
(Flower detaches its SuperExec into a new session), in teardown.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import tomli
from flwr.app import Error, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from fedllama.deploy import commands as deploy
from fedllama.deploy import credentials
from fedllama.deploy.commands import DeployError, SuperLinkSettings, SuperNodeSettings
from fedllama.server.replies import SUPERLINK_NODE_ID, stream_replies
from tests.harness import (
    NODE_ID,
    SCRIPTS,
    Deployment,
    Proc,
    cmdline,
    descendants,
    free_port,
    metrics_rows,
    seed_home_cache,
    train_size,
    write_jsonl,
)

# --------------------------------------------------------------------------- fast checks


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.fixture
def creds(tmp_path: Path) -> credentials.CredentialPaths:
    return credentials.create(tmp_path / "creds", ["localhost"], ["hospital-a"])


def test_superlink_uses_tls_auth_and_a_loopback_control_api(
    creds: credentials.CredentialPaths,
) -> None:
    cmd = deploy.superlink_command(SuperLinkSettings(credentials=creds.ca_cert.parent))

    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" in cmd
    assert _value(cmd, "--ssl-ca-certfile") == str(creds.ca_cert)
    assert _value(cmd, "--ssl-certfile") == str(creds.superlink_cert)
    assert _value(cmd, "--ssl-keyfile") == str(creds.superlink_key)
    assert _value(cmd, "--host") == "127.0.0.1"
    assert _value(cmd, "--fleet-api-address") == "0.0.0.0:9092"


def test_superlink_without_credentials_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="no credentials directory: pass --credentials"):
        SuperLinkSettings()
    with pytest.raises(DeployError, match=r"ca\.crt is missing; create them with"):
        SuperLinkSettings(credentials=tmp_path)


def test_insecure_superlink_only_on_loopback() -> None:
    with pytest.raises(DeployError, match="an insecure SuperLink may listen on loopback only"):
        SuperLinkSettings(insecure=True)

    cmd = deploy.superlink_command(SuperLinkSettings(fleet_address="127.0.0.1:9", insecure=True))

    assert "--insecure" in cmd
    assert "--enable-supernode-auth" not in cmd


def test_insecure_superlink_start_is_logged_loudly(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    cmd = [SCRIPTS / "start-superlink.sh", "--insecure-local-test"]
    cmd += ["--fleet-address", "127.0.0.1:9092", "--dry-run"]

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert "INSECURE: TLS and SuperNode authentication are OFF" in proc.stderr
    assert proc.stdout.startswith("flower-superlink --insecure ")


def test_supernode_node_config_round_trips_through_flowers_parser(
    creds: credentials.CredentialPaths, tmp_path: Path
) -> None:
    path = tmp_path / "my data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("")
    settings = SuperNodeSettings(
        superlink="superlink.example.org:9092",
        data_path=path,
        ca_cert=creds.ca_cert,
        private_key=creds.nodes["hospital-a"].private_key,
        lora_rank=16,
        device="cuda:1",
        batch_size=2,
        local_steps=5,
        cache_dir=tmp_path / "cache",
        secagg_roster=creds.nodes["hospital-a"].public_key,  # a roster of one
    )

    cmd = deploy.supernode_command(settings)

    node_config = _value(cmd, "--node-config")
    assert parse_config_args([node_config]) == {
        "data-path": str(path),
        "lora-rank": 16,
        "device": "cuda:1",
        "batch-size": 2,
        "local-steps": 5,
        "cache-dir": str(tmp_path / "cache"),
        "secagg-signing-key": str(creds.nodes["hospital-a"].private_key),  # its SuperNode key
        "secagg-roster": str(creds.nodes["hospital-a"].public_key),
    }
    assert _value(cmd, "--root-certificates") == str(creds.ca_cert)
    assert "--insecure" not in cmd


def test_supernode_refuses_a_missing_data_path_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    cmd = [SCRIPTS / "start-supernode.sh", "--superlink", "127.0.0.1:9092"]
    cmd += ["--data-path", str(missing), "--insecure-local-test"]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 2
    assert f"data path '{missing}' does not exist or is not readable" in proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ca_cert": None}, r"--ca is required"),
        ({"superlink": "superlink.example.org"}, r"superlink='superlink\.example\.org': "),
        ({"lora_rank": 0}, r"lora-rank=0: expected an integer >= 1"),
        ({"device": "tpu"}, r"device='tpu': expected auto, cpu, cuda or cuda:N"),
        ({"insecure": True}, r"an insecure SuperNode may connect to loopback only"),
    ],
)
def test_bad_supernode_settings_are_named(
    creds: credentials.CredentialPaths, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    (tmp_path / "d.jsonl").write_text("")
    args: dict[str, Any] = {
        "superlink": "superlink.example.org:9092",
        "data_path": tmp_path / "d.jsonl",
        "ca_cert": creds.ca_cert,
        "private_key": creds.nodes["hospital-a"].private_key,
        **kwargs,
    }
    with pytest.raises(DeployError, match=message):
        SuperNodeSettings(**args)


def test_connection_is_written_and_other_entries_kept(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[superlink.other]\naddress = "10.0.0.1:8000"\n')

    deploy.write_connection("fedllama", "127.0.0.1:8000", Path("/c/ca.crt"), home=tmp_path)

    written = tomli.loads((tmp_path / "config.toml").read_text())
    assert written["superlink"] == {
        "default": "fedllama",
        "other": {"address": "10.0.0.1:8000"},
        "fedllama": {"address": "127.0.0.1:8000", "root-certificates": "/c/ca.crt"},
    }


def test_register_refuses_a_key_flower_would_reject(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = tmp_path / "ed.pub"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )

    with pytest.raises(DeployError, match="Flower accepts only ECDSA keys on a NIST curve"):
        deploy.register(key, "fedllama")
    with pytest.raises(DeployError, match="expected an OpenSSH public key"):
        deploy.register(tmp_path / "missing.pub", "fedllama")


class _FakeGrid:
    """Node 7 replies, node 8 is reported dead by the SuperLink, node 9 stays silent."""

    def __init__(self) -> None:
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
        return list(self.sent)

    def pull_messages(self, ids: set[str]) -> list[Message]:
        out = []
        for mid in sorted(ids):
            msg = self.sent[mid]
            node = msg.metadata.dst_node_id
            if node == 7:
                out.append(Message(RecordDict(), reply_to=msg))
            elif node == 8:
                reply = Message(Error(code=3, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                out.append(reply)
        return out


def test_stream_replies_names_dead_and_silent_nodes(caplog: pytest.LogCaptureFixture) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8, 9)]

    logger = logging.getLogger("fedllama")  # setup_logging() stops it propagating to root
    logger.addHandler(caplog.handler)
    try:
        replies = list(stream_replies(_FakeGrid(), messages, timeout=0.5, poll_s=0.05))  # type: ignore[arg-type]
    finally:
        logger.removeHandler(caplog.handler)

    assert sorted(r.metadata.src_node_id for r in replies) == [7, 8]
    dead = next(r for r in replies if r.has_error())
    assert dead.metadata.src_node_id == 8  # re-addressed from the SuperLink's id
    assert "Node Unavailable" in dead.error.reason
    assert re.search(r"node 8 is unreachable \(reported by the SuperLink [\d.]+ s", caplog.text)
    assert "1 node(s) did not reply within server.timeout_s=0 s: 9" in caplog.text


BASE_LOAD = re.compile(r"base model loaded in ([\d.]+) s \(([^)]*)\)")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_institutions_train_over_tls_with_their_own_ranks_and_data(
    deployment: Deployment,
) -> None:
    dep = deployment
    for who in ("coordinator", "hospital-a", "hospital-b"):
        seed_home_cache(dep, who)
    data_a = write_jsonl(dep.home("hospital-a") / "data" / "icd.jsonl", "ICD codes", 30)
    data_b = write_jsonl(dep.home("hospital-b") / "data" / "hpo.jsonl", "phenotypes", 50)
    out = dep.root / "coordinator" / "run"
    dep.start_superlink()
    ids = dep.register("hospital-a", "hospital-b")
    node_a = dep.start_supernode("hospital-a", data_a, 2)
    node_b = dep.start_supernode("hospital-b", data_b, 4)

    run = dep.flwr_run(
        # Each machine resolves ~ to its own home: the quantized base is cached per institution.
        "model.cache_dir=~/.cache/fedllama model.quantization=nf4",
        f"output.dir={out} server.rounds=2 strategy.name=rank_aware lora.r=4",
    )

    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert (node_a, node_b) == (ids["hospital-a"], ids["hospital-b"])
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        clients = {c["node"]: c for c in row["clients"]}
        assert row["clients_ok"] == 2
        assert {n: c["lora-rank"] for n, c in clients.items()} == {node_a: 2, node_b: 4}
        assert {n: c["num-examples"] for n, c in clients.items()} == {
            node_a: train_size(data_a),
            node_b: train_size(data_b),
        }
    adapter = out / "round-002"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()
    _assert_peft_loads(adapter)
    # Each institution quantized its base once (first message) and read it from disk after.
    for name in ("hospital-a", "hospital-b"):
        loads = BASE_LOAD.findall(dep.nodes[name].text())
        assert [how.split(", ")[1] for _, how in loads] == [
            "quantized to NF4 now and cached",
            "NF4 from the disk cache",
        ], loads
        print(f"{name}: base load per message (s): {[float(s) for s, _ in loads]}")


def _assert_peft_loads(adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert model.peft_config["default"].r == 4


# --------------------------------------------------------------------------- refused nodes


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_rejected(deployment: Deployment) -> None:
    dep = deployment
    data_path = write_jsonl(dep.home("intruder") / "d.jsonl", "x", 10)
    dep.start_superlink()
    dep.register("hospital-a")  # the intruder's key is never registered

    node = dep.procs.start(
        "intruder",
        dep.supernode_cmd("intruder", data_path, 2, "--max-retries", "0"),
        dep.env("intruder"),
    )

    assert node.wait_exit(120) != 0
    assert "[code: 2004] Failed to activate SuperNode." in node.text()
    assert not NODE_ID.search(node.text())


@pytest.mark.slow
def test_supernode_without_the_deployments_ca_cannot_connect(
    deployment: Deployment, tmp_path: Path
) -> None:
    dep = deployment
    data_path = write_jsonl(dep.home("hospital-a") / "d.jsonl", "x", 10)
    foreign = credentials.create(tmp_path / "foreign", ["localhost"])  # another CA
    dep.start_superlink()
    dep.register("hospital-a")
    cmd = dep.supernode_cmd("hospital-a", data_path, 2, "--max-retries", "0")
    cmd[cmd.index("--ca") + 1] = str(foreign.ca_cert)

    node = dep.procs.start("hospital-a", cmd, dep.env("hospital-a"))

    assert node.wait_exit(120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.text()
    assert not NODE_ID.search(node.text())


@pytest.mark.slow
def test_insecure_supernode_is_refused_by_the_tls_superlink(deployment: Deployment) -> None:
    dep = deployment
    data_path = write_jsonl(dep.home("hospital-a") / "d.jsonl", "x", 10)
    dep.start_superlink()
    cmd = [str(SCRIPTS / "start-supernode.sh"), "--superlink", f"127.0.0.1:{dep.fleet_port}"]
    cmd += ["--data-path", str(data_path), "--insecure-local-test", "--max-retries", "0"]
    cmd += ["--port", str(free_port())]

    node = dep.procs.start("insecure", cmd, dep.env("hospital-a"))

    assert node.wait_exit(120) != 0
    assert re.search(r"UNAVAILABLE: .*Socket closed", node.text()), node.text()[-2000:]
    assert not NODE_ID.search(node.text())


@pytest.mark.slow
def test_clientapp_refuses_a_data_path_that_disappeared_naming_it(
    deployment: Deployment,
) -> None:
    dep = deployment
    data_path = write_jsonl(dep.home("hospital-a") / "data" / "icd.jsonl", "ICD", 20)
    dep.start_superlink()
    dep.register("hospital-a")
    node = dep.start_supernode("hospital-a", data_path, 2)
    data_path.unlink()  # e.g. an unmounted volume: the SuperNode itself checked it at start

    run = dep.flwr_run(
        f"model.cache_dir={dep.cache} output.dir={dep.root / 'run'}", "server.rounds=1"
    )

    log = run.stdout + run.stderr
    expected = f"node config data-path='{data_path}' does not exist or is not readable"
    assert f"round 1: dropped node {node}: error reply" in log, log[-4000:]
    assert expected in log
    assert "ClientSetupError" in log
    assert "1 good replies" not in log and "0 good replies" in log
    assert expected in dep.nodes["hospital-a"].text()


# --------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_killed_supernode_round_completes_and_the_node_rejoins(deployment: Deployment) -> None:
    dep = deployment
    data_a = write_jsonl(dep.home("hospital-a") / "a.jsonl", "ICD", 20)
    data_b = write_jsonl(dep.home("hospital-b") / "b.jsonl", "HPO", 20)
    out = dep.root / "run"
    dep.start_superlink()
    dep.register("hospital-a", "hospital-b")
    node_a = dep.start_supernode("hospital-a", data_a, 2)
    node_b = dep.start_supernode("hospital-b", data_b, 4)
    run = dep.procs.start(
        "flwr-run",
        dep.run_cmd(
            f"model.cache_dir={dep.cache} output.dir={out} server.rounds=3",
            "strategy.name=rank_aware lora.r=4 server.min_replies=1 server.timeout_s=300",
        ),
        dep.env("coordinator"),
    )

    # Act 1: hospital-b dies (SIGKILL, the whole tree) while its ClientApp works on round 1.
    dep.nodes["hospital-b"].wait_for(r"Start `flwr-clientapp` process", 180)
    killed_at = time.monotonic()
    dep.procs.kill(dep.nodes["hospital-b"])
    run.wait_for(r"round 1/3 done", 240)
    round1_s = time.monotonic() - killed_at
    # Act 2: it comes back with the same key (the SuperLink now has it offline, so it may).
    restarted = dep.procs.start(
        "hospital-b-again", dep.supernode_cmd("hospital-b", data_b, 4), dep.env("hospital-b")
    )
    assert int(restarted.wait_for(NODE_ID, 120).group(1)) == node_b

    assert run.wait_exit(400) == 0, run.text()[-4000:]
    log = run.text()
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [c["node"] for c in rows[1]["clients"]] == [node_a]
    assert (rows[1]["clients_ok"], rows[1]["clients_dropped"]) == (1, 1)
    detected = re.search(
        rf"node {node_b} is unreachable \(reported by the SuperLink ([\d.]+) s", log
    )
    assert detected, log[-4000:]
    assert "Node Unavailable" in log
    assert f"round 1: dropped node {node_b}: error reply" in log
    assert sorted(c["node"] for c in rows[3]["clients"]) == sorted([node_a, node_b])
    print(
        f"node {node_b} reported unreachable {detected.group(1)} s into round 1; "
        f"round 1 ended {round1_s:.1f} s after the kill"
    )


def _serverapp_pids(superlink: Proc) -> list[int]:
    return [p for p in descendants(superlink.popen.pid) if "flwr-serverapp" in cmdline(p)]


@pytest.mark.slow
def test_killed_serverapp_resumes_after_the_last_completed_round(deployment: Deployment) -> None:
    dep = deployment
    data_a = write_jsonl(dep.home("hospital-a") / "a.jsonl", "ICD", 20)
    data_b = write_jsonl(dep.home("hospital-b") / "b.jsonl", "HPO", 20)
    out = dep.root / "run"
    overrides = (
        f"model.cache_dir={dep.cache} output.dir={out} server.rounds=2",
        "strategy.name=rank_aware lora.r=4",
    )
    superlink = dep.start_superlink()
    dep.register("hospital-a", "hospital-b")
    dep.start_supernode("hospital-a", data_a, 2)
    dep.start_supernode("hospital-b", data_b, 4)
    first = dep.procs.start("flwr-run-1", dep.run_cmd(*overrides), dep.env("coordinator"))
    first.wait_for(r"round 1/2 done", 240)
    serverapps = _serverapp_pids(superlink)
    assert len(serverapps) == 1, [cmdline(p) for p in descendants(superlink.popen.pid)]

    os.kill(serverapps[0], signal.SIGKILL)  # the coordinator's ServerApp crashes
    dep.procs.kill(first, signal.SIGTERM)  # its `flwr run --stream` has nothing left to show
    done_before = max(r["round"] for r in metrics_rows(out))
    second = dep.flwr_run(*overrides)

    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert f"resuming {out} after round {done_before}" in log
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 2 for r in rows[1:])
    assert (out / "round-002" / "adapter_model.safetensors").is_file()
