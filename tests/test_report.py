"""engine.report: the history read back, the series maths, the page and its secrets,
and the page as a browser draws it (headless Chromium over the DevTools protocol)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
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
from engine.report.charts import payload
from engine.report.series import gauge, rate, spans, thin, whole_intervals
from tests.report_support import (
    GPU1,
    GPU2,
    T0,
    chromium,
    chromium_path,
    encode,
    line,
    model,
    realistic_history,
    replica,
)

KEY_ENV = "TURNSTILE_REPORT_TEST_KEY"
KEY = "sk-report-test-5f0c1e9a7b3d"


def turns_rate(lines: list[dict[str, Any]]) -> list[float | None]:
    return rate(parse_series(encode(lines)), lambda s: s.turns).y


def same(a: list[float | None], b: list[float | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and x == pytest.approx(y))
        for x, y in zip(a, b, strict=True)
    )


# The series maths, on lines written by hand.


def test_rates_difference_consecutive_samples_of_a_run() -> None:
    lines = [line(T0, "a", turns=0), line(T0 + 1, "a", turns=10), line(T0 + 3, "a", turns=30)]
    assert same(turns_rate(lines), [None, 10.0, 10.0])
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
    assert same(turns_rate(lines), [None, 10.0, None, 10.0])
    # A gauge keeps every sample and puts a NaN between the runs, so no line joins them.
    in_flight = gauge(
        parse_series(encode(lines)), lambda s: None if s.turns is None else s.turns * 2
    )
    assert in_flight.t == [T0, T0 + 1, T0 + 100, T0 + 100, T0 + 101]
    assert same(in_flight.y, [0.0, 20.0, None, 10.0, 30.0])


def test_a_counter_going_down_within_a_run_has_no_rate() -> None:
    lines = [line(T0, "a", turns=10), line(T0 + 1, "a", turns=4), line(T0 + 2, "a", turns=6)]
    assert same(turns_rate(lines), [None, None, 2.0])


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
    rates = rate(kept, lambda s: s.turns).y
    b_rates = [y for y, s in zip(rates, kept, strict=True) if s.run == "b"]
    assert b_rates[0] is None and b_rates[1:] == pytest.approx([3.0] * (len(b_rates) - 1))
    assert thin(samples[:10], 200) == samples[:10] and thin(samples, None) == samples


def test_thinning_a_few_more_than_asked_keeps_about_as_many_as_asked() -> None:
    """The reader gives about as many lines as the page draws plus every outage line:
    1,060 samples thinned to 1,000 keep 1,000 (a whole stride dropped every second)."""
    samples = parse_series(encode([line(T0 + i, "a", turns=i) for i in range(1060)]))
    kept = thin(samples, 1000)
    assert 1000 <= len(kept) <= 1001
    assert kept[0] == samples[0] and kept[-1] == samples[-1]
    times = [s.t for s in kept]
    assert times == sorted(set(times))


def test_a_short_last_interval_is_merged_into_the_one_before() -> None:
    """A run's last sample comes when it ends, here 0.1 s after the one before: 3 replies
    in it read as 30 turns/s in a run of 10 a second (issue 25 #13). The point before
    is dropped, so the last rate is over the last 1.1 s: 13 replies, 11.8 a second."""
    lines = [line(T0 + i, "a", turns=10 * i) for i in range(5)]
    lines.append(line(T0 + 4.1, "a", turns=43))
    lines += [line(T0 + 60 + i, "b", turns=10 * i) for i in range(3)]  # whole steps: kept
    samples = parse_series(encode(lines))
    assert rate(samples, lambda s: s.turns).y[5] == pytest.approx(30.0)  # the spike
    drawn = whole_intervals(samples)
    assert [s.t for s in drawn] == [
        *(T0 + i for i in range(4)),
        T0 + 4.1,
        *(T0 + 60 + i for i in range(3)),
    ]
    rates = rate(drawn, lambda s: s.turns).y
    assert rates[4] == pytest.approx(13 / 1.1) and rates[-1] == pytest.approx(10.0)
    # On the page: the turns/s line ends at the run's mean, not at three times it.
    data = payload(drawn, restarts(drawn), [])
    turns = data["charts"][0]["panels"][0]["lines"][0]["values"]
    first_run = turns[: data["t"].index(T0 + 4.1) + 1]
    assert max(v for v in first_run if v is not None) < 12
    # A run of two samples, or a last interval of a whole step, is left as it is.
    assert whole_intervals(samples[:2]) == samples[:2]
    assert whole_intervals(samples[5:]) == samples[5:]


def test_reading_a_long_history_decodes_about_most_lines_and_keeps_every_event() -> None:
    """A week of history, three runs (one of four samples), a replica out for a while
    and torn and bad lines: read with ``most``, the runs, restarts and outages are the
    full read's, and the rates over the samples read are exact means."""

    def at(t: float, run: str, i: int, gpu2: bool = True) -> dict[str, Any]:
        teacher = model(requests=i, replicas=[replica(GPU1), replica(GPU2, live=gpu2)])
        return line(t, run, turns=3 * i, teacher=teacher)

    lines = [at(T0 + i, "a", i, gpu2=not 1000 <= i < 1300) for i in range(20_000)]
    lines += [at(T0 + 30_000 + i, "b", i) for i in range(4)]
    lines += [at(T0 + 40_000 + i, "c", i, gpu2=i != 7000) for i in range(12_000)]
    data = encode(lines[:15_000]) + b"not json\n" + encode(lines[15_000:]) + b'{"v": 1, "t'
    full = parse_series(data)
    read = parse_series(data, most=500)
    assert len(full) == 32_004 and 500 <= len(read) <= 1000
    spans_of = lambda found: [(r.run, r.start, r.end) for r in runs(found)]  # noqa: E731
    assert spans_of(read) == spans_of(full) and restarts(read) == restarts(full)
    assert (
        outages(read)
        == outages(full)
        == [
            Outage("teacher", GPU2, T0 + 1000, T0 + 1300, open_end=False),
            Outage("teacher", GPU2, T0 + 47_000, T0 + 47_001, open_end=False),
        ]
    )
    rates = [y for y in rate(read, lambda s: s.turns).y if y is not None]
    assert rates == pytest.approx([3.0] * len(rates))
    assert parse_series(data, most=40_000) == full  # fewer lines than most: all of them
    assert parse_series(b"torn", most=1) == [] and parse_series(b"", most=1) == []


def engine_history(runs_out: dict[str, tuple[int, set[int], set[int]]]) -> bytes:
    """Lines as engine.history writes them, for runs named in ``runs_out``: per run its
    number of samples and the samples at which gpu1 and gpu2 are out of service."""
    from engine.history import History
    from engine.stats import ModelStats, ReplicaStats, RunStats

    lines: list[bytes] = []
    t = T0
    for run, (samples, gpu1_out, gpu2_out) in runs_out.items():
        history = History(run, len(lines))
        teacher = ModelStats(
            "teacher", cap=32, replicas=[ReplicaStats(GPU1, 16), ReplicaStats(GPU2, 16)]
        )
        stats = RunStats(rows_total=10**6, models={"teacher": teacher})
        for i in range(samples):
            teacher.replicas[0].live = i not in gpu1_out
            teacher.replicas[1].live = i not in gpu2_out
            stats.turns_done = teacher.requests = 5 * i
            lines.append(history.line(stats, t))
            t += 1.0
        t += 600.0  # down ten minutes before the next run
    return b"".join(lines)


def test_outages_are_found_from_the_out_counters_without_reading_each_out_line() -> None:
    """With the replicas' ``out`` counters (engine.history writes them), a read with
    ``most`` finds every outage of the full read by bisection: a long one, two that
    overlap, one of a single sample, a flapping replica, one open when its run ended
    and one open when the next began, and in a run written before the counters (found
    by searching its lines). The lines inside a long outage are not all decoded."""
    gpu2_long = set(range(1000, 1300))
    data = engine_history(
        {
            "a": (6000, set(range(1200, 1250)) | {5000}, gpu2_long | set(range(5990, 6000))),
            "b": (4000, {2 * i for i in range(1500, 1510)}, set(range(0, 20))),
            "c": (3000, set(range(700, 900)), {1500}),
        }
    )
    lines = data.splitlines(keepends=True)
    old = [orjson.loads(raw) for raw in lines[6000:10000]]  # run b, as an older engine wrote it
    for body in old:
        for item in body["models"]["teacher"]["replicas"]:
            del item["out"]
    data = b"".join(lines[:6000]) + encode(old) + b"".join(lines[10000:])
    full = parse_series(data)
    read = parse_series(data, most=200)
    assert len(full) == 13_000 and outages(read) == outages(full)
    assert len(outages(full)) == 4 + 11 + 2
    assert restarts(read) == restarts(full)
    inside = [s for s in read if s.run == "a" and T0 + 1000 < s.t < T0 + 1200]
    assert len(inside) < 20  # all 199 of them were decoded before the counters


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


def test_a_json_config_is_shown_as_json_masked_in_its_order() -> None:
    config = {
        "task": "distill",
        "models": {"teacher": {"api_key": "sk-inline", "params": {"temperature": 0.7}}},
        "out": Path("/data/out.jsonl"),
    }
    text = config_text(config, "json")
    assert "sk-inline" not in text
    assert orjson.loads(text) == {
        "task": "distill",
        "models": {"teacher": {"api_key": "***", "params": {"temperature": 0.7}}},
        "out": "/data/out.jsonl",
    }
    assert list(orjson.loads(text)) == ["task", "models", "out"]
    assert text.startswith('{\n  "task"')  # indented, one key a line


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


UPLOT = Path(__file__).parent.parent / "engine" / "report" / "vendor" / "uPlot.iife.min.js"


def page_data(page: str) -> dict[str, Any]:
    """The series a page embeds for its script to draw."""
    found = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S
    )
    assert found is not None
    data: dict[str, Any] = orjson.loads(found[1])
    return data


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
    # The series as JSON, uPlot and the page's script inline: three script elements.
    assert page.count("<script") == 3 and page.count("</script>") == 3
    assert UPLOT.read_text(encoding="utf-8") in page
    data = page_data(page)
    assert [c["name"] for c in data["charts"]] == ["throughput", "in_flight", "latency", "failures"]
    assert all(len(line["values"]) == len(data["t"]) for line in all_lines(data))
    assert len(data["t"]) == 400 + 1  # every sample, and the break between the two runs
    assert len(data["restarts"]) == 1 and len(data["outages"]) == 1
    labels = [line["label"] for line in all_lines(data)]
    assert "gpu2:8000 in flight" in labels and "teacher p95" in labels
    # Nothing to load: no stylesheet, image or font, no script or frame from elsewhere.
    for tag in ("<link", "<img", "<iframe", "<object", "@import", "@font-face"):
        assert tag not in page.lower()
    assert re.findall(r"\b(?:src|href)\s*=", page) == []
    assert re.findall(r"url\(", page) == []
    # The only addresses are the replicas', shown as text (config, outage table), and
    # the one in uPlot's licence comment.
    addresses = set(re.findall(r"https?://[^\s<\"')]*", page))
    assert addresses == {GPU1, GPU2, "https://github.com/leeoniya/uPlot"}
    # The key: named in the config (masked), pasted in it (scrubbed), nowhere in the file.
    assert KEY not in page and KEY not in path.read_bytes().decode("latin-1")
    assert "Restarts (1)" in page and "Replica outages (1)" in page
    assert "4,120" in page and "requests / teacher" in page


