"""End to end: no key and no credential of a URL reaches a file, a log, a metric or a message."""

from __future__ import annotations

import base64
from pathlib import Path

from engine.http.replicas import ReplicaPool
from engine.metrics import RunCollector
from engine.stats import ModelStats, RunStats
from engine.testing.mock_server import Faults, MockServer
from tests.conftest import conversations, read_jsonl, turnstile, write_config, write_jsonl

KEY = "sk-secrets-run-0123456789abcdef"
KEY_ENV = "TURNSTILE_SECRETS_TEST_KEY"
PASSWORD = "PASSWORD-9f8e7d6c"
QUERY_SECRET = "QSECRET-5a4b3c2d"


def credentialed(base_url: str) -> str:
    host = base_url.removeprefix("http://")
    return f"http://user:{PASSWORD}@{host}?api_key={QUERY_SECRET}"


def assert_nowhere(folder: Path, secrets: list[str], *, but: Path, stderr: str) -> None:
    """None of ``secrets`` in ``stderr`` or any file under ``folder`` but the config."""
    for secret in secrets:
        assert secret not in stderr
    for path in folder.rglob("*"):
        if path.is_file() and path != but:
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret} in {path}"


async def test_credentials_in_base_url_stay_out_of_report_metrics_and_logs(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(6))
    config = write_config(tmp_path, credentialed(mock.base_url))

    result = await turnstile("run", str(config))

    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(tmp_path / "out" / "distilled.jsonl")) == 6
    assert (tmp_path / "ck" / "report.html").exists()
    assert (tmp_path / "ck" / "metrics.jsonl").exists()
    assert_nowhere(tmp_path, [PASSWORD, QUERY_SECRET], but=config, stderr=result.stderr)
    # The credentials were used, as the URL asked: Basic auth from its user and password.
    basic = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    assert mock.stats.authorizations == {f"Basic {basic}"}


def test_prometheus_labels_name_replicas_without_credentials() -> None:
    model = ModelStats(name="teacher", cap=0)
    ReplicaPool("teacher", [credentialed("http://h:1/v1")], 2, model)
    stats = RunStats(models={"teacher": model})

    labels = [
        sample.labels["replica"]
        for family in RunCollector(lambda: stats).collect()
        for sample in family.samples
        if "replica" in sample.labels
    ]

    assert labels and set(labels) == {"http://h:1/v1?api_key=***"}


async def test_url_credentials_with_api_key_env_are_a_config_error_not_a_crash(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(2))
    teacher = {"base_url": credentialed(mock.base_url), "model": "mock", "api_key_env": KEY_ENV}
    config = write_config(tmp_path, mock.base_url, models={"teacher": teacher})

    result = await turnstile("run", str(config), env={KEY_ENV: KEY})

    assert result.returncode == 2, result.stderr
    assert "models.teacher.base_url: carries a user and password" in result.stderr
    assert_nowhere(tmp_path, [KEY, PASSWORD, QUERY_SECRET], but=config, stderr=result.stderr)
    assert mock.stats.total_requests == 0


async def test_a_key_echoed_by_the_server_stays_out_of_the_failed_file(
    tmp_path: Path, mock: MockServer
) -> None:
    write_jsonl(tmp_path / "in.jsonl", conversations(4))
    mock.faults = Faults(fail_models={"mock": 400}, echo_authorization=True)
    teacher = {"base_url": mock.base_url, "model": "mock", "api_key_env": KEY_ENV}
    config = write_config(tmp_path, mock.base_url, models={"teacher": teacher})

    result = await turnstile("run", str(config), env={KEY_ENV: KEY})

    assert result.returncode == 1, result.stderr
    failed = read_jsonl(tmp_path / "out" / "distilled.failed.jsonl")
    assert len(failed) == 4
    assert all("(Authorization: Bearer ***)" in row["error"] for row in failed)
    assert_nowhere(tmp_path, [KEY], but=config, stderr=result.stderr)
