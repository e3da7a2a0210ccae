"""The run config: YAML in, frozen dataclasses out, every problem reported at once.

Parsing collects problems instead of stopping at the first, so a user fixes a
config in one pass. Each problem names its key and the fix.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from engine.batch.settings import BatchSettings, parse_batch
from engine.cache.settings import CacheConfig, parse_cache
from engine.checkpoint.durability import JournalConfig
from engine.checkpoint.paths import clashes, run_targets
from engine.cost import BudgetConfig, Price, parse_budget, parse_price
from engine.errors import ConfigError
from engine.http.reasoning import AUTO, DEFAULT_TAGS, MODES, tags_problem
from engine.http.settings import MAX_REPLY_BYTES  # the one default (max_reply_bytes)
from engine.input.sources import parse_input_columns
from engine.output.filters import FilterConfig, filtered_path, parse_filters
from engine.problems import MOST_CONCURRENCY, MOST_CONVERSATIONS, Problems
from engine.redact import redact_url
from engine.tasks import kind_of, names
from engine.tasks.base import TaskKind

if TYPE_CHECKING:
    from engine.input.sources import Slice

LOCAL = "local"
JSON, YAML = "json", "yaml"  # the syntaxes a config file is read in (parse_document)
FSYNC_MODES = ("interval", "always", "never")


@dataclass(frozen=True, slots=True)
class LocalServerConfig:
    """How to start llama.cpp's server for a model whose ``base_url`` is ``local``."""

    parallel: int | None = None  # server slots; default: the model's max_concurrency
    ctx_size: int = 4096  # tokens of ONE conversation; the KV cache holds `parallel` of them
    threads: int | None = None  # default: the machine's CPU count, split between replicas
    port: int | None = None  # default: a free loopback port (the first replica's, then +1...)
    replicas: int = 1  # llama-servers to start for this model


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One OpenAI-compatible endpoint and how hard to drive it."""

    name: str
    base_urls: tuple[str, ...]  # one URL per replica (a server of this model), or ("local",)
    model: str
    api_key_env: str | None = None
    max_concurrency: int = 16  # per replica
    timeout_s: float = 120.0
    max_retries: int = 6
    params: Mapping[str, Any] = field(default_factory=dict)
    model_path: str | None = None
    local: LocalServerConfig = field(default_factory=LocalServerConfig)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    fail_on_length: bool = False  # a reply cut off by max_tokens fails its row
    down_after_s: float = 300.0  # unreachable this long (every replica out): the model is down
    affinity: bool = True  # a conversation's next turn goes back to the replica of its last
    max_reply_bytes: int = MAX_REPLY_BYTES  # a longer reply fails its request, unread
    reasoning: str = AUTO  # where replies carry a reasoning trace: auto | field | tags | off
    reasoning_tags: tuple[str, str] = DEFAULT_TAGS  # the inline markers around a trace
    batch: BatchSettings | None = None  # requests go through the provider's Batch API
    price: Price | None = None  # USD per million tokens (engine.cost); None: not counted

    @property
    def is_local(self) -> bool:
        return self.base_urls == (LOCAL,)

    @property
    def replica_count(self) -> int:
        return self.local.replicas if self.is_local else len(self.base_urls)

    @property
    def total_concurrency(self) -> int:
        """The most requests in flight to this model: its cap on every replica."""
        return self.max_concurrency * self.replica_count

    def api_key(self) -> str | None:
        """The key, read from the environment at the moment it is needed."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Where the run happens: ``kind`` names an executor (engine.executors.registry:
    local, processes, ray), ``options`` are the keys that executor parsed from the
    section (its own frozen type; None for local), ``raw`` the section as written
    (parsed again for another kind by ``--executor``)."""

    kind: str = "local"
    options: Any = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def override(self, **keys: Any) -> ExecutorConfig:
        """The section with ``keys`` set (``--executor``, ``--shards``), parsed again by
        its executor; raises ConfigError naming the problems."""
        p = Problems()
        section = parse_executor(p, {**self.raw, **keys})
        if p.items:
            raise ConfigError(p.items)
        return section


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics while the run goes: ``http://host:port/metrics`` (port None: off)."""

    port: int | None = None
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class RunConfig:
    config_path: Path
    task: str
    input: Path
    output: Path
    checkpoint_dir: Path
    models: Mapping[str, ModelConfig]
    section: Any = None  # the task's own section, as its TaskKind parsed it
    journal: JournalConfig = field(default_factory=JournalConfig)
    max_conversations: int | None = None  # rows in flight; default from the caps
    shutdown_grace_s: float = 10.0
    progress_interval_s: float = 10.0
    input_columns: Mapping[str, str] = field(default_factory=dict)  # row key -> column
    filters: FilterConfig = field(default_factory=FilterConfig)
    uvloop: bool = True  # run on uvloop where it is installed (the CLI and engine.run)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # A shard of a sharded run reads only this piece of the input (engine.executors).
    piece: Slice | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)  # replies shared by runs
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def failed_output(self) -> Path:
        return failed_path(self.output)

    @property
    def filtered_output(self) -> Path:
        return filtered_path(self.output)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What changes the generated data; resuming with a different value is refused.

        Caps, timeouts, retries, URLs and keys are left out on purpose: moving a
        server or raising a cap mid-run is normal and changes no reply.
        """
        used = sorted(self.models_used())
        fields: dict[str, Any] = {
            "task": self.task,
            "models": {name: _model_fields(self.models[name]) for name in used},
        }
        fields.update(self.task_fields())
        # Only when set, so checkpoints made before these keys existed still resume.
        if self.input_columns:
            fields["input_columns"] = dict(sorted(self.input_columns.items()))
        if self.filters != FilterConfig():
            fields["filters"] = self.filters.as_dict()
        return fields

    @property
    def kind(self) -> TaskKind[Any]:
        return kind_of(self.task)

    def task_fields(self) -> dict[str, Any]:
        """The task's own section as plain values, under the task's name."""
        return {self.task: self.kind.section_fields(self.section)}

    def models_used(self) -> set[str]:
        return self.kind.models_used(self.section) | self.filters.models()


def _model_fields(model: ModelConfig) -> dict[str, Any]:
    """A model's part of the fingerprint. How its replies are split into answer and trace
    changes the data; it is added only when not the default, so checkpoints made before
    ``reasoning`` existed still resume."""
    fields: dict[str, Any] = {"model": model.model, "params": dict(model.params)}
    if model.reasoning != AUTO:
        fields["reasoning"] = model.reasoning
    if model.reasoning_tags != DEFAULT_TAGS:
        fields["reasoning_tags"] = list(model.reasoning_tags)
    return fields


def failed_path(output: Path) -> Path:
    """The failed file of a run writing ``output``: ``<stem>.failed.jsonl`` beside it."""
    return output.with_name(output.stem + ".failed.jsonl")


class _AnyEnv(dict[str, str]):
    """An environment in which every variable is set."""

    def get(self, key: str, default: object = None) -> str:
        return "set"


_TOP_KEYS = (
    "task",
    "input",
    "output",
    "checkpoint_dir",
    "models",
    "journal",
    "executor",
    "metrics",
    "max_conversations",
    "shutdown_grace_s",
    "progress_interval_s",
    "input_columns",
    "filters",
    "uvloop",
    "cache",
    "budget",
)
_MODEL_KEYS = (
    "base_url",
    "model",
    "api_key_env",
    "max_concurrency",
    "timeout_s",
    "max_retries",
    "params",
    "model_path",
    "local",
    "requests_per_minute",
    "tokens_per_minute",
    "fail_on_length",
    "down_after_s",
    "affinity",
    "max_reply_bytes",
    "reasoning",
    "reasoning_tags",
    "price",
    "batch",
)
_LOCAL_KEYS = ("parallel", "ctx_size", "threads", "port", "replicas")
# Model names appear in keys, file names and metric labels: keep them plain.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def load_config(path: str | Path, *, check_env: bool = True) -> RunConfig:
    """Read and validate a config file. Raises ConfigError listing every problem.

    ``check_env`` False skips the check that ``api_key_env`` variables are set
    (for commands that send no request, such as ``turnstile status``).
    """
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{config_path}: cannot read the config file ({exc.strerror})"]) from exc
    try:
        raw = read_document(text)
    except ValueError as exc:
        raise ConfigError([f"{config_path}: {exc}"]) from exc
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{config_path}: the config must be a YAML mapping of keys"])
    problem = size_problem(raw)
    if problem is not None:
        raise ConfigError([f"{config_path}: {problem}"])
    config = parse_config(raw, config_path, None if check_env else _AnyEnv())
    # Only a config read from a file has one to protect (a dict's config_path is made up).
    problems = clashes(
        run_targets(config.output, config.failed_output, config.filtered_output),
        input=config.input,
        checkpoint_dir=config.checkpoint_dir,
        config_file=config_path,
    )
    if problems:
        raise ConfigError([f"output: {problem}" for problem in problems])
    return config


def read_document(text: str) -> Any:
    """A config file's contents: YAML, or JSON (which YAML includes) read as JSON.

    A config a program wrote is usually JSON: reading it with orjson spares a run's
    start the YAML parser (importing and running it: about 20 ms before the first
    request). Text that orjson refuses is YAML's to read
    (flow-style YAML starts with a brace too), and its error says where the problem is.
    Raises ValueError naming what is wrong.
    """
    return parse_document(text)[0]


def parse_document(text: str) -> tuple[Any, str]:
    """``read_document``'s value and the syntax it was read in: ``"json"`` or ``"yaml"``
    (the report shows a config in the syntax it was written in)."""
    if text.lstrip().startswith("{"):
        try:
            return orjson.loads(text), JSON
        except orjson.JSONDecodeError:
            pass
    import yaml

    try:
        return yaml.safe_load(text), YAML
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc


# A config's size once YAML's aliases are expanded (each use of an alias counts in full,
# as it does in the manifest and in every request): far past any real config, well under
# what would hurt. An alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ...) is 2^n values.
MOST_CONFIG_VALUES = 100_000
MOST_CONFIG_TEXT = 16 << 20  # characters of strings and keys


def size_problem(raw: Any) -> str | None:
    """Why a loaded config is too big once expanded (an alias bomb, or an alias that holds
    itself), or None. The walk stops as soon as it is past the bounds."""
    values = text = 0
    stack = [raw]
    while stack:
        node = stack.pop()
        values += 1
        if isinstance(node, Mapping):
            for key, value in node.items():
                text += len(key) if isinstance(key, str) else 0
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, str | bytes):
            text += len(node)
        if values > MOST_CONFIG_VALUES or text > MOST_CONFIG_TEXT:
            return (
                f"the config expands to more than {MOST_CONFIG_VALUES:,} values or "
                f"{MOST_CONFIG_TEXT >> 20} MiB of text once its YAML aliases (*name) are "
                "expanded (an alias used over and over, or one that holds itself); write the "
                "values out, or make them smaller"
            )
    return None


def parse_config(
    raw: Mapping[str, Any], config_path: Path, env: Mapping[str, str] | None = None
) -> RunConfig:
    """Validate a parsed config mapping; ``env`` defaults to the process environment."""
    env = os.environ if env is None else env
    p = Problems()
    kinds = names()
    p.unknown("", raw, (*_TOP_KEYS, *kinds))
    base = config_path.resolve().parent

    task = raw.get("task", "distill")
    if task not in kinds:
        p.add("task", f"must be one of {', '.join(kinds)}, got {task!r}")

    def a_path(key: str, required: bool) -> Path | None:
        value = p.string(key, raw.get(key), required=required, fix=f"set {key}: to a file path")
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    input_path = a_path("input", True)
    output_path = a_path("output", True)
    checkpoint_dir = a_path("checkpoint_dir", False)
    if checkpoint_dir is None:
        checkpoint_dir = Path.cwd() / "checkpoints" / config_path.stem
    if input_path is not None and output_path is not None:
        # Compared resolved (links, '..'): --fresh deletes these files, a run appends to them.
        targets = run_targets(output_path, failed_path(output_path), filtered_path(output_path))
        for problem in clashes(
            targets, input=input_path, checkpoint_dir=checkpoint_dir, config_file=None
        ):
            p.add("output", problem)

    kind = kind_of(task) if task in kinds else None
    models = _parse_models(
        p, raw.get("models"), env, base, model_names=kind.model_names if kind else True
    )

    section = kind.parse_section(raw.get(task), models, p, base) if kind else None
    for other in kinds if kind else ():
        if other != task and raw.get(other) is not None:
            p.add(other, f"only used with task: {other}; remove it or change task")

    journal = _parse_journal(p, raw.get("journal"))
    max_conversations = p.positive_int(
        "max_conversations", raw.get("max_conversations"), None, most=MOST_CONVERSATIONS
    )
    grace = p.positive_float("shutdown_grace_s", raw.get("shutdown_grace_s"), 10.0)
    interval = p.positive_float("progress_interval_s", raw.get("progress_interval_s"), 10.0)
    column_keys = ("id", *(kind.column_keys if kind else ()))
    input_columns = parse_input_columns(raw.get("input_columns"), p, column_keys)
    filters = parse_filters(raw.get("filters"), p, models, base)
    uvloop = raw.get("uvloop", True)
    if not isinstance(uvloop, bool):
        p.add("uvloop", f"must be true or false, got {uvloop!r}")
        uvloop = True
    executor = parse_executor(p, raw.get("executor"))
    metrics = parse_metrics(p, raw.get("metrics"))
    cache = parse_cache(p, raw.get("cache"), base)
    used = kind.models_used(section) if kind is not None and section is not None else set()
    prices = {name: models[name].price for name in used if name in models}
    budget = parse_budget(p, raw.get("budget"), prices)

    if p.items:
        raise ConfigError(p.items)
    assert input_path is not None and output_path is not None
    return RunConfig(
        config_path=config_path,
        task=task,
        input=input_path,
        output=output_path,
        checkpoint_dir=checkpoint_dir,
        models=models,
        section=section,
        journal=journal,
        max_conversations=max_conversations,
        shutdown_grace_s=grace,
        progress_interval_s=interval,
        input_columns=input_columns,
        filters=filters,
        uvloop=uvloop,
        executor=executor,
        metrics=metrics,
        cache=cache,
        budget=budget,
    )


def parse_metrics(p: Problems, raw: Any) -> MetricsConfig:
    """The ``metrics:`` section; problems name the key."""
    body = p.mapping("metrics", raw)
    if body is None:
        return MetricsConfig()
    p.unknown("metrics", body, ("port", "host"))
    port = body.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    ):
        p.add("metrics.port", f"must be a TCP port (1-65535; 0 picks a free one), got {port!r}")
        port = None
    host = p.string("metrics.host", body.get("host"), required=False, fix="e.g. 127.0.0.1")
    return MetricsConfig(port=port, host=host or "127.0.0.1")


def parse_executor(p: Problems, raw: Any) -> ExecutorConfig:
    """The ``executor:`` section; each executor parses its own keys
    (engine.executors.registry); problems name the key."""
    from engine.executors.registry import parse_section

    body = p.mapping("executor", raw)
    if body is None:
        return ExecutorConfig()
    kind, options = parse_section(p, body)
    return ExecutorConfig(kind=kind, options=options, raw=dict(body))


def _parse_models(
    p: Problems, raw: Any, env: Mapping[str, str], base: Path, *, model_names: bool = True
) -> dict[str, ModelConfig]:
    if raw is None:
        p.add("models", "missing; add at least one model, e.g. models: {teacher: {base_url: ...}}")
        return {}
    section = p.mapping("models", raw)
    if section is None:
        return {}
    if not section:
        p.add("models", "is empty; add at least one model")
    models: dict[str, ModelConfig] = {}
    for name, body in section.items():
        if not _MODEL_NAME.fullmatch(str(name)):
            p.add(
                f"models.{name}",
                "a model name may hold only letters, digits, '_', '-' and '.'; rename it "
                f"(e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', str(name)) or 'teacher'!r})",
            )
            continue
        model = _parse_model(p, str(name), body, env, base, model_names=model_names)
        if model is not None:
            models[str(name)] = model
    return models


def _parse_model(
    p: Problems,
    name: str,
    raw: Any,
    env: Mapping[str, str],
    base: Path,
    *,
    model_names: bool = True,
) -> ModelConfig | None:
    key = f"models.{name}"
    body = p.mapping(key, raw)
    if body is None:
        return None
    p.unknown(key, body, _MODEL_KEYS)
    base_urls = _parse_base_urls(p, f"{key}.base_url", body.get("base_url"))
    is_local = base_urls == (LOCAL,)
    model_path = p.string(
        f"{key}.model_path", body.get("model_path"), required=False, fix="a path to a GGUF file"
    )
    if model_path is not None and not Path(model_path).expanduser().is_absolute():
        model_path = str(base / Path(model_path))
    if model_path is not None and not is_local:
        p.add(f"{key}.model_path", "only used with base_url: local; remove it or use local")
    model_name = p.string(
        f"{key}.model",
        body.get("model"),
        required=base_urls is not None and not is_local and model_names,
        fix="set it to the model name the server expects, e.g. model: gpt-4o-mini",
    )
    if model_name is None and is_local:
        model_name = Path(model_path).stem if model_path else "SmolLM2-135M-Instruct"
    elif model_name is None and not model_names:
        model_name = name  # never sent: each request names its own model
    api_key_env = p.string(
        f"{key}.api_key_env",
        body.get("api_key_env"),
        required=False,
        fix="set it to the NAME of an environment variable holding the key",
    )
    if api_key_env is not None and not env.get(api_key_env):
        p.add(
            f"{key}.api_key_env",
            f"environment variable {api_key_env} is not set; export {api_key_env}=... "
            "before running, or remove api_key_env",
        )
    cap = p.positive_int(
        f"{key}.max_concurrency", body.get("max_concurrency"), 16, most=MOST_CONCURRENCY
    )
    timeout = p.positive_float(f"{key}.timeout_s", body.get("timeout_s"), 120.0)
    retries = p.non_negative_int(f"{key}.max_retries", body.get("max_retries"), 6)
    params = p.mapping(f"{key}.params", body.get("params"))
    if params is not None:
        for reserved in ("messages", "model", "stream"):
            if reserved in params:
                p.add(
                    f"{key}.params.{reserved}",
                    "is set by Turnstile itself; remove it from params",
                )
        try:
            orjson.dumps(dict(params))
        except TypeError as exc:
            p.add(f"{key}.params", f"must hold plain JSON values ({exc})")
    rpm = _optional_rate(p, f"{key}.requests_per_minute", body.get("requests_per_minute"))
    tpm = _optional_rate(p, f"{key}.tokens_per_minute", body.get("tokens_per_minute"))
    fail_on_length = body.get("fail_on_length", False)
    if not isinstance(fail_on_length, bool):
        p.add(f"{key}.fail_on_length", f"must be true or false, got {fail_on_length!r}")
        fail_on_length = False
    down_after_s = p.positive_float(f"{key}.down_after_s", body.get("down_after_s"), 300.0)
    max_reply = p.positive_int(
        f"{key}.max_reply_bytes", body.get("max_reply_bytes"), MAX_REPLY_BYTES
    )
    if api_key_env is not None and any(_has_user(url) for url in base_urls or ()):
        p.add(
            f"{key}.base_url",
            "carries a user and password, and api_key_env is set too: a request has one "
            "Authorization header; remove the credentials from the URL or api_key_env",
        )
    affinity = body.get("affinity", True)
    if not isinstance(affinity, bool):
        p.add(f"{key}.affinity", f"must be true or false, got {affinity!r}")
        affinity = True
    reasoning, reasoning_tags = _parse_reasoning(p, key, body)
    batch = parse_batch(p, f"{key}.batch", body.get("batch"))
    if batch is not None and is_local:
        p.add(f"{key}.batch", "a local server has no Batch API; remove batch or base_url: local")
    local = _parse_local(p, f"{key}.local", body.get("local"))
    price = parse_price(p, f"{key}.price", body.get("price"))
    if body.get("local") is not None and not is_local:
        p.add(f"{key}.local", "only used with base_url: local; remove it or use local")
    if base_urls is None or model_name is None or params is None:
        return None
    return ModelConfig(
        name=name,
        base_urls=base_urls,
        model=model_name,
        api_key_env=api_key_env,
        max_concurrency=cap or 16,
        timeout_s=timeout,
        max_retries=retries,
        params=dict(params),
        model_path=model_path,
        local=local,
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        fail_on_length=fail_on_length,
        down_after_s=down_after_s,
        affinity=affinity,
        max_reply_bytes=max_reply or MAX_REPLY_BYTES,
        reasoning=reasoning,
        reasoning_tags=reasoning_tags,
        price=price,
        batch=batch,
    )


def _has_user(url: str) -> bool:
    """Whether a URL carries a user (and password): ``http://user:pass@host/v1``."""
    try:
        return urlsplit(url).username is not None
    except ValueError:
        return False  # a URL this broken is reported by _parse_base_urls


