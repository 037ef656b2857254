"""Examples from a user's local data: JSONL, CSV, Parquet and ``datasets``' ``save_to_disk``.

An example is a chat: ``{"messages": [{"role": ..., "content": ...}, ...], "institution": str}``.
Each row holds either ``messages`` or an ``instruction``/``response`` pair (optional ``input``),
and optionally its ``institution``; ``data.columns`` maps these fields to the user's own column
names, the same way for every format. Everything is read from disk: nothing is fetched.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllama.config import DATA_FIELDS
from fedllama.errors import UserError

log = logging.getLogger(__name__)


Example = dict[str, Any]

FILE_TYPES = (".jsonl", ".csv", ".parquet")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
"""Files that ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write into a directory."""


ROW_HINT = (
    'give one example per row: {"instruction": ..., "response": ...} or {"messages": [{"role": '
    '"user", ...}, {"role": "assistant", ...}]}, or map your columns with data.columns '
    "(docs/config.md, data)"
)
"""What a data file must hold, said when it holds nothing usable."""


class DataError(UserError, ValueError):
    """A data file or split cannot be read or built."""


@dataclass(frozen=True)
class Columns:
    """Where each of our fields (``DATA_FIELDS``) is found in a user's rows."""

    mapping: Mapping[str, str] = field(default_factory=dict)
    """Our field -> the user's column; a field not named here is read from its own name."""

    def name(self, key: str) -> str:
        """The column that holds field ``key``."""
        return self.mapping.get(key, key)

    def label(self, key: str) -> str:
        """The column, and the config key that chose it, for messages."""
        column = self.name(key)
        return f"{column!r} (data.columns.{key})" if key in self.mapping else repr(column)

    def response(self, row: Mapping[str, Any]) -> Any:
        """The response; unmapped, it may also sit in an ``output`` column."""
        if "response" in self.mapping:
            return row.get(self.mapping["response"])
        return row.get("response", row.get("output"))


@dataclass
class _Table:
    """The raw rows of one source, each with where it came from, and the columns seen."""

    rows: list[tuple[str, Any]]
    columns: list[str]
    fixed: bool
    """Whether every row has the same columns (CSV, Parquet, datasets), not just some (JSONL)."""


