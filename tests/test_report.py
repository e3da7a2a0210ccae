"""engine.report: the history read back, the series maths, the page and its secrets,
and the page as a browser draws it."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.history import HISTORY_NAME
from engine.redact import config_secrets, scrub
from engine.report import (
    REPORT_NAME,
    Outage,
    config_text,
    outages,
    parse_series,
    read_series,
    redact,
    render_report,
    restarts,
    runs,
    write_report,
)
from engine.report.series import gauge, rate, spans, thin
from tests.report_support import GPU1, GPU2, T0, encode, line, model, realistic_history, replica

KEY_ENV = "TURNSTILE_REPORT_TEST_KEY"
KEY = "sk-report-test-5f0c1e9a7b3d"


def turns_rate(lines: list[dict[str, Any]]) -> list[float]:
    return rate(parse_series(encode(lines)), lambda s: s.turns).y.tolist()


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)
        for x, y in zip(a, b, strict=True)
    )


# The series maths, on lines written by hand.


def test_rates_difference_consecutive_samples_of_a_run() -> None:
    lines = [line(T0, "a", turns=0), line(T0 + 1, "a", turns=10), line(T0 + 3, "a", turns=30)]
    assert same(turns_rate(lines), [math.nan, 10.0, 10.0])
    tokens = [
        line(T0, "a", teacher=model(completion=100, prompt=10), judge=model(completion=50)),
        line(T0 + 2, "a", teacher=model(completion=300, prompt=30), judge=model(completion=150)),
    ]
    samples = parse_series(encode(tokens))
    from engine.report.series import tokens as summed

    assert rate(samples, summed(lambda m: m.completion_tokens)).y[1] == 150.0
    assert rate(samples, summed(lambda m: m.prompt_tokens)).y[1] == 10.0


def test_no_rate_across_a_restart() -> None:
    lines = [
        line(T0, "a", turns=0),
        line(T0 + 1, "a", turns=10),
        line(T0 + 100, "b", turns=5),  # counters start again with the new run
        line(T0 + 101, "b", turns=15),
    ]
    assert same(turns_rate(lines), [math.nan, 10.0, math.nan, 10.0])
    # A gauge keeps every sample and puts a NaN between the runs, so no line joins them.
    in_flight = gauge(
        parse_series(encode(lines)), lambda s: None if s.turns is None else s.turns * 2
    )
    assert in_flight.t.tolist() == [T0, T0 + 1, T0 + 100, T0 + 100, T0 + 101]
    assert same(in_flight.y.tolist(), [0.0, 20.0, math.nan, 10.0, 30.0])


def test_a_counter_going_down_within_a_run_has_no_rate() -> None:
    lines = [line(T0, "a", turns=10), line(T0 + 1, "a", turns=4), line(T0 + 2, "a", turns=6)]
    assert same(turns_rate(lines), [math.nan, math.nan, 2.0])


def test_restarts_are_where_the_run_changes_with_the_gap() -> None:
    lines = [line(T0 + i, "a") for i in range(3)]
    lines += [line(T0 + 60 + i, "b") for i in range(2)]
    lines += [line(T0 + 3600, "c")]
    samples = parse_series(encode(lines))
    assert [(r.run, r.start, r.end, r.samples) for r in runs(samples)] == [
        ("a", T0, T0 + 2, 3),
        ("b", T0 + 60, T0 + 61, 2),
        ("c", T0 + 3600, T0 + 3600, 1),
    ]
    found = restarts(samples)
    assert [(r.t, r.gap, r.previous, r.run) for r in found] == [
        (T0 + 60, 58.0, "a", "b"),
        (T0 + 3600, 3600 - 61, "b", "c"),
    ]
    assert restarts(samples[:3]) == []


def test_outages_per_replica_with_start_and_end() -> None:
    def at(t: float, run: str, gpu1: bool, gpu2: bool) -> dict[str, Any]:
        return line(
            t, run, teacher=model(replicas=[replica(GPU1, live=gpu1), replica(GPU2, live=gpu2)])
        )

    lines = [
        at(T0, "a", True, True),
        at(T0 + 1, "a", True, False),  # gpu2 out...
        at(T0 + 2, "a", True, False),
        at(T0 + 3, "a", True, True),  # ...until here
        at(T0 + 4, "a", False, True),  # gpu1 out when run a stops
        at(T0 + 50, "b", True, True),
        at(T0 + 51, "b", True, False),  # gpu2 out when the history ends
    ]
    assert outages(parse_series(encode(lines))) == [
        Outage("teacher", GPU2, T0 + 1, T0 + 3, open_end=False),
        Outage("teacher", GPU1, T0 + 4, T0 + 4, open_end=True),
        Outage("teacher", GPU2, T0 + 51, T0 + 51, open_end=True),
    ]


def test_outage_spans_merge_and_stay_visible() -> None:
    found = [
        Outage("m", GPU1, 0.0, 10.0, False),
        Outage("m", GPU2, 5.0, 20.0, False),  # overlaps: one span
        Outage("m", GPU1, 21.0, 24.0, False),  # within 2 s of it: the same span
        Outage("m", GPU1, 100.0, 100.0, True),  # seen at one sample: still a width
    ]
    assert spans(found, merge_within=2.0) == [(0.0, 24.0), (100.0, 102.0)]


def test_torn_last_line_bad_lines_and_unknown_keys_are_skipped() -> None:
    first = line(T0, "a", turns=1, teacher=model(requests=3, replicas=[replica(GPU1)]))
    first["future_key"] = {"nested": [1, 2]}
    first["models"]["teacher"]["future_model_key"] = 7
    first["models"]["teacher"]["replicas"][0]["zone"] = "eu"
    first["shards"] = "3/8 shards done, 4 running, 1 pending"
    data = (
        encode([first])
        + b"[1, 2, 3]\n"  # JSON, but not a sample
        + b'{"t": "yesterday", "run": "a"}\n'  # no time
        + encode([line(T0 + 1, "a", turns=2)])
        + b'{"v": 1, "t": 1796357874.0, "run": "a", "tur'  # torn by a SIGKILL
    )
    samples = parse_series(data)
    assert [(s.t, s.turns) for s in samples] == [(T0, 1.0), (T0 + 1, 2.0)]
    teacher = samples[0].models["teacher"]
    assert teacher.requests == 3.0 and teacher.replicas[0].url == GPU1
    assert teacher.limit is None and teacher.p50 is None
    assert samples[0].shards == "3/8 shards done, 4 running, 1 pending"
    assert samples[1].shards is None


def test_empty_and_missing_history(tmp_path: Path) -> None:
    assert read_series(tmp_path / HISTORY_NAME) == []
    (tmp_path / HISTORY_NAME).write_bytes(b"")
    assert read_series(tmp_path / HISTORY_NAME) == []
    assert parse_series(b"\n\n") == []
    assert runs([]) == [] and restarts([]) == [] and outages([]) == []


def test_thinning_keeps_run_ends_and_exact_mean_rates() -> None:
    lines = [line(T0 + i, "a", turns=i * (i % 7)) for i in range(5000)]
    lines += [line(T0 + 9000 + i, "b", turns=3 * i) for i in range(3001)]
    samples = parse_series(encode(lines))
    kept = thin(samples, 200)
    assert len(kept) <= 205
    for run in ("a", "b"):
        mine = [s for s in samples if s.run == run]
        theirs = [s for s in kept if s.run == run]
        assert (theirs[0], theirs[-1]) == (mine[0], mine[-1])
    # Over the kept samples, run b's rate is still exactly 3 turns a second.
    b_rates = rate(kept, lambda s: s.turns).y[[s.run == "b" for s in kept]]
    assert np.isnan(b_rates[0]) and np.allclose(b_rates[1:], 3.0)
    assert thin(samples[:10], 200) == samples[:10]


# Secrets: the config masked by key name, the API key scrubbed from the page.


def test_config_is_masked_by_key_name_and_headers() -> None:
    config = {
        "task": "distill",
        "models": {
            "teacher": {
                "base_url": "http://gpu1:8000/v1",
                "api_key": "sk-inline",
                "API_KEY_ENV": "OPENAI_API_KEY",
                "params": {"temperature": 0.7},
                "headers": {"X-Org": "org-123", "Authorization": "Bearer abc"},
            }
        },
        "hub": {"HF_Token": "hf_xyz", "Password": 1234, "client_secret": ["a", "b"]},
        "auth": {"authorization": {"nested": "x"}},
        "out": Path("/data/out.jsonl"),
        "urls": ("http://a", "http://b"),
    }
    masked = redact(config)
    teacher = masked["models"]["teacher"]
    assert teacher["api_key"] == "***"
    assert teacher["API_KEY_ENV"] == "OPENAI_API_KEY"  # a variable's name, not its value
    assert teacher["headers"] == {"X-Org": "***", "Authorization": "***"}
    assert teacher["params"] == {"temperature": 0.7}
    assert masked["hub"] == {"HF_Token": "***", "Password": "***", "client_secret": "***"}
    assert masked["auth"] == "***"  # "auth" names a secret too, whatever it holds
    text = config_text(config)
    for secret in ("sk-inline", "org-123", "Bearer", "hf_xyz", "1234"):
        assert secret not in text
    assert "/data/out.jsonl" in text and "- http://b" in text and "temperature: 0.7" in text


def test_api_key_values_from_the_environment_are_scrubbed() -> None:
    config = {"models": {"a": {"api_key_env": "K1"}, "b": {"api_key_env": "K2"}, "c": {}}}
    environ = {"K1": "sk-one-<&>-secret", "K2": "abc"}  # too short to replace safely
    assert config_secrets(config, environ) == ["sk-one-<&>-secret"]
    page = "<p>sk-one-<&>-secret and sk-one-&lt;&amp;&gt;-secret</p>"
    assert scrub(page, config_secrets(config, environ)) == "<p>*** and ***</p>"


# The page.


def realistic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A realistic report in ``tmp_path``: two runs, an outage of one replica of two,
    some failures, 400 samples; the API key set, and pasted into the config where no
    key name gives it away."""
    (tmp_path / HISTORY_NAME).write_bytes(encode(realistic_history(400)))
    monkeypatch.setenv(KEY_ENV, KEY)
    config = {
        "task": "distill",
        "input": "rows.jsonl",
        "checkpoint_dir": str(tmp_path),
        "models": {
            "teacher": {
                "base_url": [GPU1, GPU2],
                "model": "Qwen2.5-7B-Instruct",
                "api_key_env": KEY_ENV,
                "max_concurrency": 16,
                "params": {"temperature": 0.7, "user": KEY},
            }
        },
        "distill": {"model": "teacher"},
    }
    totals = {
        "rows ok": 1107,
        "rows failed": 3,
        "turns": 4000,
        "elapsed s": 518.0,
        "requests": {"teacher": 4120},
    }
    return write_report(
        tmp_path, title="distill: teacher on 2 replicas", config=config, totals=totals
    )