def _parse_reasoning(p: Problems, key: str, body: Mapping[str, Any]) -> tuple[str, tuple[str, str]]:
    """``reasoning`` (where replies carry their trace) and ``reasoning_tags``."""
    mode = body.get("reasoning", AUTO)
    if mode not in MODES:
        p.add(
            f"{key}.reasoning",
            f"must be one of {' | '.join(MODES)}, got {mode!r} (auto: the reasoning_content or "
            "reasoning field, else <think> tags; off: the content as it comes)",
        )
        mode = AUTO
    raw_tags = body.get("reasoning_tags")
    if raw_tags is None:
        return mode, DEFAULT_TAGS
    problem = tags_problem(raw_tags)
    if problem is not None:
        p.add(f"{key}.reasoning_tags", problem)
        return mode, DEFAULT_TAGS
    return mode, (raw_tags[0], raw_tags[1])


_URL_FIX = (
    "set it to the server's OpenAI-compatible URL, e.g. http://127.0.0.1:8080/v1, to a list of "
    "such URLs (replicas of one model), or to 'local' for the built-in llama.cpp server"
)


def _parse_base_urls(p: Problems, key: str, value: Any) -> tuple[str, ...] | None:
    """``base_url``: one URL, a list of replica URLs, or ``local``."""
    if isinstance(value, list):
        if not value:
            p.add(key, f"is an empty list; {_URL_FIX}")
            return None
        items = [(f"{key}[{i}]", item) for i, item in enumerate(value)]
    else:
        items = [(key, value)]
    urls: list[str] = []
    for item_key, item in items:
        url = p.string(item_key, item, required=True, fix=_URL_FIX)
        if url is None:
            continue
        if url == LOCAL:
            if len(items) > 1:
                p.add(item_key, "'local' cannot be one of several URLs; use local: {replicas: N}")
            urls.append(url)
            continue
        problem = url_problem(url)
        if problem is not None:
            shown = redact_url(url)  # a config error is printed: no password in it
            p.add(item_key, f"{shown!r} {problem}; write it like http://127.0.0.1:8080/v1")
        urls.append(url.rstrip("/"))
    if len(set(urls)) != len(urls):
        p.add(key, "lists a URL twice; each replica once")
    return tuple(urls) if len(urls) == len(items) else None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a server's base URL (caught here, not at the first request)."""
    if any(c.isspace() for c in url):
        return "is not an http(s) URL: it holds a space (remove it)"
    if not url.startswith(("http://", "https://")):
        return "is not an http(s) URL"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError past 65535 or when not a number
    except ValueError as exc:
        return f"is not an http(s) URL: {exc} (a port is 1-65535)"
    if not parts.hostname:
        return "is not an http(s) URL: it names no host"
    if port == 0:
        return "is not an http(s) URL: port 0 (a port is 1-65535)"
    return None


