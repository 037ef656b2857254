"""The layout's rules, checked on the source (docs/architecture.md): the layering between
fedllama's subpackages, the library never importing the apps, tests and benches never importing
test modules, and small functions. Flower's app API boundary is ruff's TID251 (pyproject.toml).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO

# What each part of fedllama may import from fedllama (besides itself). A part is a subpackage
# or a top-level module; "server.metrics" allows that one module only.
ALLOWED: dict[str, set[str]] = {
    "fedllama": set(),
    "errors": set(),
    "config": {"errors"},
    "runtime": set(),
    "progress": {"server.metrics"},
    "merge": {"config"},
    "data": {"config", "errors"},
    "privacy": {"config", "merge"},
    "deploy": set(),
    "model": {"config", "data", "merge", "errors"},
    "wire": {"merge"},
    "client": {"config", "data", "merge", "model", "privacy", "wire"},
    "server": {"config", "data", "merge", "model", "privacy", "wire", "progress"},
    "experiments": {"config", "server.metrics", "server.checkpoint", "errors"},
    "console": {"progress", "server.metrics", "experiments"},
    "research": {"config", "data", "model", "server.checkpoint", "server.metrics", "experiments"},
    "cli": {
        "config", "data", "model", "deploy", "runtime", "server.checkpoint", "server.metrics",
        "server.tensorboard",
        "experiments", "console", "progress", "errors", "research",
    },
}  # fmt: skip
APPS = ("server", "clients", "strategies")
"""The repository's other packages: only fedllama/cli.py (the composition root) imports them."""
MAX_FUNCTION_LINES = 60


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, function-level ones included; ``from a
    import b`` counts as ``a.b`` when b is a module under ``root``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            folder = root.joinpath(*node.module.split("."))
            for alias in node.names:
                sub = folder / alias.name
                is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                out.append(
                    (node.lineno, f"{node.module}.{alias.name}" if is_module else node.module)
                )
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedllama"


def layer_violations(root: Path) -> list[str]:
    """Every import in ``root/fedllama`` that the layering does not allow."""
    found = []
    for path in sorted((root / "fedllama").rglob("*.py")):
        rel = path.relative_to(root)
        part = _part(".".join(rel.with_suffix("").parts))
        for line, module in _imports(path, root):
            top = module.split(".")[0]
            if top in APPS and rel != Path("fedllama/cli.py"):
                found.append(f"{rel}:{line} imports the app package {module}")
            if top != "fedllama":
                continue
            target = ".".join(module.split(".")[1:]) or "fedllama"
            if _part(module) == part:
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[part]):
                found.append(f"{rel}:{line} ({part}) imports {module}")
    return found


def test_layering_checker_flags_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "fedllama" / "merge").mkdir(parents=True)
    (tmp_path / "fedllama" / "merge" / "bad.py").write_text(
        "from fedllama.server.loop import run_server\nimport strategies\n"
    )

    found = layer_violations(tmp_path)

    assert found == [
        "fedllama/merge/bad.py:1 (merge) imports fedllama.server.loop",
        "fedllama/merge/bad.py:2 imports the app package strategies",
    ]


def test_fedllama_subpackages_import_only_the_layers_below() -> None:
    assert layer_violations(REPO) == []


def test_no_test_module_or_bench_imports_a_test_module() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for folder in ("tests", "bench")
        for path in sorted((REPO / folder).glob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[-1].startswith("test_")
        or (folder == "bench" and module.split(".")[0] == "tests")
    ]
    assert offenders == []


def test_library_functions_are_small() -> None:
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name}() has {n} lines"
        for folder in ("fedllama", "strategies", "server", "clients")
        for path in sorted((REPO / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert long == []


def test_importing_the_apps_loads_no_model_library() -> None:
    """Flower imports the ClientApp and the ServerApp in one process (``flwr run``): a model
    library imported at module level would load before ``stay_offline()`` and race the
    ServerApp thread's own import of it (a half-initialised ``transformers``)."""
    import subprocess
    import sys

    code = (
        "import sys, clients.app, server.app; "
        "print(sorted(m for m in ('transformers', 'peft', 'datasets', 'bitsandbytes') "
        "if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
