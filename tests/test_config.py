from __future__ import annotations

import re
from pathlib import Path

import pytest

import server.app
from fedllama import config as config_lib
from fedllama.config import ConfigError

SHIPPED = sorted(
    (Path(__file__).resolve().parent.parent / "simulations" / "configs").glob("*.yaml")
)


def test_defaults_load_with_issue_key_names() -> None:
    cfg = config_lib.load()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.model.quantization == "nf4"
    assert cfg.lora.r == 8 and cfg.lora.lora_alpha == 16
    assert cfg.strategy.name == "fedavg"
    assert cfg.server.rounds >= 1 and cfg.simulation.num_clients >= 1
    assert cfg.output.dir


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_says_how_to_run_it(path: Path) -> None:
    cfg = config_lib.load(path)
    server.app.check(cfg)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "a shipped YAML opens with a comment saying what it runs"
    assert f"fedllama simulate simulations/configs/{path.name}" in path.read_text()


def test_overrides_win_over_yaml() -> None:
    cfg = config_lib.load(SHIPPED[0], ["lora.r=16", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_lora_section_feeds_peft_unchanged() -> None:
    import peft

    lora = peft.LoraConfig(**config_lib.load(None, ["lora.client_ranks=[2,4]"]).lora.peft_kwargs())
    assert lora.r == 8


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rank=4", "lora.rank: unknown key; valid keys here: bias, client_ranks, lora_alpha"),
        ("trainer.lr=1", "trainer: unknown key"),
        ("lora.r=four", "lora.r: Value 'four'"),
        ("server.rounds=1.5", "server.rounds"),
        ("lora.r=0", "lora.r: must be >= 1, got 0"),
        ("model.quantization=int3", "model.quantization: got 'int3', expected one of nf4, none"),
        ("model.name=gpt2", "model.name: got 'gpt2', expected one of tiny, smollm2-135m"),
        ("data.partition=random", "data.partition: got 'random'"),
        ("train.lr_schedule=step", "train.lr_schedule"),
        ("server.optimizer=adamw", "server.optimizer: got 'adamw'"),
        ("data.eval_fraction=1.5", "data.eval_fraction: must be in (0, 1)"),
        ("model.device=tpu", "model.device"),
        ("simulation.num_clients=0", "simulation.num_clients"),
    ],
)
def test_bad_values_fail_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, [override])
    assert expected in str(err.value)


def test_institution_split_of_demo_needs_four_clients() -> None:
    with pytest.raises(ConfigError, match="simulation.num_clients.*4 institutions"):
        config_lib.load(None, ["simulation.num_clients=8", "data.partition=institution"])


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config_lib.load(None, ["lora.r"])


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        config_lib.load(tmp_path / "does-not-exist.yaml")


def test_unknown_strategy_lists_the_valid_ones() -> None:
    cfg = config_lib.load(None, ["strategy.name=fedmagic"])
    with pytest.raises(ValueError, match="unknown strategy 'fedmagic'; valid: fedavg"):
        server.app.check(cfg)


def test_yaml_round_trip_is_lossless() -> None:
    cfg = config_lib.load(SHIPPED[0], ["train.fedprox_mu=0.01"])
    assert config_lib.from_yaml(config_lib.to_yaml(cfg)) == cfg


def test_a_serialised_config_is_parsed_once_and_each_caller_gets_its_own_copy() -> None:
    text = config_lib.to_yaml(config_lib.load(SHIPPED[0], ["lora.r=6"]))
    before = config_lib._parse.cache_info()

    first = config_lib.from_yaml(text)
    first.lora.r = 99  # a caller that changes its copy
    second = config_lib.from_yaml(text)

    after = config_lib._parse.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert second.lora.r == 6 and second is not first
    assert config_lib.from_yaml(text, ["lora.r=3"]).lora.r == 3  # overrides are part of the key


def test_cli_reports_config_errors_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fedllama.cli import main

    assert main(["check", str(SHIPPED[0]), "lora.r=-1"]) == 2
    assert "lora.r: must be >= 1" in capsys.readouterr().err


def test_a_client_resolves_nothing_in_the_servers_config(monkeypatch) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedllama.server.inprocess import InProcessGrid
    from fedllama.wire.records import CONFIG, CONFIG_YAML, ROUND
    from tests.harness import InProcessGrid as RepoGrid

    secret = "s3cr3t-value-of-the-institution"
    monkeypatch.setenv("FEDLLAMA_PLANTED", secret)
    text = config_lib.to_yaml(config_lib.load(None)).replace(
        "  cache_dir: ~/.cache/fedllama", "  cache_dir: ${oc.env:FEDLLAMA_PLANTED}", 1
    )
    assert "${oc.env:FEDLLAMA_PLANTED}" in text  # the coordinator planted it

    with pytest.raises(ConfigError, match=r"model.cache_dir: holds an interpolation") as err:
        config_lib.from_yaml(text)
    assert secret not in str(err.value)

    grid: InProcessGrid = RepoGrid(1)
    content = RecordDict({CONFIG: ConfigRecord({CONFIG_YAML: text, ROUND: 1})})
    msg = Message(content, dst_node_id=100, message_type="train")
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert reply.has_error() and "holds an interpolation" in reply.error.reason
    assert secret not in reply.error.reason


def test_a_serialised_config_round_trips() -> None:
    cfg = config_lib.load(None, ["dp.enabled=true", "dp.noise_multiplier=1.5", "lora.r=4"])

    assert config_lib.from_yaml(config_lib.to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "- model\n- lora\n",
            "is a YAML list; expected a mapping of sections (model:, adapter:, lora:",
        ),
        ("", "is empty; give at least one section"),
        ("# only a comment\n", "is empty"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_is_refused(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=re.escape(reason)):
        config_lib.load(path)
