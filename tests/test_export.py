"""`fedllama generate`, `chat` and `export` over real round directories of the tiny model,
checked against logits and greedy decodes computed here from peft and transformers directly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import strategies
from fedllama import cli
from fedllama.config import from_yaml
from fedllama.merge import RESIDUAL
from fedllama.model import serve, train
from fedllama.server import checkpoint
from fedllama.server.evaluator import Evaluator, server_view
from tests.harness import BIN, REPO, InProcessGrid, metrics_rows, tiny_config
from tests.harness import run as run_rounds

SYSTEM = "Answer in one word."
IDS = torch.tensor([[1, 20, 300, 4000, 17, 5, 900, 2]])


def _round(cache_dir: Path, out: Path, *overrides: str) -> Path:
    """One round of 2 clients; a large lr so that the adapter visibly changes the base."""
    settings = ("server.rounds=1", "simulation.num_clients=2", "train.lr=0.05", *overrides)
    run_rounds(InProcessGrid(2), tiny_config(cache_dir, out, *settings))
    return out / "round-001"


@pytest.fixture(scope="module")
def fedavg_round(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _round(
        cache_dir, tmp_path_factory.mktemp("fedavg") / "run", f"data.system_prompt={SYSTEM}"
    )


@pytest.fixture(scope="module", params=[(), ("lora.use_rslora=true",)], ids=["lora", "rslora"])
def flora_round(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    out = tmp_path_factory.mktemp("flora") / "run"
    return _round(cache_dir, out, "strategy.name=flora", *request.param)


def _base_dir(round_dir: Path) -> str:
    config = json.loads((round_dir / "adapter_config.json").read_text())
    return str(config["base_model_name_or_path"])


def _adapted(round_dir: Path) -> Any:
    """The round's model as peft loads it, independently of fedllama."""
    base = AutoModelForCausalLM.from_pretrained(_base_dir(round_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(round_dir)).eval()


@torch.no_grad()
def _logits(model: Any) -> torch.Tensor:
    return model(IDS).logits.float()


@torch.no_grad()
def _greedy(model: Any, tok: Any, messages: list[dict[str, str]], n: int) -> str:
    """Greedy decoding by hand: argmax of the last position, n tokens or up to EOS."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    start = ids.shape[1]
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if int(nxt) == tok.eos_token_id:
            break
    return str(tok.decode(ids[0, start:], skip_special_tokens=True)).strip()


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_prints_the_adapted_models_greedy_answer_deterministically(
    fedavg_round: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _adapted(fedavg_round)
    tok = AutoTokenizer.from_pretrained(_base_dir(fedavg_round))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    expected = _greedy(model, tok, messages, 8)
    with model.disable_adapter():
        assert _greedy(model, tok, messages, 8) != expected, "the adapter must change the answer"

    args = ("generate", str(fedavg_round), "--prompt", "hello", "--max-new-tokens", "8")
    first = _cli(capsys, *args, "--device", "cpu")
    second = _cli(capsys, *args)

    assert first[0] == 0 and first[1] == f"{expected}\n" and expected
    assert second[:2] == first[:2]


def test_generate_puts_the_runs_system_prompt_in_the_template(
    fedavg_round: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = AutoTokenizer.from_pretrained(_base_dir(fedavg_round))
    prompts: list[str] = []
    real = serve.prompt_ids

    def spy(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
        ids = real(tokenizer, messages)
        prompts.append(tok.decode(ids[0]))
        return ids

    monkeypatch.setattr(serve, "prompt_ids", spy)

    code, _, err = _cli(
        capsys, "generate", str(fedavg_round), "--prompt", "hi", "--max-new-tokens", "1"
    )

    assert code == 0, err
    assert serve.RUN_CONFIG == checkpoint.CONFIG
    assert len(prompts) == 1 and SYSTEM in prompts[0] and "hi" in prompts[0]


def test_chat_answers_each_piped_line_with_the_conversation_so_far(fedavg_round: Path) -> None:
    model = _adapted(fedavg_round)
    tok = AutoTokenizer.from_pretrained(_base_dir(fedavg_round))
    system = {"role": "system", "content": SYSTEM}
    one = _greedy(model, tok, [system, _user("hello")], 6)
    history = [system, _user("hello"), {"role": "assistant", "content": one}]
    two = _greedy(model, tok, [*history, _user("what is ICD-10?")], 6)

    proc = subprocess.run(
        [str(BIN / "fedllama"), "chat", str(fedavg_round), "--max-new-tokens", "6"],
        input="hello\n\nwhat is ICD-10?\n/exit\nnot read\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{one}\n{two}\n"
    assert proc.stderr == "", "no library output (bars, kernel notes, warnings) without -v"


def test_exported_adapter_loads_with_peft_and_gives_the_rounds_logits(
    fedavg_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"

    code, _, err = _cli(capsys, "export", str(fedavg_round), str(out))

    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert torch.equal(_logits(_adapted(out)), _logits(_adapted(fedavg_round)))


def test_merged_export_loads_alone_and_matches_the_adapter_on_its_base(
    fedavg_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    adapted = _adapted(fedavg_round)
    expected = _logits(adapted)
    with adapted.disable_adapter():
        base = _logits(adapted)

    code, _, err = _cli(capsys, "export", str(fedavg_round), str(out), "--merged")

    assert code == 0, err
    got = _logits(AutoModelForCausalLM.from_pretrained(out))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (base - expected).abs().max() > 1e-2, "the adapter must change the logits"
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_merged_export_in_bf16_writes_bf16_weights_close_to_fp32(
    fedavg_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged-bf16"

    code, _, err = _cli(
        capsys, "export", str(fedavg_round), str(out), "--merged", "--dtype", "bf16"
    )

    assert code == 0, err
    weights = load_file(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(model), _logits(_adapted(fedavg_round)), atol=0.1, rtol=0.05)


def test_merged_flora_round_includes_the_residual_and_equals_the_servers_model(
    flora_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = flora_round.parent
    cfg = from_yaml((run_dir / checkpoint.CONFIG).read_text())
    global_state, _ = checkpoint.load_global(run_dir, 1)
    assert any(k.startswith(RESIDUAL) and v.any() for k, v in global_state.items())
    evaluator = Evaluator(cfg)
    view, residual = server_view(cfg, strategies.build(cfg), global_state)
    evaluator(view, residual)  # installs the global model exactly as the server scores it
    out = tmp_path / "merged"

    code, _, err = _cli(capsys, "export", str(flora_round), str(out), "--merged")

    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged), _logits(evaluator.model), atol=1e-5, rtol=1e-5)
    loss = train.evaluate(merged, evaluator.examples, 8, int(evaluator.tokenizer.pad_token_id))
    assert loss == pytest.approx(metrics_rows(run_dir)[1]["eval_loss"], rel=1e-5)


def _without_base(round_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run" / "round-001"
    shutil.copytree(round_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing dir", "is not a round directory (no such directory)"),
        ("run dir", "is not a round directory: adapter_config.json is missing"),
        ("no base", "is not a local model directory (no config.json there)"),
        ("no base, merged", "is not a local model directory (no config.json there)"),
        ("out not empty", "is not empty; pass --force to replace it"),
        ("out holds the round", "export to another directory"),
    ],
)
def test_bad_inputs_give_one_line_errors(
    case: str,
    message: str,
    fedavg_round: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    no_base = str(_without_base(fedavg_round, tmp_path)) if case.startswith("no base") else ""
    argv = {
        "missing dir": ["generate", str(tmp_path / "nope"), "--prompt", "hi"],
        "run dir": ["chat", str(fedavg_round.parent)],
        "no base": ["generate", no_base, "--prompt", "hi"],
        "no base, merged": ["export", no_base, str(tmp_path / "out"), "--merged"],
        "out not empty": ["export", str(fedavg_round), str(full)],
        "out holds the round": ["export", str(fedavg_round), str(fedavg_round.parent), "--force"],
    }[case]

    code, out, err = _cli(capsys, *argv)

    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("fedllama: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert (full / "keep.txt").read_text() == "mine"
    assert (fedavg_round / "adapter_model.safetensors").is_file()


def test_force_replaces_a_non_empty_output(
    fedavg_round: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")

    code, _, err = _cli(capsys, "export", str(fedavg_round), str(out), "--force")

    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
