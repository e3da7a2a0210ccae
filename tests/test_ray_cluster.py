"""The Ray cluster a sharded run uses: up on loopback only, and gone after, however
the driver ends. The tests that start Ray need a loopback-only network namespace
(tests/ray_support.py says why and how); all run in `make test`'s ray step."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import engine
from engine.errors import TurnstileError
from engine.executors import _watchdog
from engine.executors._watchdog import descendants
from engine.executors.cluster import (
    INSTALL_RAY,
    MAX_TEMP_DIR_BYTES,
    Cluster,
    RayClusterError,
    head_command,
    head_env,
    ray_cluster,
    ray_temp_dir,
)
from tests.ray_support import (  # noqa: F401  (pytest finds fixtures among our names)
    FAKE_EXTERNAL_ADDRESS,
    IN_FAKE_EXTERNAL_NET,
    cluster_processes,
    listening,
    local_cluster_fixture,
    loopback_namespace_fixture,
    start_driver,
)

pytestmark = pytest.mark.ray

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
GONE_WITHIN_S = 30.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A work_dir short enough for Ray's sockets: the cluster's files stay inside it."""
    folder = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def wait_until_gone(pids: list[int], ray_dir: Path) -> list[str]:
    """Poll until no process of the cluster is left, for up to GONE_WITHIN_S; what is."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := cluster_processes(pids, ray_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# --- decisions, no cluster -------------------------------------------------------


def test_head_listens_on_loopback_with_nothing_fixed(tmp_path: Path) -> None:
    command = head_command("python", tmp_path, 2)
    assert "--node-ip-address=127.0.0.1" in command
    assert "--include-dashboard=false" in command
    assert "--disable-usage-stats" in command
    assert "--block" in command
    assert "--port=0" in command and "--dashboard-agent-listen-port=0" in command
    assert f"--temp-dir={tmp_path}" in command and "--num-cpus=2" in command
    assert not any(arg.startswith("--num-cpus") for arg in head_command("python", tmp_path, None))


def test_head_env_turns_off_statistics_and_pins_auth(tmp_path: Path) -> None:
    env = head_env(
        {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_TOKEN": "theirs", "PATH": "/bin"},
        tmp_path / "token",
    )
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    assert env["PATH"] == "/bin"


def test_a_deep_work_dir_gets_a_short_temporary_folder(tmp_path: Path) -> None:
    ray_dir, temporary = ray_temp_dir(tmp_path / ("x" * 80) / "ray")
    try:
        assert temporary is not None and temporary.is_dir() and ray_dir.parent == temporary
        assert len(os.fsencode(ray_dir)) <= MAX_TEMP_DIR_BYTES
    finally:
        if temporary is not None:
            shutil.rmtree(temporary)
    assert ray_temp_dir(Path("/tmp/w/ray")) == (Path("/tmp/w/ray/tmp"), None)


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayClusterError) as caught:
        with ray_cluster(None, work_dir=tmp_path):
            pass
    assert INSTALL_RAY in str(caught.value)
    assert isinstance(caught.value, TurnstileError)


def _keeper(script: str, folder: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The watchdog over ``sh -c script``; the pids the script wrote to its files."""
    keeper = subprocess.Popen(
        [sys.executable, "-I", _watchdog.__file__, "sh", "-c", script],
        stdin=subprocess.PIPE,
        cwd=folder,
    )
    deadline = time.monotonic() + 30
    while len(files := sorted(folder.glob("pid.*"))) < 2 or not all(
        f.read_text().strip() for f in files
    ):
        assert time.monotonic() < deadline, "the script did not start its sleeps"
        time.sleep(0.05)
    return keeper, [int(f.read_text()) for f in files]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# One sleep whose parent exits at once (as a daemon's does), one child of the script.
_DAEMONIZES = "sh -c 'sleep 300 & echo $! > pid.a'; sleep 300 & echo $! > pid.b; "


def test_the_watchdog_stops_what_left_its_parent_too(tmp_path: Path) -> None:
    keeper, pids = _keeper(_DAEMONIZES + "wait", tmp_path)
    assert all(_alive(pid) for pid in pids)
    assert keeper.stdin is not None
    keeper.stdin.close()  # what the driver's death does, too
    assert keeper.wait(timeout=30) == 0
    assert [pid for pid in pids if _alive(pid)] == []


def test_the_watchdog_stops_the_rest_when_the_head_exits(tmp_path: Path) -> None:
    keeper, pids = _keeper(_DAEMONIZES + "exit 3", tmp_path)
    assert keeper.wait(timeout=30) == 3
    assert [pid for pid in pids if _alive(pid)] == []


# --- one cluster shared by the tests that only look at it ---------------------------


