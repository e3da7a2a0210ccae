"""Running one system under test as a subprocess and measuring it.

Every run is a fresh child process started against the mock server (a process of
its own). Measured:

- wall time from process start to exit, start-up and shutdown included;
- CPU seconds of the client alone (``os.wait4`` gives the child's own rusage, plus
  that of any children it reaped, e.g. Distilabel's step processes);
- peak RSS: the process's ``VmHWM`` (its own high-water mark, read until it exits) and
  the whole process tree's RSS sampled every 0.1 s (for Distilabel's many processes);
- from the server: replies served, and the window from the first request's arrival
  to the last reply, which is the steady-state rate with start-up left out;
- the CPU other processes on the machine used meanwhile, so a noisy run shows.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import psutil

from bench.workloads import Workload

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
TURNSTILE = "turnstile"
BARE = "bare"
DISTILABEL = "distilabel"
_SUMMARY = re.compile(r"turns: (\d+) written in ([\d.]+)s \(([\d.]+)/s\)")
_TOKENS = re.compile(r"tokens: (\d+) prompt, (\d+) completion")
_TICKS = os.sysconf("SC_CLK_TCK")


class Server(Protocol):
    """The server a run talks to (the mock, or llama.cpp), seen from the benchmark."""

    url: str

    def reset(self, *, window_only: bool = False) -> None: ...

    def cpu_s(self) -> float: ...

    def stats(self) -> dict[str, Any]: ...


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(slots=True)
class Result:
    """One measured run."""

    system: str
    label: str
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    tree_rss_mb: float
    turns: int  # turns written by the client, per its own report
    served: int  # replies the server sent during the run
    window_s: float | None  # server: first arrival to last reply
    to_first_request_s: float | None  # process start to the first request's arrival
    server_cpu_s: float
    other_cpu_s: float  # CPU the rest of the machine used meanwhile
    rc: int
    rows_out: int = 0
    repeated: int = 0  # requests the server saw more than once (cumulative)
    window_cpu_s: float | None = None  # client CPU within the server window (sampled)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def rate_wall(self) -> float:
        return self.turns / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def rate_steady(self) -> float:
        if not self.window_s or self.window_s <= 0:
            return self.rate_wall
        return self.served / self.window_s

    @property
    def cpu_ms_per_1k(self) -> float:
        """Client CPU milliseconds per 1,000 turns."""
        return 1e6 * self.cpu_s / self.turns if self.turns else float("nan")

    @property
    def cpu_us_per_request(self) -> float:
        """Client CPU microseconds per request served in the steady window: start-up
        (imports, replay) and shutdown left out, as in the steady rate."""
        if self.window_cpu_s is None or not self.served:
            return float("nan")
        return 1e6 * self.window_cpu_s / self.served

    @property
    def server_busy(self) -> float:
        """Fraction of one core the mock server used over the serving window."""
        span = self.window_s or self.wall_s
        return self.server_cpu_s / span if span > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """A Result back from ``as_dict`` (results.json), its derived figures recomputed."""
        return cls(**{name: data[name] for name in cls.__slots__ if name in data})

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out.update(
            rate_wall=self.rate_wall,
            rate_steady=self.rate_steady,
            cpu_ms_per_1k=self.cpu_ms_per_1k,
            cpu_us_per_request=self.cpu_us_per_request,
        )
        return out


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


class _Memory(threading.Thread):
    """Watches a process's peak RSS while it runs.

    ``rusage.ru_maxrss`` cannot be used: Linux carries the parent's RSS at fork
    into the child's figure, so every child of a 80 MB benchmark process would
    report at least 80 MB. ``VmHWM`` in /proc/PID/status is the peak of the
    process's own memory since exec, exact up to the last read (taken every
    0.05 s until the process is gone). The summed RSS of the process and all its
    descendants is sampled too, for peers that run many processes, and so is the
    process's CPU time (``cpu``: (Unix time, CPU seconds) pairs), from which
    ``cpu_between`` tells the CPU it used within a window such as the server's.
    """

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every_s = every_s
        self.hwm_kb = 0
        self.tree_peak = 0
        self.cpu: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def cpu_between(self, start: float, end: float) -> float | None:
        """CPU seconds used from ``start`` to ``end`` (Unix times), interpolated between
        samples; None when the samples do not cover the window."""
        points = self.cpu
        if len(points) < 2 or start < points[0][0] or end <= start:
            return None
        return _interpolate(points, end) - _interpolate(points, start)

    def _hwm(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                self.cpu.append((time.time(), process_cpu_s(self.pid)))
            except (OSError, IndexError, ValueError):
                pass  # gone: the last sample stands for its end
            hwm = self._hwm()
            if hwm is not None:
                self.hwm_kb = max(self.hwm_kb, hwm)
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.tree_peak = max(self.tree_peak, total)
            self.stop.wait(self.every_s)


def _interpolate(points: list[tuple[float, float]], at: float) -> float:
    """The CPU seconds at Unix time ``at`` on the sampled line (flat after the last)."""
    if at >= points[-1][0]:
        return points[-1][1]
    lo, hi = 0, len(points) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if points[mid][0] <= at:
            lo = mid
        else:
            hi = mid
    (t0, c0), (t1, c1) = points[lo], points[hi]
    return c0 + (c1 - c0) * (at - t0) / (t1 - t0) if t1 > t0 else c0


@dataclass(slots=True)
class Exit:
    rc: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float  # peak RSS of the process itself (VmHWM)
    tree_rss_mb: float  # peak of the summed RSS of it and its descendants (sampled)
    started_at: float  # Unix time
    cpu_samples: _Memory | None = None


def spawn_measured(
    cmd: list[str],
    *,
    cwd: Path,
    stdout: Path,
    stderr: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    watch: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Exit:
    """Run ``cmd`` to its end and return its exit status and resource use.

    ``watch`` runs in a thread while the process lives (it may kill it).
    """
    with stdout.open("wb") as out, stderr.open("wb") as err:
        started_at = time.time()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=err, env={**os.environ, **(env or {})}
        )
    sampler = _Memory(proc.pid)
    sampler.start()
    watcher = None
    if watch is not None:
        watcher = threading.Thread(target=watch, args=(proc,), daemon=True)
        watcher.start()
    timer = threading.Timer(timeout_s, _kill_tree, args=(proc.pid,))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        _kill_tree(proc.pid)  # the benchmark itself is stopping: leave nothing behind
        raise
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    if watcher is not None:
        watcher.join(timeout=5)
    return Exit(
        rc=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mb=sampler.hwm_kb / 1024,
        tree_rss_mb=sampler.tree_peak / 2**20,
        started_at=started_at,
        cpu_samples=sampler,
    )


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        for child in root.children(recursive=True):
            child.kill()
        root.kill()
    except psutil.Error:
        pass


def measure(
    system: str,
    label: str,
    cmd: list[str],
    folder: Path,
    mock: Server,
    *,
    timeout_s: float,
    parse: Callable[[str, str], tuple[int, dict[str, Any]]],
    rows_out: Path | None = None,
    reset: bool = True,
    env: dict[str, str] | None = None,
    watch: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Result:
    """Run one system against ``mock`` and put every measurement in a Result.

    ``reset`` False keeps the server's counters (a resumed run) and restarts only
    its serving window.
    """
    mock.reset(window_only=not reset)
    server_cpu0 = mock.cpu_s()
    busy0 = machine_busy_s()
    done = spawn_measured(
        cmd,
        cwd=folder,
        stdout=folder / "stdout.txt",
        stderr=folder / "stderr.txt",
        timeout_s=timeout_s,
        env=env,
        watch=watch,
    )
    busy = machine_busy_s() - busy0
    server_cpu = mock.cpu_s() - server_cpu0
    stats = mock.stats()
    out_text = (folder / "stdout.txt").read_text(errors="replace")
    err_text = (folder / "stderr.txt").read_text(errors="replace")
    turns, extra = parse(out_text, err_text)
    first, last = stats.get("first_arrival"), stats.get("last_done")
    window = last - first if first is not None and last is not None else None
    if done.rc != 0:
        extra["stderr_tail"] = err_text[-2000:]
    return Result(
        system=system,
        label=label,
        wall_s=done.wall_s,
        cpu_s=done.cpu_s,
        maxrss_mb=done.maxrss_mb,
        tree_rss_mb=done.tree_rss_mb,
        turns=turns,
        served=int(stats.get("completed", 0)),
        window_s=window,
        to_first_request_s=first - done.started_at if first is not None else None,
        server_cpu_s=server_cpu,
        other_cpu_s=max(0.0, busy - done.cpu_s - server_cpu),
        rc=done.rc,
        rows_out=count_lines(rows_out) if rows_out is not None else 0,
        repeated=int(stats.get("repeated_requests", 0)),
        window_cpu_s=(
            done.cpu_samples.cpu_between(first, last)
            if done.cpu_samples is not None and first is not None and last is not None
            else None
        ),
        extra=extra,
    )


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            lines += chunk.count(b"\n")
    return lines


# -- the systems -------------------------------------------------------------


class RunFolder:
    """A fresh folder per run under bench/_work/runs, removed afterwards unless kept."""

    _seq = 0

    def __init__(self, name: str, keep: bool = False) -> None:
        RunFolder._seq += 1
        # The pid too: two benchmarks at once (on a shared machine) never share a folder.
        self.path = WORK / "runs" / f"{RunFolder._seq:04d}-{os.getpid()}-{name}"
        self.keep = keep

    def __enter__(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def turnstile_config(
    folder: Path,
    url: str,
    workload: Workload,
    *,
    cap: int,
    journal: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    model: str | None = "mock",
    timeout_s: float = 120.0,
    model_extra: dict[str, Any] | None = None,
    uvloop: bool | None = None,
) -> Path:
    """A distillation config (JSON is YAML) for ``workload`` against ``url``.

    ``uvloop`` None leaves the config's default (uvloop where it is installed)."""
    config: dict[str, Any] = {
        "task": "distill",
        "input": str(workload.path),
        "output": "out/distilled.jsonl",
        "checkpoint_dir": "ck",
        "models": {
            "teacher": {
                "base_url": url,
                **({"model": model} if model is not None else {}),
                "max_concurrency": cap,
                "timeout_s": timeout_s,
                "params": params if params is not None else {"temperature": 0.0},
                **(model_extra or {}),
            }
        },
        "distill": {"model": "teacher"},
        "progress_interval_s": 3600,
    }
    if journal is not None:
        config["journal"] = journal
    if uvloop is not None:
        config["uvloop"] = uvloop
    path = folder / "run.yaml"
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return path