def all_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [line for c in data["charts"] for p in c["panels"] for line in p["lines"]]


def test_a_short_secret_is_scrubbed_from_the_data_never_from_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of "none" (common for local servers) appears in uPlot's code and style;
    masking it there would break every chart."""
    (tmp_path / HISTORY_NAME).write_bytes(encode(realistic_history(50)))
    monkeypatch.setenv(KEY_ENV, "none")
    config = {"models": {"none": {"base_url": GPU1, "api_key_env": KEY_ENV}}}
    page = write_report(tmp_path, title="none", config=config, totals={}).read_text()
    assert UPLOT.read_text(encoding="utf-8") in page and "display: none" in page
    assert "<title>***</title>" in page and "<h1>***</h1>" in page
    assert page_data(page)["charts"]


def test_report_without_history_says_so(tmp_path: Path) -> None:
    path = write_report(tmp_path, title="a run", config={}, totals={"rows ok": 0})
    page = path.read_text(encoding="utf-8")
    assert "No samples" in page and "data-plot" not in page and "<script" not in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_everything_shown_is_escaped() -> None:
    run = "<i>run</i>"
    lines = [
        line(T0, run, turns=0, **{"<b>m</b>": model(replicas=[replica("http://x/<u>")])}),
        line(T0 + 1, "r2&", turns=1, **{"</script><script>alert(2)//": model()}),
    ]
    page = render_report(
        parse_series(encode(lines)),
        title="<script>alert(1)</script>",
        config_text="note: </pre><script>x</script>",
        totals={"<th>": "<td>"},
    )
    for raw in ("<script>alert", "<i>run", "<b>m", "</pre><script", "<th><", "<u>", "r2&<"):
        assert raw not in page
    assert page.count("<script") == 3  # the page's own: data, uPlot, the drawing
    assert "r2&amp;" in page  # in the restarts table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;i&gt;run&lt;/i&gt;" in page
    data = page_data(page)  # the JSON reads back, the names as they were
    titles = [panel["title"] for chart in data["charts"] for panel in chart["panels"]]
    assert "<b>m</b>: in flight (all replicas)" in titles
    assert "</script><script>alert(2)//: in flight (all replicas)" in titles


def test_a_single_sample_still_draws_every_plot() -> None:
    page = render_report(
        parse_series(encode([line(T0, "a", teacher=model(replicas=[replica(GPU1)]))])),
        title="t",
        config_text="",
        totals={},
    )
    data = page_data(page)
    assert page.count("data-plot=") == 4 and len(data["charts"]) == 4 and data["t"] == [T0]


# In the browser: every chart draws, hovering shows values, a zoom is every chart's.

CHARTS_DRAWN = """(() => {
  const panels = [...document.querySelectorAll("section[data-plot] .panel")];
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const lines = data.charts.flatMap(c => c.panels.map(p => p.lines));
  return panels.map((panel, i) => {
    const canvas = panel.querySelector("canvas");
    const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const colour = lines[i].length ? lines[i][0].color : "#000000";
    const want = [1, 3, 5].map(k => parseInt(colour.slice(k, k + 2), 16));
    let ink = 0, line = 0;
    for (let k = 0; k < px.length; k += 4) {
      if (px[k + 3] > 0) ink++;
      if (px[k + 3] > 200 && Math.abs(px[k] - want[0]) + Math.abs(px[k + 1] - want[1])
          + Math.abs(px[k + 2] - want[2]) < 30) line++;
    }
    return {
      plot: panel.parentNode.dataset.plot, lines: lines[i].length, ink, line,
      width: canvas.width, height: canvas.height,
    };
  });
})()"""

LEGEND = """[...document.querySelectorAll("section[data-plot] .panel")].map(panel =>
  [...panel.querySelectorAll(".u-legend .u-series")].map(s => [
    s.querySelector(".u-label").textContent,
    s.querySelector(".u-value").textContent]))"""

FRAME = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


async def check_the_page_in_chromium(path: Path, profile: Path, *, panels: int) -> None:
    """Every panel's canvas has its first line's colour in it, no console error, and
    hovering one panel shows a time and values in every panel's legend."""
    async with chromium(profile) as page:
        await page.open(path.as_uri())
        drawn = await page.evaluate(CHARTS_DRAWN)
        assert page.errors() == []
        assert len(drawn) == panels, drawn
        for panel in drawn:
            assert panel["width"] > 600 and panel["height"] > 100, panel
            assert panel["ink"] > 2000, panel  # axes, grid and labels at the least
            if panel["lines"]:
                assert panel["line"] > 50, panel  # its first line, in its colour
        before = await page.evaluate(LEGEND)
        assert all(value == "--" for legend in before for _, value in legend[1:])
        # Hover the first panel a tenth of the way in (the first run, all lines defined).
        box = await page.evaluate(
            """(() => { const r = document.querySelector("section[data-plot] .u-over")
              .getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()"""
        )
        await page.call("Runtime.evaluate", expression="window.scrollTo(0, 0)")
        x, y = box[0] + box[2] * 0.1, box[1] + box[3] / 2
        await page.mouse("mouseMoved", x, y)
        await page.evaluate(FRAME)
        after = await page.evaluate(LEGEND)
        assert page.errors() == []
        for legend in after:  # the cursor is shared: every legend shows the same time
            label, stamp = legend[0]
            assert label == "time (UTC)" and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp)
        assert len({legend[0][1] for legend in after}) == 1
        turns = after[0][1]
        assert turns[0] == "turns/s" and re.fullmatch(r"[\d,.]+", turns[1]), turns
        # Drag across the first panel: every panel zooms to the same stretch of time.
        await page.mouse("mousePressed", x, y, button="left", clickCount=1)
        await page.mouse("mouseMoved", x + box[2] * 0.2, y, button="left")
        await page.mouse("mouseReleased", x + box[2] * 0.2, y, button="left", clickCount=1)
        await page.evaluate(FRAME)
        scales = await page.evaluate(
            "window.turnstileReport.plots.map(u => [u.scales.x.min, u.scales.x.max])"
        )
        data_span = await page.evaluate(
            "(() => { const t = JSON.parse(document.getElementById('report-data')"
            ".textContent).t; return t[t.length - 1] - t[0]; })()"
        )
        assert len({tuple(s) for s in scales}) == 1, scales
        assert 0 < scales[0][1] - scales[0][0] < data_span / 2
        # A click on a legend entry hides its line, and a second shows it again. The
        # pointer leaves the charts first: the legends shrink back to "--" as it does.
        await page.mouse("mouseMoved", 2, 2)
        await page.evaluate(FRAME)
        label = await page.evaluate(
            """(() => { const r = document.querySelector("section[data-plot] .u-legend")
              .querySelectorAll(".u-series")[1].querySelector("th").getBoundingClientRect();
              return [r.left + r.width / 2, r.top + r.height / 2]; })()"""
        )
        shown = "window.turnstileReport.plots[0].series[1].show"
        for expected in (False, True):
            await page.mouse("mouseMoved", *label)
            await page.mouse("mousePressed", *label, button="left", clickCount=1)
            await page.mouse("mouseReleased", *label, button="left", clickCount=1)
            assert await page.evaluate(shown) is expected
        assert page.errors() == []


def needs_chromium() -> None:
    if chromium_path() is None:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser check must run")
        pytest.skip(reason)


async def test_the_page_draws_and_answers_the_mouse_in_headless_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_chromium()
    path = realistic(tmp_path, monkeypatch)
    # Throughput (2 panels), in flight (the model, its replicas), latency, failures.
    await check_the_page_in_chromium(path, tmp_path / "profile", panels=6)


async def test_the_page_draws_10_5_points_a_line(tmp_path: Path) -> None:
    needs_chromium()
    lines = [
        line(
            T0 + i,
            "a",
            turns=4 * i + i % 5,
            teacher=model(requests=i, completion=150 * i, prompt=80 * i, in_flight=i % 17),
        )
        for i in range(100_000)
    ]
    page = render_report(
        parse_series(encode(lines)), title="10^5", config_text="", totals={}, points=None
    )
    assert len(page_data(page)["t"]) == 100_000
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    await check_the_page_in_chromium(path, tmp_path / "profile", panels=5)


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
    # How many of this run's samples found each replica out, this one included.
    assert [r.out for r in samples[1].models["teacher"].replicas] == [0, 1]
