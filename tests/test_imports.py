"""The import graph: no module imports itself back at run time, and the checkpoint's
writer and the task seam stay out of each other's way (the cycle config -> tasks ->
tasks/base -> checkpoint/writer -> config, broken by tasks/base's RowWriter and
engine.checkpoint.durability)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

import engine
from engine.testing.mock_server import MockServer

ROOT = Path(engine.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, *, type_checking: bool, nested: bool) -> set[str]:
    """The engine modules ``module`` imports: those under ``if TYPE_CHECKING:`` with
    ``type_checking``, those inside functions and classes with ``nested``."""
    found: set[str] = set()

    def visit(body: Sequence[ast.AST]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                if type_checking:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                if all(s in MODULES for s in subs):  # `from engine import progress`
                    found.update(subs)
                else:
                    found.add(node.module)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if nested:
                    visit(node.body)
            else:  # if, with, try and its handlers: what runs when the module is imported
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, None) or [])

    visit(ast.parse(MODULES[module].read_text()).body)
    resolved = {_resolve(name) for name in found if name.startswith("engine")}
    return {m for m in resolved if m is not None and m != module}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_no_module_imports_itself_back_when_imported() -> None:
    graph = {m: imports(m, type_checking=False, nested=False) for m in MODULES}
    assert cycle(graph) is None


def test_the_writer_and_the_task_seam_do_not_import_each_other() -> None:
    # Type-only imports count too: they are the cycle a reader (and mypy) sees.
    writer = imports("engine.checkpoint.writer", type_checking=True, nested=True)
    assert not {m for m in writer if m.startswith(("engine.config", "engine.tasks"))}
    base = imports("engine.tasks.base", type_checking=True, nested=True)
    assert not {m for m in base if m.startswith("engine.checkpoint")}


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "module",
    ["engine.config", "engine.tasks", "engine.tasks.base", "engine.checkpoint.writer"],
)
def test_each_module_of_the_old_cycle_imports_alone(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT.parent,
    )
    assert done.returncode == 0, done.stderr


# Features a plain run does not use; each is imported only where its feature is on.
_NOT_AT_START = (
    "engine._reporting",
    "engine.report",
    "engine.estimate",
    "engine.output.export",
    "engine.executors.shards",
    "engine.executors.sharded",
    "engine.executors.processes",
    "engine.executors.ray_run",
    "engine.batch.endpoint",
    "engine.batch.api",
    "engine.batch.control",
    "engine.batch.lines",
    "engine.batch.log",
    "engine.metrics",
    "engine.local",
    "jinja2",
    "jsonschema",
    "pyarrow",
    "rich",
    "prometheus_client",
    "ray",
    "matplotlib",
)


def _modules_at_first_request(folder: Path, base_url: str, *, json: bool = False) -> list[str]:
    from tests.conftest import conversations, write_config, write_jsonl

    write_jsonl(folder / "in.jsonl", conversations(4))
    config = write_config(folder, base_url)
    if json:
        config = _as_json(config)
    done = subprocess.run(
        # At its first POST (engine.testing.first_request): a plain run (one online
        # model, no cache, no batch, no metrics port, quiet).
        [sys.executable, "-m", "engine.testing.first_request", str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr
    modules: list[str] = result["modules"]
    assert modules, "no request was sent"
    return modules


def _as_json(config: Path) -> Path:
    """The same config as a program would write it: JSON, in a file of its own."""
    import yaml

    path = config.with_suffix(".json")
    path.write_bytes(orjson.dumps(yaml.safe_load(config.read_text())))
    return path


def _under(modules: list[str], names: Sequence[str]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names)]


def test_a_plain_run_imports_no_feature_it_does_not_use_before_its_first_request(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    modules = _modules_at_first_request(tmp_path, threaded_mock.base_url)
    assert "engine.tasks.distill.task" in modules  # what it does use, as a check of the check
    assert _under(modules, _NOT_AT_START) == []


def test_a_plain_run_imports_no_cache_or_batch_module_before_its_first_request(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    modules = _modules_at_first_request(tmp_path, threaded_mock.base_url)
    # Their settings are part of every config; the store (sqlite3) and the Batch API
    # client only of a run that uses them.
    batch = ("engine.batch.endpoint", "engine.batch.log", "engine.batch.api")
    assert _under(modules, ("engine.cache.store", *batch, "sqlite3")) == []


def test_a_json_config_is_read_without_the_yaml_parser(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    modules = _modules_at_first_request(tmp_path, threaded_mock.base_url, json=True)
    assert "engine.config" in modules
    assert _under(modules, ("yaml",)) == []


def test_a_run_from_a_json_config_never_imports_the_yaml_parser(
    tmp_path: Path, threaded_mock: MockServer
) -> None:
    # To its exit, the report included: the report shows the config as JSON, as it was
    # written, so the run's end does not import the parser its start was spared.
    from tests.conftest import conversations, write_config, write_jsonl

    write_jsonl(tmp_path / "in.jsonl", conversations(3))
    config = _as_json(write_config(tmp_path, threaded_mock.base_url))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "engine", "run", str(config), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    imported = [line.rpartition("|")[2].strip() for line in done.stderr.splitlines()]
    assert "engine.report" in imported  # the report was written, by this process
    assert _under(imported, ("yaml",)) == []
    page = (tmp_path / "ck" / "report.html").read_text()
    assert "&quot;task&quot;: &quot;distill&quot;" in page  # the config, as JSON
