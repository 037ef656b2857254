"""Examples from a user's local files: JSONL (instruction/response or messages) and CSV.

An example is a chat: ``{"messages": [{"role": ..., "content": ...}, ...], "institution": str}``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


Example = dict[str, Any]


class DataError(ValueError):
    """A data file or split cannot be read or built."""


def _pair_to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = row.get("instruction")
    response = row.get("response", row.get("output"))
    if not isinstance(instruction, str) or not isinstance(response, str):
        raise DataError(
            f"{where}: expected string fields 'instruction' and 'response' (or 'messages'), "
            f"got keys {sorted(row)}"
        )
    extra = row.get("input")
    prompt = (
        f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
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


def _row_to_example(row: Any, where: str, institution: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], where)
    else:
        messages = _pair_to_messages(row, where)
    return {"messages": messages, "institution": str(row.get("institution", institution))}


def _json_row(line: str, path: Path, n: int) -> Any:
    """One JSONL line, or a DataError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{n}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{n}: JSON nested too deeply to be an example") from None


def read_file(path: Path) -> list[Example]:
    """Read one .jsonl or .csv file; the institution defaults to the file's stem."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file")
    examples: list[Example] = []
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as fh:  # a byte-order mark is allowed
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    examples.append(
                        _row_to_example(_json_row(line, path, n), f"{path}:{n}", path.stem)
                    )
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh)
                for n, row in enumerate(reader, 2):
                    if None in row:  # csv puts the fields beyond the header under None
                        raise DataError(
                            f"{path}:{n}: {len(row[None])} more field(s) than the header's "
                            f"{len(reader.fieldnames or [])} columns {reader.fieldnames}"
                        )
                    examples.append(_row_to_example(dict(row), f"{path}:{n}", path.stem))
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from err
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def read_local(path: str | Path) -> list[Example]:
    """Read a .jsonl/.csv file or every such file in a directory (sorted by name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".csv"))
        if not files:
            raise DataError(f"data directory {p} has no .jsonl or .csv files")
        return [ex for f in files for ex in read_file(f)]
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    return read_file(p)
