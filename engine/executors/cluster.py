"""The Ray cluster a sharded run uses: a local head for this run only, or one to join.

``ray_cluster(None, ...)`` starts a Ray head on this machine that exists only for the
run and only on loopback:

- ``ray start --head --block --node-ip-address=127.0.0.1 --port=0``, with the
  dashboard, usage statistics and fixed agent ports off, in Ray's single-machine
  mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, for the head and, inside the block,
  for this process): gcs_server, the raylet, the object manager, the agents, the
  workers and this driver all listen on 127.0.0.1 only, even where the machine has
  other addresses (without that mode Ray swaps 127.0.0.1 for the address it finds
  by probing public DNS servers, and listens on every interface);
- token authentication on, with a fresh token in a file of the run's own
  (``RAY_AUTH_TOKEN_PATH``): other users of the machine cannot submit work to it,
  and nothing is written to ``~/.ray`` (``ray start`` alone writes no token, and
  runs unauthenticated unless one exists; only ``ray.init()`` without an address
  writes ``~/.ray/auth_token``);
- the token and the head's own log (``head.log``) in ``work_dir/ray``, Ray's
  session files (its logs and sockets) in ``work_dir/ray/tmp``, or in a short
  folder in ``/tmp``, removed afterwards, when that path would make Ray's Unix
  sockets longer than the kernel allows;
- started by a small watchdog (``_watchdog.py``) that stops every process of the
  cluster, and only those, when the block ends, when the driver dies (even by
  SIGKILL), or when the head dies; the block's exit waits until they are all gone.

``ray_cluster("auto" | "ray://host:10001" | "host:port", ...)`` joins a cluster that
someone else runs and never stops it (``"local"`` means None here: Ray's own
meaning, a cluster inside ``ray.init()``, has none of the above). Either way this
process is Ray's driver inside the block and ``ray.shutdown()`` runs when it ends.

Everything here blocks (start-up takes seconds): from an event loop, run it in a
thread.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import TurnstileError
from engine.executors import _watchdog
from engine.local.server import log_tail

INSTALL_RAY = "pip install 'turnstile[ray]'"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# Ray puts Unix sockets at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/
# plasma_store: 64 bytes after the temp dir, and the kernel allows 107 in all.
MAX_TEMP_DIR_BYTES = 40
LOG_TAIL_LINES = 20
_POLL_S = 0.1
# Set for the head and, while the block runs, for this process: Ray reads them in
# each process that talks to the cluster.
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
# Ray's single-machine mode (the default on macOS and Windows): "0" makes every Ray
# process take 127.0.0.1 as the node's address. Without it Ray replaces 127.0.0.1
# (even an explicit --node-ip-address=127.0.0.1) with the address it finds by
# probing public DNS servers, and its servers then listen on every interface.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayClusterError(TurnstileError):
    """Ray is not installed, or the cluster cannot be started or joined."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """The cluster a run's driver is connected to.

    ``address`` is what ``ray.init`` connected to: the local head's GCS address
    (``127.0.0.1:<port>``) or the address given. ``started`` says whether this
    run started the cluster (and stops it). For a local head, ``ray_dir`` is Ray's
    temp folder (its sessions and logs), ``log`` the head's own output, and
    ``keeper_pid`` the watchdog under which every process of the cluster runs.
    """

    address: str
    started: bool
    ray_dir: Path | None = None
    log: Path | None = None
    keeper_pid: int | None = None

    @property
    def session_dir(self) -> Path | None:
        """This cluster's session folder (logs, sockets), for a local head."""
        if self.ray_dir is None:
            return None
        return (self.ray_dir / "session_latest").resolve()