def _optional_rate(p: Problems, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        p.add(key, f"must be a positive number per minute, got {value!r}")
        return None
    return float(value)


def _parse_local(p: Problems, key: str, raw: Any) -> LocalServerConfig:
    body = p.mapping(key, raw)
    if body is None:
        return LocalServerConfig()
    p.unknown(key, body, _LOCAL_KEYS)
    port = p.positive_int(f"{key}.port", body.get("port"), None)
    if port is not None and port > 65535:
        p.add(f"{key}.port", f"must be a TCP port (1-65535), got {port}")
    return LocalServerConfig(
        parallel=p.positive_int(f"{key}.parallel", body.get("parallel"), None),
        ctx_size=p.positive_int(f"{key}.ctx_size", body.get("ctx_size"), 4096) or 4096,
        threads=p.positive_int(f"{key}.threads", body.get("threads"), None),
        port=port,
        replicas=p.positive_int(f"{key}.replicas", body.get("replicas"), 1) or 1,
    )


def _parse_journal(p: Problems, raw: Any) -> JournalConfig:
    body = p.mapping("journal", raw)
    if body is None:
        return JournalConfig()
    p.unknown("journal", body, ("fsync", "fsync_interval_s"))
    fsync = body.get("fsync", "interval")
    if fsync not in FSYNC_MODES:
        p.add("journal.fsync", f"must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        fsync = "interval"
    interval = p.positive_float("journal.fsync_interval_s", body.get("fsync_interval_s"), 1.0)
    return JournalConfig(fsync=fsync, fsync_interval_s=interval)
