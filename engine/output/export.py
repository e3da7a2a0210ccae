"""`turnstile export`: a run's output in input order, as JSONL, Parquet or a Hugging Face dataset.

The output file is in completion order. The journal says where each row ends:
an emit record ``{"k": "o", "l": line, "e": end}`` is written after the row of
input line ``l`` has been appended to the output, which then ended at byte
``e``. The emits of journal segments a snapshot covers (and deleted) are kept in
the checkpoint's emits index (engine.checkpoint.snapshot). Export reads the index
and the segments after it once for those records, then reads the output
memory-mapped, row by row in input-line order: a row's start is the byte after
the newline before its end. Memory holds one 8-byte end per input line and one
row group of rows, whatever the output's size.

Blocking on purpose: this is a command of its own, not part of the run loop.
Every destination is written beside itself and moved into place at the end, so
an export that fails leaves the previous one (if any) as it was.

Parquet columns are inferred by pyarrow over *all* rows (a first pass reads
only the types), so a column that is null in the first rows, or a key that only
some rows have (``truncated_turns``), gets its real type. A column whose values
have types that cannot be unified (an ``id`` that is a number in some rows and a
string in others) is stored as text: strings as they are, other values as JSON;
the card says which columns.
"""

from __future__ import annotations

import glob
import mmap
import os
import re
import shutil
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

from engine.checkpoint.checkpoint import unlocked_read
from engine.checkpoint.journal import EMIT_OUTPUT, decode, iter_lines
from engine.checkpoint.paths import clashes, inside, run_targets, same_file
from engine.checkpoint.snapshot import emit_sources, has_journal
from engine.config import RunConfig
from engine.errors import ExportError, TurnstileError
from engine.input.reader import fragments_as_text, has_long_digits, loads_exact
from engine.output.card import Counts, card_text
from engine.output.filters import FILTER_KEY, filtered_path, rule_of
from engine.output.traces import KEEP, REASONING_MODES, Reshaper

EXPORT_FORMATS = ("jsonl", "parquet", "hf")
# Column names TRL gives a meaning of its own: an input field carried into the export
# under one of them breaks TRL's chat-template step on every row (tried with TRL 1.16's
# DPO preparation), so exports leave them out unless asked to keep them.
TRL_RESERVED = ("completion", "label", "chat_template_kwargs")
ROWS_PER_GROUP = 10_000  # rows per Parquet row group, and per conversion batch
TOP_ERRORS = 10
_EMIT_MARK = b'"k":"' + EMIT_OUTPUT.encode() + b'"'


def default_destination(output: Path, fmt: str) -> Path:
    """Next to the output: ``<stem>.parquet``, a folder ``<stem>_hf/``, ``<stem>.sorted.jsonl``."""
    if fmt == "parquet":
        return output.with_suffix(".parquet")
    if fmt == "hf":
        return output.with_name(output.stem + "_hf")
    if fmt == "jsonl":
        return output.with_name(output.stem + ".sorted.jsonl")
    raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")