def test_report_is_one_self_contained_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = realistic(tmp_path, monkeypatch)
    assert path == tmp_path / REPORT_NAME
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert re.findall(r'data-plot="([^"]+)"', page) == [
        "throughput",
        "in_flight",
        "latency",
        "failures",
    ]
    assert page.count("<svg") == 4 and page.count("</svg>") == 4
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    # Nothing to load: no script, stylesheet, image or font, no reference but to an id.
    for tag in ("<script", "<link", "<img", "<iframe", "<object", "@import", "@font-face"):
        assert tag not in page.lower()
    assert re.findall(r'\b(?:src|href)\s*=\s*(?!["\']?#)', page) == []
    assert re.findall(r"url\((?!#)", page) == []
    # The only addresses are the replicas', shown as text (config, outage table).
    assert set(re.findall(r"https?://[^\s<\"']*", page)) == {GPU1, GPU2}
    # Ids stay unique across the four SVGs.
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # The key: named in the config (masked), pasted in it (scrubbed), nowhere in the file.
    assert KEY not in page and KEY not in path.read_bytes().decode("latin-1")
    assert "Restarts (1)" in page and "Replica outages (1)" in page
    assert "4,120" in page and "requests / teacher" in page


def test_report_without_history_says_so(tmp_path: Path) -> None:
    path = write_report(tmp_path, title="a run", config={}, totals={"rows ok": 0})
    page = path.read_text(encoding="utf-8")
    assert "No samples" in page and "data-plot" not in page and "<svg" not in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_everything_shown_is_escaped() -> None:
    run = "<i>run</i>"
    lines = [
        line(T0, run, turns=0, **{"<b>m</b>": model(replicas=[replica("http://x/<u>")])}),
        line(T0 + 1, "r2&", turns=1),
    ]
    page = render_report(
        parse_series(encode(lines)),
        title="<script>alert(1)</script>",
        config_text="note: </pre><script>x</script>",
        totals={"<th>": "<td>"},
    )
    for raw in ("<script", "<i>run", "<b>m", "</pre><script", "<th><", "<u>", "r2&<"):
        assert raw not in page
    assert "r2&amp;" in page  # in the restarts table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;i&gt;run&lt;/i&gt;" in page