def parse_turnstile(_out: str, err: str) -> tuple[int, dict[str, Any]]:
    """Turns written and in-process seconds from ``turnstile run``'s summary."""
    extra: dict[str, Any] = {}
    tokens = _TOKENS.search(err)
    if tokens is not None:
        extra["completion_tokens"] = int(tokens.group(2))
    match = _SUMMARY.search(err)
    if match is None:
        return 0, extra
    extra["inproc_s"] = float(match.group(2))
    return int(match.group(1)), extra


def parse_json_line(out: str, _err: str) -> tuple[int, dict[str, Any]]:
    """Turns and counters from the last JSON line a bench script printed."""
    for line in reversed(out.strip().splitlines()):
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            extra = {k: v for k, v in data.items() if k not in ("turns", "elapsed_s")}
            extra["inproc_s"] = data.get("elapsed_s")
            return int(data.get("turns", 0)), extra
    return 0, {}


def engine_trees(parser: argparse.ArgumentParser, trees: list[Path]) -> list[Path]:
    """``--engine`` trees (each the parent of another ``engine/`` package), resolved;
    one without it is the command line's error (exit 2)."""
    for tree in trees:
        if not (tree / "engine" / "__main__.py").exists():
            parser.error(f"--engine: {tree} holds no engine/ package (engine/__main__.py)")
    return [tree.resolve() for tree in trees]