def test_a_task_runs_and_imports_engine(local_cluster: Cluster) -> None:
    import ray

    @ray.remote
    def where() -> tuple[str, int]:
        import engine as remote_engine

        return remote_engine.__file__, os.getpid()

    path, pid = ray.get(where.remote(), timeout=60)
    assert path == engine.__file__
    assert pid != os.getpid()
    assert local_cluster.started and local_cluster.address.startswith("127.0.0.1:")


def test_every_listening_socket_is_on_loopback(local_cluster: Cluster) -> None:
    import ray

    ray.get(ray.remote(lambda: 0).remote(), timeout=60)  # a worker listens too
    assert local_cluster.keeper_pid is not None
    pids = [os.getpid(), local_cluster.keeper_pid, *descendants(local_cluster.keeper_pid)]
    sockets = listening(pids)
    gcs_port = int(local_cluster.address.rsplit(":", 1)[1])
    assert gcs_port in {port for _, _, port in sockets}
    assert [s for s in sockets if s[1] not in LOOPBACK] == []


def test_nothing_lands_in_home(local_cluster: Cluster) -> None:
    assert list(Path(os.environ["HOME"]).iterdir()) == []


# --- clusters of their own ------------------------------------------------------


@pytest.mark.usefixtures("loopback_namespace")
def test_leaving_the_block_stops_every_process(short_dir: Path, tmp_path: Path) -> None:
    driver = start_driver(short_dir, tmp_path)
    assert len(driver.pids) >= 5  # watchdog, ray start, gcs_server, raylet, a worker...
    assert driver.ray_dir == short_dir / "ray" / "tmp"
    driver.leave()
    # The block's end waits until they are gone: no waiting here.
    assert cluster_processes(driver.pids, driver.ray_dir, driver=driver.process.pid) == []
    assert driver.process.wait(timeout=30) == 0


@pytest.mark.usefixtures("loopback_namespace")
def test_only_loopback_where_the_machine_has_another_address(tmp_path: Path) -> None:
    # Where loopback is all there is, Ray falls back to it anyway: this driver runs
    # where Ray finds another address (tests/ray_support.py: nothing can leave).
    driver = start_driver(tmp_path / "w", tmp_path, wrap=IN_FAKE_EXTERNAL_NET)
    try:
        assert driver.probed == FAKE_EXTERNAL_ADDRESS  # what Ray would otherwise take
        assert driver.node == "127.0.0.1"
        assert driver.address.startswith("127.0.0.1:")
        gcs_port = int(driver.address.rsplit(":", 1)[1])
        assert gcs_port in {port for _, _, port in driver.listening}
        assert {pid for pid, _, _ in driver.listening} > {driver.process.pid}  # its own, too
        assert [s for s in driver.listening if s[1] not in LOOPBACK] == []
    finally:
        driver.leave()
    assert driver.process.wait(timeout=30) == 0


@pytest.mark.usefixtures("loopback_namespace")
def test_a_sigkilled_driver_takes_its_cluster_with_it(tmp_path: Path) -> None:
    deep = tmp_path / "a-work-dir-too-deep-for-ray-sockets"
    driver = start_driver(deep, tmp_path)
    temporary = driver.ray_dir.parent  # too deep for Ray's sockets: a short folder
    assert temporary.name.startswith("turnstile-ray-")
    driver.process.send_signal(signal.SIGKILL)
    driver.process.wait(timeout=30)
    assert wait_until_gone(driver.pids, driver.ray_dir) == []
    deadline = time.monotonic() + GONE_WITHIN_S  # the watchdog removes it once all are gone
    while temporary.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not temporary.exists()
    assert (deep / "ray" / "head.log").is_file()


@pytest.mark.usefixtures("loopback_namespace")
def test_a_head_that_does_not_come_up_is_an_error_and_is_stopped(short_dir: Path) -> None:
    with pytest.raises(RayClusterError) as caught:
        with ray_cluster(None, num_cpus=1, work_dir=short_dir, startup_timeout_s=0.5):
            pass
    message = str(caught.value)
    assert "was not up after 0.5s" in message
    assert str(short_dir / "ray" / "head.log") in message
    assert cluster_processes([], short_dir / "ray" / "tmp") == []


@pytest.mark.usefixtures("loopback_namespace")
def test_joining_auto_with_no_cluster_running_names_the_fix(tmp_path: Path) -> None:
    # Ray's "auto" takes any gcs_server it sees among the machine's processes, so the
    # attempt runs in a PID namespace of its own, where none can be seen (and with
    # no address file from an earlier `ray start`).
    script = textwrap.dedent(
        """
        from pathlib import Path
        from engine.executors.cluster import RayClusterError, ray_cluster
        try:
            with ray_cluster("auto", work_dir=Path(".")):
                print("joined")
        except RayClusterError as exc:
            print(exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), RAY_TMPDIR=str(tmp_path))
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "cannot join the Ray cluster at 'auto'" in result.stdout
    assert "Could not find any running Ray instance" in result.stdout
    assert "executor.address to null" in result.stdout