def export(
    config: RunConfig,
    fmt: str,
    to: Path | None = None,
    *,
    pairs_only: bool = False,
    keep_columns: bool = False,
    config_file: Path | None = None,
    reasoning: str = KEEP,
) -> Path:
    """Write the run's finished rows, in input order, as ``fmt``; return where.

    ``reasoning`` keeps (``keep``), inlines (``inline``: ``<think>`` tags in the
    answer) or drops (``drop``) reasoning traces (engine.output.traces).

    ``pairs_only`` (preference runs) keeps only the rows with a chosen/rejected
    pair. Columns TRL reserves (:data:`TRL_RESERVED`) are left out, and the card
    says so, unless ``keep_columns``. Raises ExportError naming the fix (no run
    yet, a missing extra, a destination that would overwrite something else, such
    as the run's own files or ``config_file``, the config it was read from).
    """
    dest = (to if to is not None else default_destination(config.output, fmt)).absolute()
    if pairs_only and not config.kind.pairs:
        raise ExportError(f"--pairs-only is for preference runs; this run's task is {config.task}")
    if reasoning not in REASONING_MODES:
        raise ExportError(
            f"--reasoning must be one of {', '.join(REASONING_MODES)}, got {reasoning!r}"
        )
    reshape = Reshaper(reasoning, config.task)
    _check_destination(config, fmt, dest, config_file)
    # Missing extras are reported before any work.
    pa = _require("pyarrow", fmt) if fmt != "jsonl" else None
    datasets = _require("datasets", fmt) if fmt == "hf" else None
    out_size = _size(config.output)
    if not has_journal(config.checkpoint_dir):
        raise ExportError(
            f"no run journal in {config.checkpoint_dir}: export needs the run's checkpoint to "
            "put rows in input order; run `turnstile run` first (or point checkpoint_dir: at it)"
        )
    ends = _row_ends(config.checkpoint_dir, out_size)
    if not any(e >= 0 for e in ends):
        raise ExportError(f"nothing to export: {config.output} has no finished rows yet")
    with _mapped(config.output, out_size) as data:
        drop = () if keep_columns else TRL_RESERVED
        if fmt == "jsonl":
            _write_jsonl(_ordered(data, ends), dest, pairs_only, drop, reshape)
            return dest
        schema, json_columns = infer_schema(
            _batches(_ordered(data, ends), pairs_only, drop=drop, reshape=reshape), pa
        )
        if not len(schema):
            raise ExportError("nothing to export: no finished row has a chosen/rejected pair")
        seen = _Seen(pairs_only=pairs_only)
        tables = (
            _table(batch, schema, json_columns, pa)
            for batch in _batches(
                _ordered(data, ends), pairs_only, seen, drop=drop, reshape=reshape
            )
        )
        if fmt == "parquet":
            _write_parquet(tables, schema, dest)
            return dest

        def card(exported: int) -> str:
            counts = _counts(config, exported, ends, seen, list(schema.names), json_columns)
            return card_text(config, counts)

        _write_hf(tables, schema, dest, pa, datasets, card)
    return dest


# -- the order: journal emits -> one end offset per input line -------------------------


def index_rows(emits: Iterable[tuple[int, int]], out_size: int, base: int = 0) -> array[int]:
    """The output's end offset of each input line's row (-1: not in the output).

    ``emits`` are (line, end) in journal order. The last emit of a line wins: a
    line is written again only when an earlier run's write of it was lost, and
    then its earlier end no longer describes the file. An end past ``out_size``
    (the output lost its tail, possible after a power cut) is not in the output.
    ``base`` is the first line a shard's output can hold: the index starts there.
    """
    ends = array("q")
    for line, end in emits:
        line -= base
        if line < 0:
            continue
        if line >= len(ends):
            ends.extend([-1] * (line + 1 - len(ends)))
        ends[line] = end
    for line, end in enumerate(ends):
        if end > out_size:
            ends[line] = -1
    return ends


@contextmanager
def rows_in_order(checkpoint_dir: Path, output: Path, base: int = 0) -> Iterator[Iterator[bytes]]:
    """The finished rows of a run's output (no newline), in input order.

    What a sharded run's merge appends shard by shard; ``base`` is the shard's
    first line. Raises ExportError when the output and journal disagree.
    """
    out_size = _size(output)
    ends = _row_ends(checkpoint_dir, out_size, base)
    with _mapped(output, out_size) as data:
        yield _ordered(data, ends)


def _row_ends(checkpoint_dir: Path, out_size: int, base: int = 0) -> array[int]:
    """index_rows over the checkpoint's emits: its emits index, then its journal segments."""

    def read() -> array[int]:
        pairs, journals = emit_sources(checkpoint_dir)
        flat = iter(pairs)
        indexed = zip(flat, flat, strict=True)
        return index_rows(chain(indexed, *(_emits(j) for j in journals)), out_size, base)

    # A run beside us may take a snapshot and delete a segment we were about to read;
    # its new snapshot and index hold that segment's emits: read again.
    return unlocked_read(read)