def turnstile_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "engine", "run", str(config), "--quiet"]


def run_turnstile(
    server: Server,
    workload: Workload,
    *,
    cap: int,
    label: str = "",
    journal: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    timeout_s: float = 900,
    model: str = "mock",
    system: str = TURNSTILE,
    save_output: Path | None = None,
    uvloop: bool | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """One fresh ``turnstile run`` of ``workload`` in a folder of its own (``env``: added
    to the environment, a PYTHONPATH naming another engine tree, say)."""
    with RunFolder(system) as folder:
        config = turnstile_config(
            folder,
            server.url,
            workload,
            cap=cap,
            journal=journal,
            params=params,
            model=model,
            uvloop=uvloop,
        )
        output = folder / "out" / "distilled.jsonl"
        result = measure(
            system,
            label,
            turnstile_cmd(config),
            folder,
            server,
            timeout_s=timeout_s,
            parse=parse_turnstile,
            rows_out=output,
            env=env,
        )
        result.extra["expected_rows"] = workload.rows
        if save_output is not None and output.exists():
            shutil.copyfile(output, save_output)
        return result


def bare_cmd(
    url: str,
    workload: Workload,
    output: Path,
    cap: int,
    params: dict[str, Any] | None = None,
    model: str = "mock",
    uvloop: bool = False,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.baseline",
        "--url",
        url,
        "--input",
        str(workload.path),
        "--output",
        str(output),
        "--cap",
        str(cap),
        "--model",
        model,
        "--params",
        orjson.dumps(params if params is not None else {"temperature": 0.0}).decode(),
        *(["--uvloop"] if uvloop else []),
    ]


def run_bare(
    server: Server,
    workload: Workload,
    *,
    cap: int,
    label: str = "",
    params: dict[str, Any] | None = None,
    model: str = "mock",
    timeout_s: float = 900,
    save_output: Path | None = None,
    uvloop: bool = False,
    system: str = BARE,
) -> Result:
    """One run of the bare aiohttp loop (bench.baseline) over ``workload``."""
    with RunFolder(system) as folder:
        output = folder / "out.jsonl"
        result = measure(
            system,
            label,
            bare_cmd(server.url, workload, output, cap, params, model, uvloop),
            folder,
            server,
            timeout_s=timeout_s,
            parse=parse_json_line,
            rows_out=output,
            env={"PYTHONPATH": str(ROOT)},
        )
        result.extra["expected_rows"] = workload.rows
        if save_output is not None and output.exists():
            shutil.copyfile(output, save_output)
        return result


def same_rows(a: Path, b: Path) -> bool:
    """Whether two output files hold the same (id, messages) rows, in any order."""

    def rows(path: Path) -> dict[Any, Any]:
        with path.open("rb") as f:
            return {
                r["id"]: r["messages"] for r in (orjson.loads(line) for line in f if line.strip())
            }

    return a.exists() and b.exists() and rows(a) == rows(b)


def kill_when(path: Path, lines: int, sig: int = signal.SIGKILL) -> Callable[[Any], None]:
    """A ``watch`` that sends ``sig`` once ``path`` holds ``lines`` lines."""

    def watch(proc: subprocess.Popen[bytes]) -> None:
        seen = 0
        offset = 0
        while proc.returncode is None:
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            offset += len(data)
            seen += data.count(b"\n")
            if seen >= lines:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.02)

    return watch
