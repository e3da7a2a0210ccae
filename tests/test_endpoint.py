"""The model-endpoint seam: the HTTP endpoint from plain values, its snapshot and share,
and an HTTP package that imports nothing of the config, the tasks, input or output."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.endpoints import http_endpoint, http_settings
from engine.errors import ModelError
from engine.http.client import HttpEndpoint
from engine.http.endpoint import EndpointStatistics, ModelEndpoint
from engine.http.settings import HttpSettings
from engine.stats import ModelStats
from engine.testing.mock_server import MockServer, reply_for

ENGINE = Path(__file__).resolve().parent.parent / "engine"
MESSAGES = [{"role": "user", "content": "hello"}]
FORBIDDEN = ("engine.config", "engine.tasks", "engine.input", "engine.output")


def test_the_http_package_imports_no_config_task_input_or_output_module() -> None:
    # The package's own __init__ (the public API) imports the whole engine, so it is
    # replaced by a bare package: what is left is what engine/http itself pulls in.
    modules = sorted(p.stem for p in (ENGINE / "http").glob("*.py") if p.stem != "__init__")
    assert {"client", "endpoint", "settings"} <= set(modules)
    code = (
        "import importlib, sys, types\n"
        "engine = types.ModuleType('engine')\n"
        f"engine.__path__ = [{str(ENGINE)!r}]\n"
        "sys.modules['engine'] = engine\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('engine.http.' + name)\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('engine.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = done.stdout.split()
    assert "engine.http.client" in loaded
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []


def test_settings_from_a_model_config_read_the_key_and_never_show_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ENDPOINT_KEY", "sk-SECRET")
    config = ModelConfig(
        name="teacher",
        base_urls=("http://a/v1",),
        model="served",
        api_key_env="TEST_ENDPOINT_KEY",
        max_concurrency=3,
        params={"temperature": 0.2},
    )
    settings = http_settings(config)
    assert settings.api_key == "sk-SECRET" and "sk-SECRET" not in repr(settings)
    assert (settings.name, settings.model, settings.max_concurrency) == ("teacher", "served", 3)
    assert settings.params == {"temperature": 0.2} and settings.api_key_env == "TEST_ENDPOINT_KEY"
    assert http_settings(config, ["http://b/v1", "http://c/v1"]).base_urls == (
        "http://b/v1",
        "http://c/v1",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"models\.x: no base_url"):
        HttpSettings(name="x", base_urls=(), model="m")


async def test_the_http_endpoint_counts_into_a_snapshot(mock: MockServer) -> None:
    stats = ModelStats(name="m", cap=2)
    settings = HttpSettings(name="m", base_urls=(mock.base_url,), model="mock", max_concurrency=2)
    endpoint: ModelEndpoint = HttpEndpoint(settings, stats)
    async with endpoint:
        assert await endpoint.probe() == []
        before = endpoint.statistics()
        completion = await endpoint.complete(MESSAGES)
        after = endpoint.statistics()

    assert completion.texts == [reply_for("mock", MESSAGES)]
    assert (before.requests, before.ok, after.requests, after.ok) == (0, 0, 1, 1)
    assert after.prompt_tokens == stats.prompt_tokens > 0
    assert after.latency.count == 1 and after.in_flight == 0
    assert (after.live, after.down, after.cap, after.limit) == (1, False, 2, 2)
    [replica] = after.replicas
    assert (replica.url, replica.ok, replica.live) == (mock.base_url, 1, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.ok = 5  # type: ignore[misc]
    stats.ok += 10  # the live counters move on; the snapshot does not
    assert after.ok == 1


async def test_a_share_caps_each_replica_and_none_shows_no_limit(mock: MockServer) -> None:
    urls = (mock.base_url, mock.base_url + "/")
    async with http_endpoint(
        ModelConfig(name="m", base_urls=urls, model="mock", max_concurrency=8)
    ) as endpoint:
        endpoint.set_share(None)
        waiting = endpoint.statistics()
        assert (waiting.cap, waiting.limit, waiting.claim) == (0, None, 0)
        assert [r.limit for r in waiting.replicas] == [None, None]

        endpoint.set_share(3)
        shared = endpoint.statistics()
        assert (shared.cap, shared.limit, shared.claim) == (6, 6, 3)
        assert [(r.cap, r.limit) for r in shared.replicas] == [(3, 3), (3, 3)]
        assert (await endpoint.complete(MESSAGES)).texts == [reply_for("mock", MESSAGES)]


async def test_an_unreachable_model_is_down_from_the_start_when_asked() -> None:
    config = ModelConfig(name="gen", base_urls=("http://127.0.0.1:9/v1",), model="x")
    async with http_endpoint(config) as endpoint:
        [problem] = await endpoint.probe()
        assert problem.startswith("models.gen: cannot reach http://127.0.0.1:9/v1/models")
        assert endpoint.statistics().live == 0 and not endpoint.statistics().down
        endpoint.down_from_start()
        assert endpoint.statistics().down
        with pytest.raises(ModelError) as failed:
            await endpoint.complete(MESSAGES)
    assert failed.value.model_down
    assert "unreachable since the run started" in str(failed.value)


def test_a_snapshot_claims_the_most_in_flight_or_its_limit_on_any_replica() -> None:
    stats = ModelStats(name="m", cap=4)
    endpoint = HttpEndpoint(
        HttpSettings(
            name="m", base_urls=("http://a/v1", "http://b/v1"), model="x", max_concurrency=4
        ),
        stats,
    )
    endpoint.set_share(2)
    stats.replicas[1].in_flight = 5  # requests over a lowered limit, still finishing
    assert EndpointStatistics.of(stats, live=2, down=False).claim == 5
    assert endpoint.statistics().claim == 5