def test_a_single_sample_still_draws_every_plot() -> None:
    page = render_report(
        parse_series(encode([line(T0, "a", teacher=model(replicas=[replica(GPU1)]))])),
        title="t",
        config_text="",
        totals={},
    )
    assert page.count("data-plot=") == 4 and page.count("<svg") == 4


def test_the_page_renders_in_headless_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser check must run")
        pytest.skip(reason)
    path = realistic(tmp_path, monkeypatch)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            path.as_uri(),
        ],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert shot.exists(), done.stderr.decode(errors="replace")[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    grey = pixels[..., :3].mean(axis=2)
    assert grey.std() > 0.05  # not one flat colour
    assert (grey < 0.9).mean() > 0.02  # ink: text, axes and lines
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # coloured lines, shading, anti-aliasing: more than text makes


def test_history_lines_from_the_engine_read_back() -> None:
    """The reader takes what engine.history writes (its exact keys, not this file's)."""
    from engine.history import History
    from engine.stats import ModelStats, ReplicaStats, RunStats

    teacher = ModelStats(
        "teacher", cap=32, replicas=[ReplicaStats(GPU1, 16), ReplicaStats(GPU2, 16)]
    )
    stats = RunStats(rows_total=1000, models={"teacher": teacher}, shards="1/2 shards done")
    history = History("20261204T050102Z-1")
    first = history.line(stats, T0)
    stats.turns_done, teacher.completion_tokens, teacher.in_flight = 12, 3000, 31
    teacher.latency.add(0.8)
    teacher.replicas[1].live = False
    second = history.line(stats, T0 + 2)
    samples = parse_series(first + second)
    assert [s.run for s in samples] == ["20261204T050102Z-1"] * 2
    assert rate(samples, lambda s: s.turns).y[1] == 6.0
    assert samples[1].models["teacher"].in_flight == 31.0
    assert samples[1].models["teacher"].p50 == pytest.approx(0.8, rel=0.05)
    assert samples[1].shards == "1/2 shards done" and samples[1].rows_total == 1000.0
    assert outages(samples) == [Outage("teacher", GPU2, T0 + 2, T0 + 2, open_end=True)]