def _emits(journal: Path) -> Iterator[tuple[int, int]]:
    for _, raw, complete in iter_lines(journal):
        if not complete or _EMIT_MARK not in raw:
            continue  # most records are turns: skip them without parsing their text
        record, _ = decode(raw)
        if record is None or record["k"] != EMIT_OUTPUT:
            continue  # a torn or damaged record (its checksum fails), as replay drops it
        line, end = record.get("l"), record.get("e")
        if isinstance(line, int) and isinstance(end, int):
            yield line, end


def _ordered(data: Any, ends: array[int]) -> Iterator[bytes]:
    """Each row's bytes (no newline) in input-line order; checks the rows tile the file."""
    total = 0
    last = 0
    for end in ends:
        if end < 0:
            continue
        if end == 0 or data[end - 1 : end] != b"\n":
            raise _disagree(end)
        start = data.rfind(b"\n", 0, end - 1) + 1
        total += end - start
        last = max(last, end)
        yield bytes(data[start : end - 1])
    if total != last:
        # Two lines claim one row, or a row is claimed by none: the journal describes
        # an output that a later run has cut back and not yet finished rewriting.
        raise _disagree(last)


def _disagree(offset: int) -> ExportError:
    return ExportError(
        f"the output and the run's journal disagree near byte {offset} (possible after a "
        "power cut); run `turnstile run` on this config to finish the run, then export again"
    )


@contextmanager
def _mapped(path: Path, size: int) -> Iterator[Any]:
    if size == 0:
        yield b""
        return
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as data:
        yield data


# -- rows -> Arrow ----------------------------------------------------------------------


@dataclass(slots=True)
class _Seen:
    """What the writing pass saw, for the card."""

    unpaired: int = 0  # rows with no chosen/rejected pair (exported or not)
    pairs_only: bool = False
    dropped: set[str] = field(default_factory=set)  # TRL-reserved columns left out


def _batches(
    rows: Iterable[bytes],
    pairs_only: bool,
    seen: _Seen | None = None,
    *,
    drop: Sequence[str] = (),
    reshape: Reshaper | None = None,
) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for raw in rows:
        if has_long_digits(raw):  # exact, as text: Arrow holds no integer past 64 bits
            row = fragments_as_text(loads_exact(raw))
        else:
            row = orjson.loads(raw)
        if reshape is not None and reshape.active:
            row = reshape(row)
        unpaired = "chosen" in row and row["chosen"] is None
        if seen is not None:
            seen.unpaired += unpaired
        if pairs_only and unpaired:
            continue
        for name in drop:
            if name in row:
                del row[name]
                if seen is not None:
                    seen.dropped.add(name)
        batch.append(row)
        if len(batch) >= ROWS_PER_GROUP:
            yield batch
            batch = []
    if batch:
        yield batch


def infer_schema(batches: Iterable[list[dict[str, Any]]], pa: Any) -> tuple[Any, list[str]]:
    """One schema for every batch, and the columns that must be stored as text.

    Columns are in the order their keys first appear. Types are pyarrow's
    inference per batch, unified across batches (null takes any type, an
    integer column meeting floats becomes float, struct fields are merged); a
    column whose types cannot be unified, or that Parquet cannot store (an
    empty struct), is stored as text (see ``_as_text``).
    """
    types: dict[str, Any] = {}
    as_json: set[str] = set()
    for batch in batches:
        names = dict.fromkeys(k for row in batch for k in row)
        for name in names:
            types.setdefault(name, pa.null())
            if name in as_json:
                continue
            try:
                found = pa.array([row.get(name) for row in batch]).type
                unified = (
                    pa.unify_schemas(
                        [pa.schema([(name, types[name])]), pa.schema([(name, found)])],
                        promote_options="permissive",
                    )
                    .field(name)
                    .type
                )
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                as_json.add(name)
                continue
            if _has_empty_struct(unified, pa):
                as_json.add(name)
                continue
            types[name] = unified
    schema = pa.schema([(name, pa.string() if name in as_json else t) for name, t in types.items()])
    return schema, [name for name in types if name in as_json]


