"""Node settings and one client round."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import strategies
from fedllama import data, model
from fedllama.client import round as client_round
from fedllama.client import settings as client_settings
from fedllama.client.settings import ClientSetupError, NodeSettings
from fedllama.config import Config
from fedllama.merge import WEIGHT_KEY
from fedllama.model import adapters
from fedllama.model.adapters import AdapterError
from tests.harness import logged


def test_node_config_overrides_rank_device_batch_and_steps(tiny_cfg: Config) -> None:
    node = NodeSettings.from_node_config(
        {
            "data-path": "/x.jsonl",
            "lora-rank": 16,
            "device": "cpu",
            "batch-size": 2,
            "local-steps": 3,
            "cache-dir": "/srv/cache",
        }
    )
    cfg = node.apply(tiny_cfg)
    assert (cfg.model.device, cfg.train.batch_size, cfg.train.local_steps) == ("cpu", 2, 3)
    assert cfg.model.cache_dir == "/srv/cache"
    assert node.rank(tiny_cfg) == 16


def test_node_config_with_wrong_types_is_named() -> None:
    with pytest.raises(ClientSetupError, match="lora-rank='8': expected an integer"):
        NodeSettings.from_node_config({"lora-rank": "8"})
    with pytest.raises(ClientSetupError, match="data-path=3: expected a quoted string"):
        NodeSettings.from_node_config({"data-path": 3})


def test_missing_data_path_is_refused_with_its_name(tiny_cfg: Config, tmp_path: Path) -> None:
    node = NodeSettings(data_path=str(tmp_path / "site-a.jsonl"))
    with pytest.raises(ClientSetupError, match="data-path=.*site-a.jsonl.* does not exist"):
        client_settings.load_split(tiny_cfg, node)


def test_node_without_data_is_told_how_to_give_it(tiny_cfg: Config) -> None:
    with pytest.raises(ClientSetupError, match="--node-config 'data-path="):
        client_settings.load_split(tiny_cfg, NodeSettings())


def test_local_data_path_is_split_into_train_and_eval(tiny_cfg: Config, tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("instruction,response\n" + "".join(f"q{i},a{i}\n" for i in range(20)))
    split = client_settings.load_split(tiny_cfg, NodeSettings(data_path=str(path)))
    assert len(split.train) == 18 and len(split.eval) == 2


def test_round_replies_with_the_encoded_delta_only(tiny_cfg: Config) -> None:
    lora_model, _ = model.get_lora_model(tiny_cfg)
    view = adapters.get_adapter_state(lora_model)
    split = client_settings.load_split(tiny_cfg, NodeSettings(partition_id=0, num_partitions=3))

    out = client_round.run_round(
        tiny_cfg, strategies.build(tiny_cfg), view, split, server_round=1, client_id=0
    )

    n = out.metrics["num-examples"]
    assert n == len(split.train)
    assert out.encoded[WEIGHT_KEY].tolist() == [float(n)]
    trained = adapters.get_adapter_state(lora_model)
    for k, v in view.items():
        assert out.encoded[k].dtype == torch.float32
        assert torch.allclose(out.encoded[k], n * (trained[k] - v), atol=1e-5), "w·(trained - view)"


def test_a_client_whose_eval_answers_do_not_fit_still_trains_and_replies(
    tiny_cfg: Config,
) -> None:
    """With 1,000 clients a client can draw an eval split whose only answer lies beyond
    data.max_seq_len: its round goes on without a client eval (it failed the round before)."""
    split = client_settings.load_split(tiny_cfg, NodeSettings(partition_id=0, num_partitions=3))
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "an answer"}]}  # fmt: skip
    split = data.Split(train=split.train, eval=[long])
    lora_model, _ = model.get_lora_model(tiny_cfg)

    with logged("fedllama", logging.INFO) as lines:
        out = client_round.run_round(
            tiny_cfg,
            strategies.build(tiny_cfg),
            adapters.get_adapter_state(lora_model),
            split,
            server_round=1,
            client_id=7,
        )

    assert out.metrics["num-examples"] == len(split.train)
    assert "client-eval-loss" not in out.metrics
    assert any(line.startswith("client 7: no client eval this round") for line in lines)
    with pytest.raises(data.DataError, match="no usable example"):
        client_round.run_round(
            tiny_cfg,
            strategies.build(tiny_cfg),
            adapters.get_adapter_state(lora_model),
            data.Split(train=[long], eval=split.eval),
            server_round=1,
            client_id=7,
        )


def test_local_factors_come_from_the_clients_own_state(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedllama.client.round import _with_local_state

    a, b = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
    view = {a: torch.ones(2, 3), b: torch.zeros(3, 2)}
    assert _with_local_state(view, frozenset({"lora_B"}), tmp_path / "none.safetensors") is view
    save_file({b: torch.full((3, 2), 7.0)}, str(tmp_path / "s.safetensors"))

    mixed = _with_local_state(view, frozenset({"lora_B"}), tmp_path / "s.safetensors")

    assert torch.equal(mixed[a], view[a]) and torch.equal(mixed[b], torch.full((3, 2), 7.0))
    save_file({b: torch.zeros(4, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError, match=r"bad.safetensors: .*shape \(4, 2\), expected \(3, 2\)"):
        _with_local_state(view, frozenset({"lora_B"}), tmp_path / "bad.safetensors")
