"""Ray tests run only where the network holds nothing but loopback.

Ray finds the machine's address by connecting to public DNS addresses, and test
traffic must never leave the machine: a test that starts Ray runs inside a network
namespace with only ``lo`` (``make test`` runs the ``ray`` tests that way). Outside
one, such a test is skipped with a reason saying how to run it, except where ``CI``
is set: there it fails, so CI can never skip the Ray tests without anyone noticing.

Import the fixtures' functions (``*_fixture``) into a test module to use the
fixtures (pytest finds fixtures among a module's names): ``loopback_namespace``
checks the namespace, ``local_cluster`` is one local cluster (via
``engine.executors.cluster``) shared by a module's tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from engine.executors.cluster import Cluster, ray_cluster

RUN_HINT = "unshare --net sh -c 'ip link set lo up && exec .venv/bin/pytest -m ray'"


def not_loopback_only() -> str | None:
    """Why this process's network namespace is not loopback-only; None when it is.

    ``socket.if_nameindex()`` lists the namespace's interfaces (``/sys/class/net``
    does not: it still shows the host's).
    """
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        return f"the network has interfaces besides loopback: {', '.join(names)}"
    try:
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()[:2], timeout=2.0),
        ):
            pass
    except OSError as exc:
        return f"loopback does not work ({exc}); bring it up with `ip link set lo up`"
    return None


def require_loopback_only() -> None:
    """Skip the test (fail it where ``CI`` is set) unless only loopback is here."""
    why = not_loopback_only()
    if why is None:
        return
    message = (
        f"starts Ray, which probes public addresses, so it runs only in a loopback-only "
        f"network namespace ({why}); `make test` runs it in one, or run: {RUN_HINT}"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(name="loopback_namespace")
def loopback_namespace_fixture() -> None:
    """Requires a loopback-only network (see the module's text)."""
    require_loopback_only()


@pytest.fixture(scope="module", name="local_cluster")
def local_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A local Ray cluster (one CPU) for a module's tests, this process its driver.

    HOME is a fresh folder meanwhile, so nothing of Ray's can land in the real one.
    """
    require_loopback_only()
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        patch.delenv("RAY_ADDRESS", raising=False)
        work_dir = tmp_path_factory.mktemp("ray-run")
        with ray_cluster(None, num_cpus=1, work_dir=work_dir) as cluster:
            yield cluster


# A network namespace where Ray finds an address other than loopback, as on a real
# machine, while nothing can leave: the default route leads into a tun device that
# no process reads, so whatever is sent there is dropped.
FAKE_EXTERNAL_NET = (
    "ip link set lo up && ip tuntap add dev tun0 mode tun && "
    "ip addr add 10.255.0.1/24 dev tun0 && ip link set tun0 up && "
    "ip route add default dev tun0"
)
FAKE_EXTERNAL_ADDRESS = "10.255.0.1"
IN_FAKE_EXTERNAL_NET = ("unshare", "--net", "sh", "-c", f'{FAKE_EXTERNAL_NET} && exec "$@"', "sh")


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP listener and bound, unconnected UDP socket
    of ``pids``. Only sockets of this process's network namespace are seen."""
    found: list[tuple[int, str, int]] = []
    for pid in pids:
        try:
            sockets = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for conn in sockets:
            bound_udp = conn.status == psutil.CONN_NONE and not conn.raddr
            if conn.status == psutil.CONN_LISTEN or bound_udp:
                found.append((pid, conn.laddr.ip, conn.laddr.port))
    return found


def probed_address() -> str | None:
    """The address Ray finds for this machine: where a UDP socket "connected" to a
    public DNS server comes from (no packet is sent). None: no route out."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("8.8.8.8", 53))
            address: str = probe.getsockname()[0]
            return address
    except OSError:
        return None


# A driver in a process of its own. Ray is imported first, as a program that uses it
# elsewhere would. It starts a cluster, runs one task (so a worker exists), prints
# what the cluster is made of, and leaves the block when its stdin gives it a line
# (or never, when the test kills it).
_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import ray

    from engine.executors._watchdog import descendants
    from engine.executors.cluster import ray_cluster
    from tests.ray_support import listening, probed_address

    with ray_cluster(None, num_cpus=1, work_dir=Path(sys.argv[1])) as cluster:
        ray.get(ray.remote(lambda: 0).remote())
        pids = [cluster.keeper_pid, *descendants(cluster.keeper_pid)]
        print(json.dumps({
            "pids": pids,
            "ray_dir": str(cluster.ray_dir),
            "address": cluster.address,
            "node": ray.nodes()[0]["NodeManagerAddress"],
            "listening": listening([os.getpid(), *pids]),
            "probed": probed_address(),
        }), flush=True)
        sys.stdin.readline()
    print("stopped", flush=True)
    """
)


@dataclass
class Driver:
    """A driver process with its cluster up, and what it said of the cluster."""

    process: subprocess.Popen[str]
    pids: list[int]
    ray_dir: Path
    address: str
    node: str
    listening: list[tuple[int, str, int]]
    probed: str | None

    def leave(self) -> None:
        """Let the driver leave its block; returns once the block has ended."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line.strip() == "stopped", f"the driver said {line!r}"


def start_driver(work_dir: Path, home: Path, *, wrap: tuple[str, ...] = ()) -> Driver:
    """Run ``_DRIVER`` (behind ``wrap``, a command that runs the rest of its command
    line) and wait until its cluster is up."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = str(Path(__file__).resolve().parents[1])
    process = subprocess.Popen(
        [*wrap, sys.executable, "-c", _DRIVER, str(work_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**env, "HOME": str(home), "PYTHONPATH": root},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        pytest.fail(f"the driver exited with code {process.returncode} before its cluster was up")
    info = json.loads(line)
    return Driver(
        process=process,
        pids=info["pids"],
        ray_dir=Path(info["ray_dir"]),
        address=info["address"],
        node=info["node"],
        listening=[tuple(s) for s in info["listening"]],
        probed=info["probed"],
    )


def cluster_processes(pids: list[int], ray_dir: Path, *, driver: int | None = None) -> list[str]:
    """The processes still alive of a cluster: those of ``pids`` that are not zombies,
    and any process whose command line or open files name the cluster's Ray folder
    (workers started after ``pids`` was taken keep their logs there). Not this
    process, nor ``driver``: Ray's driver keeps its own log files in the session
    folder open after ``ray.shutdown()``."""
    found: list[str] = []
    for process in psutil.process_iter():
        if process.pid in (os.getpid(), driver):
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            named = process.pid in pids
            if not named:
                paths = [f.path for f in process.open_files()]
                named = any(str(ray_dir) in text for text in [*process.cmdline(), *paths])
            if named:
                found.append(f"{process.pid} {process.name()}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