def _has_empty_struct(t: Any, pa: Any) -> bool:
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(
            _has_empty_struct(t.field(i).type, pa) for i in range(t.num_fields)
        )
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_empty_struct(t.value_type, pa)
    return False


def _table(batch: list[dict[str, Any]], schema: Any, as_json: Sequence[str], pa: Any) -> Any:
    arrays = []
    for f in schema:
        values = [row.get(f.name) for row in batch]
        if f.name in as_json:
            values = [_as_text(v) for v in values]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
            raise ExportError(f"column {f.name!r}: a value does not fit its type ({exc})") from exc
    return pa.Table.from_arrays(arrays, schema=schema)


def _as_text(value: Any) -> str | None:
    """A value of a column of mixed types: a string as it is (a mixed str/int ``id`` reads
    naturally), anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


# -- writers ----------------------------------------------------------------------------


def _write_jsonl(
    rows: Iterable[bytes],
    dest: Path,
    pairs_only: bool,
    drop: Sequence[str] = (),
    reshape: Reshaper | None = None,
) -> int:
    count = 0
    with _replacing(dest) as tmp, tmp.open("wb") as f:
        for raw in rows:
            traced = reshape is not None and reshape.touches(raw)
            row = loads_exact(raw) if pairs_only or drop or traced else None
            if row is not None:
                if pairs_only and row.get("chosen") is None:
                    continue
                if traced:
                    assert reshape is not None
                    row = reshape(row)
                if traced or any(name in row for name in drop):
                    raw = orjson.dumps({k: v for k, v in row.items() if k not in drop})
            f.write(raw + b"\n")
            count += 1
    return count


def _write_parquet(tables: Iterable[Any], schema: Any, dest: Path) -> int:
    pq = _require("pyarrow.parquet", "parquet")
    count = 0
    with _replacing(dest) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=ROWS_PER_GROUP)
            count += int(table.num_rows)
    return count


def _write_hf(
    tables: Iterable[Any],
    schema: Any,
    dest: Path,
    pa: Any,
    datasets: Any,
    card: Callable[[int], str],
) -> int:
    """An Arrow stream file (the format ``datasets`` keeps on disk), opened memory-mapped
    by ``Dataset.from_file`` and saved with ``save_to_disk``: no copy in memory, no cache.
    ``card`` makes the dataset card's text from the number of rows written."""
    _require("pyarrow.ipc", "hf")
    datasets.disable_progress_bars()
    count = 0
    with _replacing(dest) as tmp:
        stream = tmp.with_name(tmp.name + ".arrow")
        try:
            with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for table in tables:
                    writer.write_table(table, max_chunksize=ROWS_PER_GROUP)
                    count += int(table.num_rows)
            dataset = datasets.Dataset.from_file(str(stream))
            dataset.save_to_disk(str(tmp))
            del dataset
        finally:
            stream.unlink(missing_ok=True)
        (tmp / "README.md").write_text(card(count), encoding="utf-8")
    return count


@contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest``, moved onto it when the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if dest.is_dir():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    finally:
        _remove(tmp)


