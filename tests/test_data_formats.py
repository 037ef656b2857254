"""Parquet files and ``datasets``' ``save_to_disk`` directories read like JSONL; ``data.columns``
maps the user's column names on every format; bad sources name the file and what was expected."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedllama import config as config_lib
from fedllama import data
from fedllama.client.settings import NodeSettings, load_split
from fedllama.config import ConfigError, DataConfig
from fedllama.data import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Q3"},
    {"role": "assistant", "content": "A3"},
]
# Pairs with and without input, an explicit institution, and a chat: in a table, the columns a
# row lacks are null.
ROWS: list[dict[str, Any]] = [
    {"instruction": "Q1", "response": "A1"},
    {"instruction": "Q2", "input": "ctx2", "response": "A2", "institution": "north"},
    {"messages": CHAT},
]
EXPECTED = [
    {
        "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        "institution": "rows",
    },
    {
        "messages": [
            {"role": "user", "content": "Q2\n\nctx2"},
            {"role": "assistant", "content": "A2"},
        ],
        "institution": "north",
    },
    {"messages": CHAT, "institution": "rows"},
]
# The same pairs under the user's own column names, and the mapping back to ours.
MAPPING = {
    "instruction": "prompt",
    "input": "context",
    "response": "completion",
    "institution": "site",
}
RENAMED = [
    {"prompt": "Q1", "context": "", "completion": "A1", "site": "south"},
    {"prompt": "Q2", "context": "ctx2", "completion": "A2", "site": "north"},
]
RENAMED_EXPECTED = [
    {
        "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        "institution": "south",
    },
    {
        "messages": [
            {"role": "user", "content": "Q2\n\nctx2"},
            {"role": "assistant", "content": "A2"},
        ],
        "institution": "north",
    },
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".csv")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def as_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (null where it has none): pyarrow and datasets take the
    columns from the first row alone."""
    names = dict.fromkeys(k for row in rows for k in row)
    return [{k: row.get(k) for k in names} for row in rows]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(as_table(rows)), path)
    return path


def write_saved(path: Path, rows: list[dict[str, Any]]) -> Path:
    datasets.Dataset.from_list(as_table(rows)).save_to_disk(str(path))
    return path


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {
    "jsonl": write_jsonl,
    "csv": write_csv,
    "parquet": write_parquet,
    "saved": write_saved,
}


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_parquet_and_saved_dataset_read_like_the_same_jsonl(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "j").mkdir()
    jsonl = write_jsonl(tmp_path / "j" / "rows", ROWS)
    other = WRITERS[fmt](tmp_path / "rows", ROWS)

    from_other = data.read_local(other)

    assert from_other == data.read_local(jsonl)
    assert from_other == EXPECTED


def test_saved_dataset_dict_reads_its_train_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(as_table(ROWS[:2])),
            "test": datasets.Dataset.from_list([{"instruction": "T", "response": "T"}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "rows"))

    with caplog.at_level(logging.INFO, logger="fedllama.data.files"):
        examples = data.read_local(tmp_path / "rows")

    assert examples == EXPECTED[:2]
    assert "reading split 'train', not test" in caplog.text


