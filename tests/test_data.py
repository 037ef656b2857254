"""Local files, the embedded demo federation, partitioners and loss masking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedllama import data
from fedllama.config import DataConfig
from fedllama.data import IGNORE_INDEX, DataError
from fedllama.model import load_tokenizer, resolve_base_dir


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path):
    from fedllama.config import ModelConfig

    return load_tokenizer(resolve_base_dir(ModelConfig(name="tiny", cache_dir=str(cache_dir))))


@pytest.fixture(scope="module")
def demo(cache_dir: Path) -> dict[str, list[data.Example]]:
    return data.demo_federation(cache_dir, limit=200)


def test_jsonl_pairs_chat_and_csv_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Q1", "response": "A1"})
        + "\n\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A2"},
                ]
            }
        )
        + "\n"
    )
    (tmp_path / "b.csv").write_text("instruction,response\nQ3,A3\n")

    examples = data.read_local(tmp_path)

    assert [ex["messages"][-1]["content"] for ex in examples] == ["A1", "A2", "A3"]
    assert [ex["institution"] for ex in examples] == ["a", "a", "b"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            '{"instruction": "Q"}\n',
            "a.jsonl:1: expected string fields 'instruction' and 'response'",
        ),
        ('{"instruction": "Q", "response": "A"}\n{oops\n', "a.jsonl:2: invalid JSON"),
        ('{"messages": [{"role": "user", "content": "Q"}]}\n', "no assistant message"),
        ('{"messages": [{"role": "bot", "content": "Q"}]}\n', "role in system/user/assistant"),
        ("", "holds no examples"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(reason)):
        data.read_local(path)


def test_missing_path_and_unsupported_type_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        data.read_local(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        data.read_local(tmp_path / "x.txt")


def test_demo_federation_is_real_domain_text(demo: dict[str, list[data.Example]]) -> None:
    assert sorted(demo) == sorted(data.DEMO_INSTITUTIONS)
    assert all(len(v) == 200 for v in demo.values())
    icd = " ".join(m["content"] for ex in demo["hospital-a"] for m in ex["messages"])
    assert re.search(r"\b[A-Z]\d{2}\.\w+", icd), "ICD-10-CM codes like E11.9"
    hpo = " ".join(ex["messages"][0]["content"] for ex in demo["hospital-b"])
    assert "HP:" in hpo
    spdx = " ".join(m["content"] for ex in demo["law-firm"] for m in ex["messages"])
    assert "MIT" in spdx or "GPL" in spdx or "Apache" in spdx


def test_global_eval_is_disjoint_from_every_client(cache_dir: Path) -> None:
    cfg = DataConfig(max_examples_per_institution=100, global_eval_size=20)
    fed = data.build_federation(cfg, 4, cache_dir)

    key = lambda ex: json.dumps(ex["messages"])  # noqa: E731
    held = {key(ex) for ex in fed.global_eval}
    assert len(fed.global_eval) == 20
    assert {ex["institution"] for ex in fed.global_eval} == set(data.DEMO_INSTITUTIONS)
    for split in fed.clients:
        assert not held & {key(ex) for ex in split.train + split.eval}
        assert not {key(ex) for ex in split.train} & {key(ex) for ex in split.eval}


def test_institution_partition_gives_one_institution_per_client(cache_dir: Path) -> None:
    fed = data.build_federation(DataConfig(max_examples_per_institution=50), 4, cache_dir)
    owners = [{ex["institution"] for ex in c.train + c.eval} for c in fed.clients]
    assert all(len(o) == 1 for o in owners)
    assert set().union(*owners) == set(data.DEMO_INSTITUTIONS)


def test_iid_partition_mixes_institutions_evenly(cache_dir: Path) -> None:
    cfg = DataConfig(partition="iid", max_examples_per_institution=100, global_eval_size=8)
    fed = data.build_federation(cfg, 8, cache_dir)
    sizes = [len(c.train) + len(c.eval) for c in fed.clients]
    assert max(sizes) - min(sizes) <= 1
    assert all(len({ex["institution"] for ex in c.train}) >= 2 for c in fed.clients)


def test_dirichlet_partition_is_skewed_and_deterministic(cache_dir: Path) -> None:
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.1, max_examples_per_institution=100)
    a = data.build_federation(cfg, 6, cache_dir)
    b = data.build_federation(cfg, 6, cache_dir)
    assert [len(c.train) for c in a.clients] == [len(c.train) for c in b.clients]
    shares = []
    for c in a.clients:
        counts = [sum(ex["institution"] == i for ex in c.train) for i in data.DEMO_INSTITUTIONS]
        shares.append(max(counts) / sum(counts))
    assert sum(shares) / len(shares) > 0.5, "alpha=0.1 concentrates each client on few institutions"


def test_institution_partition_with_wrong_client_count_is_explained(cache_dir: Path) -> None:
    with pytest.raises(DataError, match="4 institutions but simulation.num_clients=3"):
        data.build_federation(DataConfig(max_examples_per_institution=20), 3, cache_dir)


def test_loss_is_masked_on_prompt_and_kept_on_answers(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What does ICD-10-CM code E11.9 describe?"},
        {"role": "assistant", "content": "Type 2 diabetes mellitus without complications"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome"},
    ]
    ids, labels = data.encode_example(tokenizer, messages, 256, "Be brief.")

    trained = tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )
    assert "Type 2 diabetes mellitus without complications" in trained
    assert "You are welcome" in trained
    assert "E11.9" not in trained and "Thanks" not in trained and "Be brief" not in trained
    first = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert all(label == IGNORE_INDEX for label in labels[:first])


def test_truncation_drops_examples_whose_answer_is_cut_off(tokenizer) -> None:
    long_prompt = {
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "ok"},
        ],
        "institution": "x",
    }
    short = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        "institution": "x",
    }
    cfg = DataConfig(max_seq_len=32)

    encoded = data.encode_all(tokenizer, [long_prompt, short], cfg)

    assert len(encoded) == 1 and len(encoded[0].input_ids) <= 32
    with pytest.raises(DataError, match="max_seq_len=32"):
        data.encode_all(tokenizer, [long_prompt], cfg)


def test_collate_pads_right_and_masks_padding() -> None:
    batch = data.collate([data.Encoded([1, 2, 3], [-100, 2, 3]), data.Encoded([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_awkward_files_end_in_one_line_naming_the_file(tmp_path: Path) -> None:
    wide = tmp_path / "wide.csv"
    wide.write_text("instruction,response\nQ,A\nQ,A,surplus,more\n")
    with pytest.raises(DataError, match=re.escape("wide.csv:3: 2 more field(s) than the header")):
        data.read_local(wide)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=re.escape("deep.jsonl:1: JSON nested too deeply")):
        data.read_local(deep)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    jsonl, csv_file = tmp_path / "a.jsonl", tmp_path / "b.csv"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "Q", "response": "A"}\n')
    csv_file.write_bytes(b"\xef\xbb\xbfinstruction,response\nQ,A\n")

    assert len(data.read_local(tmp_path)) == 2
