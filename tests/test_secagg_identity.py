"""Signed SecAgg+ round keys (issue #12, item 5): a node signs its keys with its SuperNode key;
the server and the node's neighbours check them against the federation's roster."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message

from fedllama.client.secagg import check_neighbours
from fedllama.deploy.credentials import make_node_key
from fedllama.privacy.secagg import identity
from fedllama.privacy.secagg.crypto import new_private_key
from fedllama.privacy.secagg.messages import SECAGG, share_request
from fedllama.privacy.secagg.params import SecAggError
from tests.harness import InProcessGrid, logged, run, tiny_config


def _keys(tmp_path: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (private key, public key) files, as `fedllama credentials` writes them."""
    out = {}
    for name in names:
        private, public = make_node_key(name)
        (tmp_path / f"{name}.key").write_bytes(private)
        (tmp_path / f"{name}.pub").write_bytes(public)
        out[name] = (tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    return out


def _roster(tmp_path: Path, keys: dict[str, tuple[Path, Path]], *names: str) -> Path:
    path = tmp_path / "roster.txt"
    path.write_bytes(b"# the federation\n" + b"".join(keys[n][1].read_bytes() for n in names))
    return path


def _round_keys() -> tuple[bytes, bytes]:
    return new_private_key()[2], new_private_key()[2]


# --------------------------------------------------------------------------- the statement


def test_a_signature_holds_for_its_round_node_and_keys_only(tmp_path: Path) -> None:
    keys = _keys(tmp_path, ["a", "b"])
    roster = identity.load_roster(_roster(tmp_path, keys, "a"))
    signing = identity.load_signing_key(keys["a"][0])
    pks = _round_keys()
    signature, signer = identity.sign(signing, 3, 101, *pks)

    identity.verify(roster, 3, 101, pks, signature, signer)  # the genuine statement
    with pytest.raises(identity.IdentityError, match="node 102's signature does not match"):
        identity.verify(roster, 3, 102, pks, signature, signer)  # replayed by node 102
    with pytest.raises(identity.IdentityError, match="round-4 keys"):
        identity.verify(roster, 4, 101, pks, signature, signer)  # replayed in a later round
    with pytest.raises(identity.IdentityError, match="does not match"):
        identity.verify(roster, 3, 101, _round_keys(), signature, signer)  # keys swapped
    with pytest.raises(identity.IdentityError, match="not signed"):
        identity.verify(roster, 3, 101, pks, b"", b"")
    other = identity.load_signing_key(keys["b"][0])
    signature_b, signer_b = identity.sign(other, 3, 101, *pks)
    with pytest.raises(identity.IdentityError, match="not in the roster"):
        identity.verify(roster, 3, 101, pks, signature_b, signer_b)
    with pytest.raises(identity.IdentityError, match="nodes 101 and 105 present the same"):
        identity.check_signers({101: signer, 105: signer, 103: signer_b})


def test_bad_key_files_are_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    keys = _keys(tmp_path, ["a"])
    bad = tmp_path / "bad-roster.txt"
    bad.write_text(keys["a"][1].read_text() + "ssh-ed25519 not-base64 b\n")
    with pytest.raises(identity.IdentityError, match="bad-roster.txt:2: not an OpenSSH public"):
        identity.load_roster(bad)
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(identity.IdentityError, match="empty.txt: no public keys"):
        identity.load_roster(tmp_path / "empty.txt")
    with pytest.raises(identity.IdentityError, match="missing.key"):
        identity.load_signing_key(tmp_path / "missing.key")
    with pytest.raises(identity.IdentityError, match="a.pub: not an unencrypted key"):
        identity.load_signing_key(keys["a"][1])


def test_a_node_refuses_neighbours_a_man_in_the_middle_substituted(tmp_path: Path) -> None:
    keys = _keys(tmp_path, ["a", "b"])
    roster = _roster(tmp_path, keys, "a", "b")
    genuine = {101: _round_keys(), 102: _round_keys()}
    signed = {
        node: identity.sign(identity.load_signing_key(keys[name][0]), 1, node, *genuine[node])
        for node, name in ((101, "a"), (102, "b"))
    }
    check_neighbours(share_request(1, genuine, signed), genuine, 1, str(roster))  # honest relay

    swapped = {**genuine, 102: _round_keys()}  # the server's own keys in 102's place
    with pytest.raises(SecAggError, match="node 102's signature does not match"):
        check_neighbours(share_request(1, swapped, signed), swapped, 1, str(roster))
    with pytest.raises(SecAggError, match="node 101's keys are not signed"):
        check_neighbours(share_request(1, genuine, {102: signed[102]}), genuine, 1, str(roster))


# --------------------------------------------------------------------------- a federation


def _federation(tmp_path: Path, cache_dir: Path, signer_of: dict[int, str], *roster_names: str):  # type: ignore[no-untyped-def]
    keys = _keys(tmp_path, sorted(set(signer_of.values()) | set(roster_names)))
    roster = _roster(tmp_path, keys, *roster_names)
    node_config: dict[int, dict[str, int | str]] = {
        pid: {"secagg-signing-key": str(keys[name][0]), "secagg-roster": str(roster)}
        for pid, name in signer_of.items()
    }
    cfg = tiny_config(
        cache_dir,
        tmp_path / "run",
        "server.rounds=1",
        "output.plot=false",
        "secagg.enabled=true",
        f"secagg.roster={roster}",
        "server.failed_round=stop",
    )
    return cfg, node_config


def test_signed_keys_aggregate_and_an_outsider_is_dropped_at_the_key_stage(
    cache_dir: Path, tmp_path: Path
) -> None:
    names = {0: "hospital-a", 1: "hospital-b", 2: "intruder"}
    cfg, node_config = _federation(tmp_path, cache_dir, names, "hospital-a", "hospital-b")
    with logged() as lines:
        rows = run(InProcessGrid(3, node_config=node_config), cfg)

    assert rows[-1]["clients_ok"] == 2
    (dropped,) = rows[-1]["dropped"]
    assert dropped["node"] == 102 and dropped["stage"] == "setup"
    assert "signed by a key that is not in the roster" in dropped["reason"]
    assert any("secagg setup: dropped node 102" in line for line in lines)


def _replaying(seen: dict[str, object], *keys: str):  # type: ignore[no-untyped-def]
    """A tamper hook: node 102's key-stage reply carries node 100's ``keys`` fields."""

    def replay(pid: int, reply: Message) -> Message:
        if reply.metadata.message_type.endswith("secagg_setup") and not reply.has_error():
            fields = reply.content.config_records[SECAGG]
            if pid == 0:
                seen.update(fields)
            elif pid == 2:
                for key in keys:
                    fields[key] = seen[key]
        return reply

    return replay


def test_a_node_that_replays_anothers_signed_keys_is_named_and_the_rest_go_on(
    cache_dir: Path, tmp_path: Path
) -> None:
    names = {0: "hospital-a", 1: "hospital-b", 2: "hospital-c"}
    roster = ("hospital-a", "hospital-b", "hospital-c")
    cfg, node_config = _federation(tmp_path, cache_dir, names, *roster)
    seen: dict[str, object] = {}
    # node 102 advertises node 100's keys, signature and signer
    replay = _replaying(seen, "pk-enc", "pk-mask", "signature", "signer")

    rows = run(InProcessGrid(3, replay, node_config), cfg)

    assert seen and rows[-1]["clients_ok"] == 2
    (dropped,) = rows[-1]["dropped"]
    assert dropped["node"] == 102 and "signature does not match" in dropped["reason"]


def test_without_a_roster_a_replayed_key_drops_both_nodes_and_the_round_goes_on(
    cache_dir: Path, tmp_path: Path
) -> None:
    replay = _replaying({}, "pk-enc")  # node 102 replays node 100's key

    common = ("server.rounds=1", "output.plot=false", "secagg.enabled=true")
    six = ("simulation.num_clients=6", "data.partition=iid", "server.failed_round=stop")
    cfg = tiny_config(cache_dir, tmp_path / "run", *common, *six)
    rows = run(InProcessGrid(6, replay), cfg)

    assert rows[-1]["clients_ok"] == 4  # t = 4 of 6: the four others aggregate
    assert sorted(d["node"] for d in rows[-1]["dropped"]) == [100, 102]
    assert all("advertise the same public key" in d["reason"] for d in rows[-1]["dropped"])