def _pair_to_messages(row: dict[str, Any], where: str, cols: Columns) -> list[dict[str, str]]:
    instruction = row.get(cols.name("instruction"))
    response = cols.response(row)
    if not isinstance(instruction, str) or not isinstance(response, str):
        bad = "instruction" if not isinstance(instruction, str) else "response"
        value = row.get(cols.name(bad))
        got = (
            f"got keys {sorted(row)}"
            if cols.name(bad) not in row
            else f"{cols.label(bad)} is {'null' if value is None else type(value).__name__}"
        )
        raise DataError(
            f"{where}: expected string fields {cols.label('instruction')} and "
            f"{cols.label('response')} (or {cols.label('messages')}), {got}"
        )
    extra = row.get(cols.name("input"))
    prompt = (
        f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _check_messages(messages: Any, where: str, label: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {label} must be a non-empty list")
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: each message needs role in system/user/assistant and string content"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return messages


def _row_to_example(row: Any, where: str, institution: str, cols: Columns) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    chat = row.get(cols.name("messages"))
    if chat is not None:
        messages = _check_messages(chat, where, cols.label("messages"))
    else:
        messages = _pair_to_messages(row, where, cols)
    own = row.get(cols.name("institution"))
    return {"messages": messages, "institution": institution if own is None else str(own)}


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _json_row(line: str, path: Path, n: int) -> Any:
    """One JSONL line, or a DataError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{n}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{n}: JSON nested too deeply to be an example") from None


def _read_jsonl(path: Path) -> _Table:
    rows: list[tuple[str, Any]] = []
    seen: dict[str, None] = {}  # keys in order of first appearance
    with path.open(encoding="utf-8-sig") as fh:  # a byte-order mark is allowed
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = _json_row(line, path, n)
            if isinstance(row, dict):
                seen.update(dict.fromkeys(row))
            rows.append((f"{path}:{n}", row))
    return _Table(rows, list(seen), fixed=False)


def _read_csv(path: Path) -> _Table:
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        for n, row in enumerate(reader, 2):
            if None in row:  # csv puts the fields beyond the header under None
                raise DataError(
                    f"{path}:{n}: {len(row[None])} more field(s) than the header's "
                    f"{len(reader.fieldnames or [])} columns {reader.fieldnames}"
                )
            rows.append((f"{path}:{n}", dict(row)))
        return _Table(rows, list(reader.fieldnames or []), fixed=True)


def _read_parquet(path: Path) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None
    rows = [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]
    return _Table(rows, list(table.column_names), fixed=True)


def _read_saved(path: Path) -> _Table:
    """A directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s ``train``)."""
    import datasets
    import pyarrow as pa

    try:
        loaded = datasets.load_from_disk(str(path))
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: not a readable dataset saved by datasets' save_to_disk ({_one_line(err)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in splits:
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split to read; splits: "
                f"{', '.join(splits)}"
            )
        if len(splits) > 1:
            others = ", ".join(s for s in splits if s != "train")
            log.info("%s: reading split 'train', not %s", path, others)
        loaded = loaded["train"]
    rows = [(f"{path}: row {i}", row) for i, row in enumerate(loaded.to_list())]
    return _Table(rows, list(loaded.column_names), fixed=True)


def _check_columns(path: Path, table: _Table, cols: Columns) -> None:
    """Every mapped column exists; a fixed schema also holds a chat or an instruction/response."""
    names = ", ".join(table.columns)
    needed = {key: cols.name(key) for key in cols.mapping}
    if table.fixed and cols.name("messages") not in table.columns:
        needed["instruction"] = cols.name("instruction")
        if "response" in cols.mapping or "output" not in table.columns:
            needed["response"] = cols.name("response")
    for key, column in needed.items():
        if column not in table.columns:
            chat = "" if key in cols.mapping else f", nor {cols.label('messages')} for chats"
            raise DataError(
                f"{path}: no column {cols.label(key)}{chat}; columns: {names}",
                hint=f"map yours with data.columns.{key}=YOUR_COLUMN (docs/config.md, data)",
            )


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_MARKERS)


def _read_table(path: Path) -> _Table:
    if is_saved_dataset(path):
        return _read_saved(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .csv, .parquet or a "
            "directory saved by datasets' save_to_disk"
        )
    try:
        return readers[path.suffix](path)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from err


def read_file(path: Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Read one .jsonl, .csv or .parquet file, or one directory saved by ``save_to_disk``.

    The institution defaults to the file's stem (the directory's name). ``columns`` maps our
    fields (``DATA_FIELDS``) to the user's column names, as ``data.columns`` does.

    Raises:
        DataError: the source cannot be read, lacks a column, or a row is not an example; the
            message names the file (and the line or row).
    """
    cols = Columns(dict(columns or {}))
    unknown = sorted(set(cols.mapping) - set(DATA_FIELDS))
    if unknown:
        raise DataError(f"unknown data.columns {unknown}; expected some of {DATA_FIELDS}")
    table = _read_table(path)
    if not table.rows:
        raise DataError(
            f"data file {path} holds no examples (no rows besides blank lines or a header)",
            hint=ROW_HINT,
        )
    _check_columns(path, table, cols)
    institution = path.stem if path.is_file() else path.name
    return [_row_to_example(row, where, institution, cols) for where, row in table.rows]


def read_local(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Read a data file, a saved dataset, or every one of those in a directory (sorted by name).

    A directory that is not itself a saved dataset is read as a folder of sources: its .jsonl,
    .csv and .parquet files and its saved-dataset subdirectories; anything else in it is skipped
    with a warning. ``columns`` applies to each source (see :func:`read_file`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if not p.is_dir() or is_saved_dataset(p):
        return read_file(p, columns)
    entries = sorted(p.iterdir())
    sources = [
        f for f in entries if (f.is_file() and f.suffix in FILE_TYPES) or is_saved_dataset(f)
    ]
    skipped = [f.name for f in entries if f not in sources and not f.name.startswith(".")]
    if skipped:
        log.warning(
            "data directory %s: skipping %s (not .jsonl, .csv, .parquet or a saved dataset)",
            p,
            ", ".join(skipped),
        )
    if not sources:
        raise DataError(
            f"data directory {p} has no .jsonl, .csv or .parquet files or saved datasets"
        )
    return [ex for f in sources for ex in read_file(f, columns)]