def import_ray() -> Any:
    """The ``ray`` module, or RayClusterError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayClusterError(
            f"executor: ray needs Ray, which is not installed ({exc}); "
            f"install it with {INSTALL_RAY}, or set executor.kind: local to run in one process"
        ) from exc
    return ray


@contextmanager
def ray_cluster(
    address: str | None,
    *,
    num_cpus: int | None = None,
    work_dir: Path,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[Cluster]:
    """Connect this process to a Ray cluster as its driver while the block runs.

    ``address=None`` (or ``"local"``): start a local head for this run (see the
    module's text), with
    ``num_cpus`` CPUs (None: Ray counts them), its files under ``work_dir``; when the
    block ends, however it ends, every process of it is stopped and gone before
    this returns. Otherwise join the cluster at ``address`` (``"auto"``, a
    ``ray://`` client address or a GCS ``host:port``) and leave it running.
    Raises RayClusterError when Ray is missing or the cluster cannot be started
    or joined. Blocking.
    """
    ray = import_ray()
    if address is not None and address != "local":
        _connect(ray, address, joining=True)
        try:
            yield Cluster(address=address, started=False)
        finally:
            ray.shutdown()
        return
    with _local_head(num_cpus, work_dir, startup_timeout_s, stop_timeout_s) as (cluster, token):
        with _as_local_driver(ray, _driver_env(token)):
            _connect(ray, cluster.address, joining=False, log=cluster.log)
            try:
                yield cluster
            finally:
                ray.shutdown()


def head_command(python: str, ray_dir: Path, num_cpus: int | None) -> list[str]:
    """``ray start`` for a head on loopback only, in the foreground (``--block``)."""
    return [
        python,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        "--port=0",  # the kernel's pick: never clashes with another cluster here
        "--include-dashboard=false",
        "--disable-usage-stats",
        # Port 0 for what would otherwise take a fixed port (52365 for the agent).
        "--dashboard-agent-listen-port=0",
        "--dashboard-agent-grpc-port=0",
        "--runtime-env-agent-port=0",
        "--metrics-export-port=0",
        f"--temp-dir={ray_dir}",
        *([f"--num-cpus={num_cpus}"] if num_cpus is not None else []),
    ]


def head_env(environ: Mapping[str, str], token_path: Path) -> dict[str, str]:
    """The head's environment: ours, with usage statistics off, Ray's single-node
    mode (everything on 127.0.0.1), token auth from ``token_path``, no address of
    another cluster, and this package importable by the workers even when it runs
    from a source tree rather than installed."""
    env = {k: v for k, v in environ.items() if k not in ("RAY_ADDRESS", *_AUTH_ENV)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env[SINGLE_NODE_ENV] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    root = str(Path(__file__).resolve().parents[2])
    if Path(root).name not in ("site-packages", "dist-packages"):
        paths = env.get("PYTHONPATH", "").split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p and p != root)])
    return env


def ray_temp_dir(files: Path) -> tuple[Path, Path | None]:
    """Ray's temp folder for a head whose own files are in ``files``, and the folder
    to remove after the run (None: none, Ray's files stay for a look after a crash).

    ``files/tmp`` when it is short enough for Ray's Unix sockets, else ``tmp`` in a
    new private folder in the system's temp folder (or /tmp).
    """
    wanted = files / "tmp"
    if len(os.fsencode(wanted)) <= MAX_TEMP_DIR_BYTES:
        return wanted, None
    for parent in (tempfile.gettempdir(), "/tmp"):
        if len(os.fsencode(Path(parent) / "turnstile-ray-xxxxxxxx" / "tmp")) <= MAX_TEMP_DIR_BYTES:
            short = Path(tempfile.mkdtemp(prefix="turnstile-ray-", dir=parent))
            return short / "tmp", short
    raise RayClusterError(  # /tmp always qualifies: this needs a long TMPDIR and no /tmp
        f"no folder is short enough for Ray's sockets ({wanted} is not); "
        f"set TMPDIR to a folder of at most {MAX_TEMP_DIR_BYTES - 27} bytes"
    )


@contextmanager
def _local_head(
    num_cpus: int | None, work_dir: Path, startup_timeout_s: float, stop_timeout_s: float
) -> Iterator[tuple[Cluster, Path]]:
    """The head, up; yields it with its token file. Stopped and gone at the end."""
    files = Path(os.path.abspath(work_dir)) / "ray"
    try:
        files.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise RayClusterError(f"cannot create {files} for the local Ray head: {exc}") from exc
    ray_dir, temporary = ray_temp_dir(files)
    try:
        _forget_old_sessions(ray_dir)
        token = files / "auth_token"
        _write_private(token, secrets.token_hex(32))
        log_path = files / "head.log"
        command = head_command(sys.executable, ray_dir, num_cpus)
        if temporary is not None:  # the watchdog removes it too, should we be killed
            command = ["--remove", str(temporary), *command]
        keeper = _spawn_keeper(command, head_env(os.environ, token), log_path)
        try:
            gcs = _wait_for_head(keeper, ray_dir, log_path, startup_timeout_s)
            cluster = Cluster(
                address=gcs, started=True, ray_dir=ray_dir, log=log_path, keeper_pid=keeper.pid
            )
            yield cluster, token
        finally:
            _stop_keeper(keeper, stop_timeout_s)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _driver_env(token: Path) -> dict[str, str]:
    return {SINGLE_NODE_ENV: "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@contextmanager
def _as_local_driver(ray: Any, settings: Mapping[str, str]) -> Iterator[None]:
    """This process set up as the local head's driver while the block runs; as it
    was, after.

    Ray reads these settings from the environment, and keeps what it read when it
    was imported (``ray_constants`` for single-node mode, a C++ cache for auth):
    both are refreshed here, as ``ray.init()`` itself refreshes the auth cache when
    it turns token auth on for a new local cluster. Ray versions without token auth
    or without the constant simply lack what is refreshed.
    """
    names = (SINGLE_NODE_ENV, *_AUTH_ENV)
    saved = {name: os.environ.get(name) for name in names}
    constants = _ray_constants()
    saved_cluster_mode = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    for name in _AUTH_ENV:
        os.environ.pop(name, None)
    os.environ.update(settings)
    if saved_cluster_mode is not None:
        # Read at each call by services.get_node_ip_address, which ray.init uses to
        # turn "127.0.0.1" into the machine's address (not listened on here).
        constants.ENABLE_RAY_CLUSTER = False
    _reload_auth(ray)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if saved_cluster_mode is not None:
            constants.ENABLE_RAY_CLUSTER = saved_cluster_mode
        _reload_auth(ray)


def _ray_constants() -> Any:
    try:
        return importlib.import_module("ray._private.ray_constants")
    except ImportError:
        return None


def _reload_auth(ray: Any) -> None:
    raylet = getattr(ray, "_raylet", None)
    config = getattr(raylet, "Config", None)
    loader = getattr(raylet, "AuthenticationTokenLoader", None)
    if config is not None:
        config.initialize("")
    if loader is not None:
        loader.instance().reset_cache()


def _connect(ray: Any, address: str, *, joining: bool, log: Path | None = None) -> None:
    try:
        ray.init(address=address)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        with contextlib.suppress(Exception):
            ray.shutdown()
        if joining:
            raise RayClusterError(
                f"executor.address: cannot join the Ray cluster at {address!r}: {exc}; "
                "check that the cluster is running (`ray status` on its head) and the "
                'address ("auto" finds one started on this machine with `ray start`), '
                "or set executor.address to null to start a local cluster for the run"
            ) from exc
        raise RayClusterError(
            f"cannot connect to the local Ray head at {address}: {exc}; its log: {log}"
        ) from exc


def _forget_old_sessions(ray_dir: Path) -> None:
    """Remove the address file a previous head left, and all its sessions but the
    last (the previous run's logs stay, for a look after a crash)."""
    with contextlib.suppress(FileNotFoundError):
        (ray_dir / "ray_current_cluster").unlink()
    if not ray_dir.is_dir():
        return
    sessions = sorted(p for p in ray_dir.glob("session_2*") if p.is_dir())
    for old in sessions[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT


def _spawn_keeper(
    command: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """The watchdog, running ``command``; its stdin is the pipe whose end stops it.

    No PR_SET_PDEATHSIG here: it fires when the forking *thread* exits, and the
    driver may well enter this block from a worker thread. The watchdog notices
    the pipe's end, or its parent changing, instead.
    """
    keeper = [sys.executable, "-I", str(Path(_watchdog.__file__)), *command]
    try:
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} turnstile starts a Ray head\n".encode())
            log.flush()
            return subprocess.Popen(
                keeper,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # A terminal's Ctrl-C reaches only the driver, which decides when to stop.
                process_group=0,
            )
    except OSError as exc:
        raise RayClusterError(f"cannot start the Ray head ({exc}); command: {command}") from exc


def _wait_for_head(
    keeper: subprocess.Popen[bytes], ray_dir: Path, log_path: Path, timeout_s: float
) -> str:
    """The head's GCS address, once ``ray start`` has written it."""
    address_file = ray_dir / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while True:
        code = keeper.poll()
        if code is not None:
            why = f"the local Ray head exited with code {code} while starting"
            raise RayClusterError(_failure(why, log_path))
        with contextlib.suppress(FileNotFoundError):
            address = address_file.read_text().strip()
            if address:
                return address
        if time.monotonic() >= deadline:
            raise RayClusterError(
                _failure(f"the local Ray head was not up after {timeout_s:g}s", log_path)
            )
        time.sleep(_POLL_S)


def _failure(why: str, log_path: Path) -> str:
    lines = [why, f"log: {log_path}"]
    tail = log_tail(log_path, 0, LOG_TAIL_LINES)
    if tail:
        lines.append(f"last {len(tail)} lines of the log:")
        lines.extend(f"  {line}" for line in tail)
    lines.append("fix what the log names, or join a running cluster instead (executor.address)")
    return "\n".join(lines)


def _stop_keeper(keeper: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Close the watchdog's pipe and wait for it: it exits once the cluster is gone.

    Should it hang, it is killed together with whatever it still had under it.
    """
    if keeper.stdin is not None:
        with contextlib.suppress(OSError):
            keeper.stdin.close()
    try:
        keeper.wait(timeout=timeout_s)
        return
    except subprocess.TimeoutExpired:
        pass
    left = _watchdog.descendants(keeper.pid)
    keeper.kill()
    keeper.wait()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
