"""The one-way structure, checked on the source: `models/` is the shared core and needs no torch;
`producer/` and `worker/` never import each other, except that the command line (the one place
that wires both) imports worker code lazily; no two modules import each other, even indirectly.

And the producer really runs without the worker's stack: with torch, transformers and the
`worker` package made unimportable, every producer module imports and `sumfleet submit`
enqueues a batch on the real PostgreSQL and Redis. When SUMFLEET_TEST_LITE_PYTHON names the
interpreter of a virtualenv holding only `pip install sumfleet` (`.ci/run` makes one), the
same submission runs there too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.settings import Settings
from producer.client import Client
from tests.conftest import ROOT, SAMPLE, settings_env

PACKAGES = ("models", "producer", "worker")
WORKER_STACK = ("torch", "transformers", "gguf", "accelerate", "safetensors", "worker")
WIRING = "producer.cli"  # the one module allowed to import both sides (lazily)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or package)
    line: int
    lazy: bool  # inside a function: runs only when that function is called


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
    }


def _imports(name: str, path: Path, known: set[str]) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:  # `from package import module` imports that module
                    full = f"{child.module}.{alias.name}"
                    found.append(Import(name, full if full in known else child.module, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    modules = _modules()
    return [found for name, path in modules.items() for found in _imports(name, path, set(modules))]


def _top(target: str) -> str:
    return target.split(".", 1)[0]


def test_the_shared_core_imports_neither_side_nor_the_worker_stack(imports: list[Import]) -> None:
    bad = [i for i in imports if _top(i.source) == "models" and _top(i.target) in ("producer", *WORKER_STACK)]
    assert not bad, bad


def test_the_worker_never_imports_the_producer(imports: list[Import]) -> None:
    bad = [i for i in imports if _top(i.source) == "worker" and _top(i.target) == "producer"]
    assert not bad, bad


def test_the_producer_imports_the_worker_only_in_the_command_lines_wiring(imports: list[Import]) -> None:
    producer = [i for i in imports if _top(i.source) == "producer" and _top(i.target) in WORKER_STACK]
    assert not [i for i in producer if i.source != WIRING], producer
    wiring = [i for i in producer if i.source == WIRING]
    assert wiring and all(i.lazy for i in wiring), wiring  # `run` and `worker` load it when they run


def test_no_import_cycles(imports: list[Import]) -> None:
    modules = set(_modules())
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for found in imports:
        if found.target in modules and found.target != found.source:
            graph[found.source].add(found.target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            walk(name, [name])
    assert not cycles, cycles


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (producer-only test)")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _without_worker_stack(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    program = BLOCKER.format(blocked=WORKER_STACK) + code
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_every_producer_and_shared_module_imports_without_the_worker_stack() -> None:
    names = sorted(n for n in _modules() if _top(n) in ("models", "producer"))
    done = _without_worker_stack(
        f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
        "try:\n    import torch\nexcept ImportError:\n    print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _check_enqueued(settings: Settings, stdout: str) -> None:
    batch_id = stdout.strip()
    client = Client(settings, migrate=False)
    try:
        status = client.status(batch_id)
        assert (status.state, status.total, status.counts) == ("queued", 8, {"queued": 8})
    finally:
        client.close()
    import redis

    broker = redis.Redis.from_url(settings.broker_url)
    try:
        messages = [json.loads(m) for m in broker.lrange(str(settings.queue), 0, -1)]
    finally:
        broker.close()
    assert len(messages) == 2  # 8 documents in chunks of 4
    assert {m["headers"]["task"] for m in messages} == {"sumfleet.summarize_chunk"}


@pytest.mark.services
def test_submit_enqueues_without_the_worker_stack(fleet_settings: Settings) -> None:
    env = settings_env(fleet_settings)
    done = _without_worker_stack(
        "import sys\nfrom producer.cli import main\n"
        f"code = main(['submit', {str(SAMPLE)!r}, '--model', 'smollm2'])\n"
        "assert 'torch' not in sys.modules and 'worker' not in sys.modules\nsys.exit(code)\n",
        env,
    )
    assert done.returncode == 0, done.stderr
    _check_enqueued(fleet_settings, done.stdout)


@pytest.mark.services
@pytest.mark.skipif(not os.environ.get("SUMFLEET_TEST_LITE_PYTHON"), reason="no producer-only virtualenv given")
def test_submit_from_a_producer_only_install(fleet_settings: Settings, tmp_path: Path) -> None:
    python = os.environ["SUMFLEET_TEST_LITE_PYTHON"]
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    sumfleet = Path(python).with_name("sumfleet")
    done = subprocess.run(
        [str(sumfleet), "submit", str(SAMPLE), "--model", "smollm2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: the installed package, not the source tree
        env=settings_env(fleet_settings),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    _check_enqueued(fleet_settings, done.stdout)