def _remove_stale(dest: Path) -> None:
    """Remove what an export to ``dest`` that was killed left beside it: its temporary
    file or folder (``.<name>.tmp-<pid>``, with an ``.arrow`` stream for hf) and a
    previous export it had moved aside (``.<name>.old-<pid>``). Those of an export
    still running (its pid alive) are left alone."""
    prefix = f".{dest.name}."
    for path in dest.parent.glob(glob.escape(prefix) + "*-*"):
        kind, _, rest = path.name[len(prefix) :].partition("-")
        pid = rest.removesuffix(".arrow")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from this process's earlier export: stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _check_destination(
    config: RunConfig, fmt: str, dest: Path, config_file: Path | None = None
) -> None:
    """Refuse a destination that would overwrite the run's own files (links and ``..``
    resolved): the input, the config, the checkpoint, the output, failed and filtered
    files, or a folder holding any of them; or something that is not an export."""
    fix = "pick another path (it would overwrite the run's own files)"
    problems = clashes(
        [("--to", dest)],
        input=config.input,
        checkpoint_dir=config.checkpoint_dir,
        config_file=config_file,
        fix=fix,
    )
    own = run_targets(config.output, config.failed_output, config.filtered_output)
    for what, path in own:
        if same_file(dest, path):
            problems.append(f"--to {dest} must not be {what} of this run; {fix}")
    guarded = [config.input, config.checkpoint_dir, *(path for _, path in own)]
    if config_file is not None:
        guarded.append(config_file)
    if not problems and any(inside(path, dest) for path in guarded):
        problems.append(
            f"--to {dest} must not be a folder holding the run's input, output, config or "
            f"checkpoint; {fix}"
        )
    if problems:
        raise ExportError(problems[0])
    if not dest.exists():
        return
    if fmt == "hf":
        if not dest.is_dir() or (any(dest.iterdir()) and not (dest / "state.json").exists()):
            raise ExportError(
                f"--to {dest} exists and is not a saved dataset; remove it or pick another path"
            )
    elif dest.is_dir():
        raise ExportError(f"--to {dest} is a folder; give a file path")


# -- counts for the card ----------------------------------------------------------------


def _counts(
    config: RunConfig,
    exported: int,
    ends: array[int],
    seen: _Seen,
    columns: list[str],
    json_columns: list[str],
) -> Counts:
    failed, errors = _tally(config.failed_output, "error", _error_key)
    filtered, rules = _tally(filtered_path(config.output), FILTER_KEY, rule_of)
    extra: dict[str, Any] = {}
    for key in ("input_columns", "filters"):
        # Optional config sections: shown on the card when the config has them.
        value = getattr(config, key, None)
        if value:
            extra[key] = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return Counts(
        exported=exported,
        rows_ok=sum(1 for e in ends if e >= 0),
        rows_failed=failed,
        rows_filtered=filtered,
        unpaired=seen.unpaired if config.kind.pairs else None,
        input_rows=_input_rows(config),
        top_errors=errors,
        filter_rules=rules,
        json_columns=json_columns,
        columns=columns,
        pairs_only=seen.pairs_only,
        dropped_columns=sorted(seen.dropped),
        extra_config=extra,
    )


def _tally(path: Path, key: str, group: Any) -> tuple[int, list[tuple[str, int]]]:
    """Rows in a JSONL side file, and the most common values of ``key`` (grouped)."""
    if not path.exists():
        return 0, []
    counts: Counter[str] = Counter()
    shown: dict[str, str] = {}
    rows = 0
    for _, raw, complete in iter_lines(path):
        if not complete or not raw.strip():
            continue
        rows += 1
        try:
            value = str(orjson.loads(raw).get(key))
        except (orjson.JSONDecodeError, AttributeError):
            continue
        name = group(value)
        counts[name] += 1
        shown.setdefault(name, value if group is _error_key else name)
    return rows, [(shown[name], n) for name, n in counts.most_common(TOP_ERRORS)]


def _error_key(message: str) -> str:
    """Errors that differ only in numbers (a turn, a line) are one kind of error."""
    return re.sub(r"\d+", "#", message)


def _input_rows(config: RunConfig) -> int | None:
    from engine.input.sources import open_source

    try:
        return open_source(config.input, config.input_columns).count()
    except (OSError, TurnstileError):
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _require(module: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = "hf" if fmt == "hf" else "parquet"
        raise ExportError(
            f"exporting {fmt} needs {module.split('.')[0]}: pip install 'turnstile[{extra}]'"
        ) from exc