def test_saved_dataset_dict_without_train_names_its_splits(tmp_path: Path) -> None:
    splits = datasets.DatasetDict(
        {
            "dev": datasets.Dataset.from_list(ROWS[:1]),
            "test": datasets.Dataset.from_list(ROWS[:1]),
        }
    )
    splits.save_to_disk(str(tmp_path / "rows"))

    with pytest.raises(DataError) as err:
        data.read_local(tmp_path / "rows")

    assert str(err.value) == (
        f"{tmp_path / 'rows'}: saved DatasetDict has no 'train' split to read; splits: dev, test"
    )


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_column_mapping_reads_each_format(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / "renamed", RENAMED)

    examples = data.read_local(path, MAPPING)

    assert examples == RENAMED_EXPECTED


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
def test_messages_column_is_mapped(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / "chats", [{"conversation": CHAT, "hospital": 7}])

    examples = data.read_local(path, {"messages": "conversation", "institution": "hospital"})

    assert examples == [{"messages": CHAT, "institution": "7"}]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_missing_mapped_column_names_file_and_column(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / "renamed", RENAMED)
    mapping = {**MAPPING, "instruction": "question"}

    with pytest.raises(DataError) as err:
        data.read_local(path, mapping)

    assert str(err.value) == (
        f"{path}: no column 'question' (data.columns.instruction); "
        "columns: prompt, context, completion, site"
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved"])
def test_table_without_instruction_or_messages_names_both(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / "renamed", RENAMED)

    with pytest.raises(DataError) as err:
        data.read_local(path)

    assert str(err.value) == (
        f"{path}: no column 'instruction', nor 'messages' for chats; "
        "columns: prompt, context, completion, site"
    )


def test_null_response_names_the_row_and_column(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "rows",
        [{"prompt": "Q1", "answer": "A1"}, {"prompt": "Q2", "answer": None}],
    )

    with pytest.raises(DataError) as err:
        data.read_local(path, {"instruction": "prompt", "response": "answer"})

    assert str(err.value) == (
        f"{path}: row 1: expected string fields 'prompt' (data.columns.instruction) and "
        "'answer' (data.columns.response) (or 'messages'), 'answer' (data.columns.response) "
        "is null"
    )


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")

    with pytest.raises(DataError) as err:
        data.read_local(path)

    message = str(err.value)
    assert message.startswith(f"{path}: not a readable Parquet file (")
    assert "\n" not in message


def test_truncated_parquet_names_the_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rows", ROWS)
    path.write_bytes(path.read_bytes()[:-20])

    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable Parquet file")):
        data.read_local(path)


def test_saved_dataset_without_its_arrow_file_names_the_directory(tmp_path: Path) -> None:
    path = write_saved(tmp_path / "rows", ROWS)
    for arrow in path.glob("*.arrow"):
        arrow.unlink()

    with pytest.raises(DataError) as err:
        data.read_local(path)

    message = str(err.value)
    assert message.startswith(f"{path}: not a readable dataset saved by datasets' save_to_disk (")
    assert "\n" not in message


def test_saved_dataset_with_bad_state_names_the_directory(tmp_path: Path) -> None:
    path = write_saved(tmp_path / "rows", ROWS)
    (path / "state.json").write_text("{not json")

    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable dataset saved by")):
        data.read_local(path)


def test_directory_of_mixed_sources_reads_each_and_logs_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_jsonl(tmp_path / "a", ROWS[:1])
    write_parquet(tmp_path / "b", ROWS[1:2])
    write_saved(tmp_path / "c", ROWS[2:])
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "plain-dir").mkdir()

    with caplog.at_level(logging.WARNING, logger="fedllama.data.files"):
        examples = data.read_local(tmp_path)

    assert [ex["messages"] for ex in examples] == [ex["messages"] for ex in EXPECTED]
    assert [ex["institution"] for ex in examples] == ["a", "north", "c"]
    assert "skipping notes.txt, plain-dir" in caplog.text


def test_pool_and_node_split_apply_data_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "renamed", RENAMED * 5)
    cfg = config_lib.load(
        None,
        [f"data.source={path}"] + [f"data.columns.{k}={v}" for k, v in MAPPING.items()],
    )

    pool = data.load_pool(cfg.data, tmp_path)
    split = load_split(cfg, NodeSettings(data_path=str(path)))

    assert sorted(pool) == ["north", "south"]
    assert pool["south"] == [RENAMED_EXPECTED[0]] * 5
    assert (
        sorted(ex["institution"] for ex in split.train + split.eval)
        == ["north"] * 5 + ["south"] * 5
    )


def test_data_columns_default_to_none_mapped() -> None:
    assert config_lib.load(None, []).data.columns == {}


def test_unknown_column_field_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, ["data.columns.prompt=question"])

    assert str(err.value) == (
        "data.columns.prompt: unknown field; expected one of instruction, input, response, "
        "messages, institution"
    )


def test_two_fields_on_one_column_are_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.columns.response: column 'text' is")):
        DataConfig(columns={"instruction": "text", "response": "text"})
