"""Watching a run: Prometheus metrics scraped while it runs, and its history across a SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from prometheus_client.parser import text_string_to_metric_families

from engine.history import HISTORY_NAME
from engine.testing.mock_server import MockServer
from tests.conftest import (
    kill_after,
    read_jsonl,
    start_turnstile,
    turnstile,
    write_config,
    write_jsonl,
)


def scraped(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def metrics_url(proc: Any) -> str:
    """The URL the run logs when it starts serving metrics (port 0: it picks one)."""
    with anyio.fail_after(60):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "the run ended before it served metrics"
            if "metrics at " in line:
                return line.split("metrics at ", 1)[1].strip()


async def test_metrics_scraped_mid_run_agree_with_the_final_summary(
    tmp_path: Path, mock: MockServer
) -> None:
    # 40 rows finish; the 41st is held by the mock, so the run is caught at a known point.
    mock.hold = "HOLD ME"
    rows = [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(40)]
    write_jsonl(tmp_path / "in.jsonl", [*rows, {"id": "held", "prompt": "HOLD ME please"}])
    config = str(write_config(tmp_path, mock.base_url, cap=4))
    proc = await start_turnstile("run", config, "--metrics-port", "0")
    url = await metrics_url(proc)
    await mock.wait_for_requests(41)

    async with aiohttp.ClientSession() as session:
        with anyio.fail_after(30):
            while True:  # until the 40 answered rows are journaled
                async with session.get(url) as response:
                    assert response.status == 200
                    during = scraped(await response.text())
                if value(during, "turnstile_rows_total", state="ok") == 40:
                    break
                await anyio.sleep(0.05)
    mock.release()
    _, err = await proc.communicate()

    assert proc.returncode == 0, err.decode()
    replica = {"model": "teacher", "replica": mock.base_url}
    assert value(during, "turnstile_turns_total") == 40
    assert value(during, "turnstile_rows_total", state="failed") == 0
    assert value(during, "turnstile_requests_total", **replica, outcome="ok") == 40
    assert value(during, "turnstile_requests_total", **replica, outcome="retried") == 0
    assert value(during, "turnstile_in_flight", **replica) == 1  # the held one
    assert value(during, "turnstile_limit", **replica) == 4
    assert value(during, "turnstile_model_up", **replica) == 1
    assert value(during, "turnstile_request_seconds_count", model="teacher") == 40
    # The run's own final sample (its history's last line) is the summary's numbers.
    last = orjson.loads((tmp_path / "ck" / HISTORY_NAME).read_bytes().splitlines()[-1])
    assert last["event"] == "end" and last["rows_ok"] == 41 and last["turns"] == 41
    final = last["models"]["teacher"]
    assert final["ok"] == value(during, "turnstile_requests_total", **replica, outcome="ok") + 1
    prompt = value(during, "turnstile_tokens_total", model="teacher", kind="prompt")
    completion = value(during, "turnstile_tokens_total", model="teacher", kind="completion")
    held = next(r for r in read_jsonl(tmp_path / "out" / "distilled.jsonl") if r["id"] == "held")
    assert prompt + held["usage"]["prompt_tokens"] == final["prompt_tokens"]
    assert completion + held["usage"]["completion_tokens"] == final["completion_tokens"]
    assert "41 ok" in err.decode()


async def test_a_port_in_use_is_a_clear_error(tmp_path: Path, mock: MockServer) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "q"}])
    config = str(write_config(tmp_path, mock.base_url))
    with_port = await start_turnstile("run", config, "--metrics-port", "0")
    mock.hold = "q"
    url = await metrics_url(with_port)
    port = url.rsplit(":", 1)[1].split("/")[0]

    taken = await turnstile(
        "run",
        str(
            write_config(
                tmp_path, mock.base_url, name="other", checkpoint_dir="ck2", output="out2.jsonl"
            )
        ),
        "--metrics-port",
        port,
    )

    mock.release()
    await with_port.communicate()
    assert taken.returncode == 3
    assert f"metrics cannot be served on 127.0.0.1:{port}" in taken.stderr


async def test_the_history_survives_a_sigkill_and_a_resume_adds_to_it(
    tmp_path: Path, mock: MockServer
) -> None:
    mock.latency_ms = 20
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q {i}"} for i in range(400)])
    config = str(write_config(tmp_path, mock.base_url, cap=4))
    killed = await kill_after(mock, 150, "run", config, "--quiet")
    assert killed.returncode == -signal.SIGKILL
    history = tmp_path / "ck" / HISTORY_NAME
    before = history.read_bytes()

    done = await turnstile("run", config, "--quiet")

    assert done.returncode == 0, done.stderr
    data = history.read_bytes()
    whole = before[: before.rfind(b"\n") + 1]
    assert data.startswith(whole)  # what the killed run wrote is kept
    samples = [orjson.loads(line) for line in data.splitlines()]  # every line whole
    runs = list(dict.fromkeys(s["run"] for s in samples))
    assert len(runs) == 2
    assert samples[-1]["event"] == "end" and samples[-1]["rows_ok"] == 400
    assert all(s["step"] == 1.0 for s in samples)
    assert samples[-1]["t"] >= samples[0]["t"]


async def test_every_run_writes_its_report_and_turnstile_report_writes_it_again(
    tmp_path: Path, mock: MockServer
) -> None:
    secret = "sk-test-DO-NOT-LEAK-4242"
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q {i}"} for i in range(30)])
    models = {
        "teacher": {
            "base_url": mock.base_url,
            "model": "mock",
            "max_concurrency": 4,
            "api_key_env": "TURNSTILE_TEST_KEY",
        }
    }
    config = str(write_config(tmp_path, mock.base_url, models=models))
    env = {"TURNSTILE_TEST_KEY": secret}

    done = await turnstile("run", config, "--quiet", env=env)

    assert done.returncode == 0, done.stderr
    report = tmp_path / "ck" / "report.html"
    assert f"report: {report}" in done.stderr.splitlines()
    page = report.read_text()
    assert page.count("data-plot=") == 4
    assert 'id="report-data"' in page and secret not in page
    assert secret in {a.split(" ", 1)[-1] for a in mock.stats.authorizations}  # it was sent
    report.unlink()
    again = await turnstile("report", config, env=env)
    assert again.returncode == 0, again.stderr
    assert report.exists() and secret not in report.read_text()


def test_a_sharded_run_serves_no_limit_of_0_before_its_first_lease() -> None:
    """The driver's counters before any shard has reported: every replica's limit is its
    cap (no adaptive limit known), as for a run that has not cut one."""
    from engine.metrics import RunCollector
    from engine.stats import RunStats, combine

    stats = RunStats()
    combine([], {"teacher": (8, ["http://a/v1", "http://b/v1"])}, into=stats)
    families = {f.name: f for f in RunCollector(lambda: stats).collect()}
    limits = {s.labels["replica"]: s.value for s in families["turnstile_limit"].samples}
    assert limits == {"http://a/v1": 8, "http://b/v1": 8}
