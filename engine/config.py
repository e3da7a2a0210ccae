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
from typing import Any

import orjson
import yaml

from engine.dialogue import EVERY_USER, TURN_RULES, TurnRule
from engine.errors import ConfigError
from engine.filters import FilterConfig, filtered_path, parse_filters
from engine.judge import ASPECTS
from engine.sources import parse_input_columns

LOCAL = "local"
FSYNC_MODES = ("interval", "always", "never")
TASKS = ("distill", "preference")


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
class DistillConfig:
    model: str
    system_prompt: str | None = None
    turns: TurnRule = EVERY_USER  # which user messages get a reply of their own


@dataclass(frozen=True, slots=True)
class PreferenceConfig:
    generators: tuple[str, ...]
    num_generations: int = 1
    judge: str | None = None
    aspect: str = "overall"


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Durability of the journal.

    ``interval`` (default) fsyncs at most every ``fsync_interval_s`` seconds:
    a SIGKILL loses nothing (writes reach the OS before the next turn is
    requested); a power cut loses at most that interval. ``always`` fsyncs
    every group write; ``never`` leaves it to the OS.
    """

    fsync: str = "interval"
    fsync_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class RunConfig:
    config_path: Path
    task: str
    input: Path
    output: Path
    checkpoint_dir: Path
    models: Mapping[str, ModelConfig]
    distill: DistillConfig | None = None
    preference: PreferenceConfig | None = None
    journal: JournalConfig = field(default_factory=JournalConfig)
    max_conversations: int | None = None  # rows in flight; default from the caps
    shutdown_grace_s: float = 10.0
    progress_interval_s: float = 10.0
    input_columns: Mapping[str, str] = field(default_factory=dict)  # row key -> column
    filters: FilterConfig = field(default_factory=FilterConfig)

    @property
    def failed_output(self) -> Path:
        return self.output.with_name(self.output.stem + ".failed.jsonl")

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
            "models": {
                name: {"model": self.models[name].model, "params": dict(self.models[name].params)}
                for name in used
            },
        }
        fields.update(self.task_fields())
        # Only when set, so checkpoints made before these keys existed still resume.
        if self.input_columns:
            fields["input_columns"] = dict(sorted(self.input_columns.items()))
        if self.filters != FilterConfig():
            fields["filters"] = self.filters.as_dict()
        return fields

    def task_fields(self) -> dict[str, Any]:
        """The task's own section (``distill`` or ``preference``) as plain values."""
        if self.distill is not None:
            return {
                "distill": {
                    "model": self.distill.model,
                    "system_prompt": self.distill.system_prompt,
                    "turns": self.distill.turns,
                }
            }
        if self.preference is not None:
            p = self.preference
            return {
                "preference": {
                    "generators": list(p.generators),
                    "num_generations": p.num_generations,
                    "judge": p.judge,
                    "aspect": p.aspect,
                }
            }
        return {}

    def models_used(self) -> set[str]:
        if self.distill is not None:
            return {self.distill.model}
        if self.preference is not None:
            used = set(self.preference.generators)
            if self.preference.judge:
                used.add(self.preference.judge)
            return used
        return set()


class _Problems:
    """Collects problems while parsing, so every one is reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")

    def unknown(self, key: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for name in raw:
            if name not in allowed:
                self.add(
                    f"{key}.{name}" if key else str(name),
                    f"unknown key; allowed keys here: {', '.join(allowed)}",
                )

    def mapping(self, key: str, value: Any) -> Mapping[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(key, f"must be a mapping of keys, got {type(value).__name__}")
            return None
        return value

    def positive_int(self, key: str, value: Any, default: int | None) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.add(key, f"must be a positive whole number, got {value!r}")
            return default
        return value

    def non_negative_int(self, key: str, value: Any, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.add(key, f"must be a whole number >= 0, got {value!r}")
            return default
        return value

    def positive_float(self, key: str, value: Any, default: float) -> float:
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            self.add(key, f"must be a positive number of seconds, got {value!r}")
            return default
        return float(value)

    def string(self, key: str, value: Any, *, required: bool, fix: str) -> str | None:
        if value is None:
            if required:
                self.add(key, f"missing; {fix}")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(key, f"must be a non-empty string; {fix}")
            return None
        return value


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
    "distill",
    "preference",
    "journal",
    "max_conversations",
    "shutdown_grace_s",
    "progress_interval_s",
    "input_columns",
    "filters",
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
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{config_path}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{config_path}: the config must be a YAML mapping of keys"])
    return parse_config(raw, config_path, None if check_env else _AnyEnv())


def parse_config(
    raw: Mapping[str, Any], config_path: Path, env: Mapping[str, str] | None = None
) -> RunConfig:
    """Validate a parsed config mapping; ``env`` defaults to the process environment."""
    env = os.environ if env is None else env
    p = _Problems()
    p.unknown("", raw, _TOP_KEYS)
    base = config_path.resolve().parent

    task = raw.get("task", "distill")
    if task not in TASKS:
        p.add("task", f"must be one of {', '.join(TASKS)}, got {task!r}")

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
    if input_path is not None and output_path is not None and input_path == output_path:
        p.add("output", "must not be the input file; pick another path")

    models = _parse_models(p, raw.get("models"), env, base)

    distill = None
    preference = None
    if task == "distill":
        distill = _parse_distill(p, raw.get("distill"), models)
        if raw.get("preference") is not None:
            p.add("preference", "only used with task: preference; remove it or change task")
    elif task == "preference":
        preference = _parse_preference(p, raw.get("preference"), models)
        if raw.get("distill") is not None:
            p.add("distill", "only used with task: distill; remove it or change task")

    journal = _parse_journal(p, raw.get("journal"))
    max_conversations = p.positive_int("max_conversations", raw.get("max_conversations"), None)
    grace = p.positive_float("shutdown_grace_s", raw.get("shutdown_grace_s"), 10.0)
    interval = p.positive_float("progress_interval_s", raw.get("progress_interval_s"), 10.0)
    input_columns = parse_input_columns(raw.get("input_columns"), p)
    filters = parse_filters(raw.get("filters"), p)

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
        distill=distill,
        preference=preference,
        journal=journal,
        max_conversations=max_conversations,
        shutdown_grace_s=grace,
        progress_interval_s=interval,
        input_columns=input_columns,
        filters=filters,
    )


def _parse_models(
    p: _Problems, raw: Any, env: Mapping[str, str], base: Path
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
        model = _parse_model(p, str(name), body, env, base)
        if model is not None:
            models[str(name)] = model
    return models


def _parse_model(
    p: _Problems, name: str, raw: Any, env: Mapping[str, str], base: Path
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
        required=base_urls is not None and not is_local,
        fix="set it to the model name the server expects, e.g. model: gpt-4o-mini",
    )
    if model_name is None and is_local:
        model_name = Path(model_path).stem if model_path else "SmolLM2-135M-Instruct"
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
    cap = p.positive_int(f"{key}.max_concurrency", body.get("max_concurrency"), 16)
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
    affinity = body.get("affinity", True)
    if not isinstance(affinity, bool):
        p.add(f"{key}.affinity", f"must be true or false, got {affinity!r}")
        affinity = True
    local = _parse_local(p, f"{key}.local", body.get("local"))
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
    )


_URL_FIX = (
    "set it to the server's OpenAI-compatible URL, e.g. http://127.0.0.1:8080/v1, to a list of "
    "such URLs (replicas of one model), or to 'local' for the built-in llama.cpp server"
)


def _parse_base_urls(p: _Problems, key: str, value: Any) -> tuple[str, ...] | None:
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
        if not url.startswith(("http://", "https://")) or not url.split("://", 1)[1]:
            p.add(
                item_key, f"{url!r} is not an http(s) URL; write it like http://127.0.0.1:8080/v1"
            )
        urls.append(url.rstrip("/"))
    if len(set(urls)) != len(urls):
        p.add(key, "lists a URL twice; each replica once")
    return tuple(urls) if len(urls) == len(items) else None


def _optional_rate(p: _Problems, key: str, value: Any) -> float | None:
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


def _parse_local(p: _Problems, key: str, raw: Any) -> LocalServerConfig:
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


def _model_ref(p: _Problems, key: str, value: Any, models: Mapping[str, ModelConfig]) -> str | None:
    name = p.string(key, value, required=True, fix="name one of the models under models:")
    if name is not None and models and name not in models:
        known = ", ".join(sorted(models)) or "none"
        p.add(key, f"model {name!r} is not defined under models: (defined: {known})")
    return name


def _parse_distill(
    p: _Problems, raw: Any, models: Mapping[str, ModelConfig]
) -> DistillConfig | None:
    if raw is None:
        p.add("distill", "missing; add distill: {model: <a name under models>}")
        return None
    body = p.mapping("distill", raw)
    if body is None:
        return None
    p.unknown("distill", body, ("model", "system_prompt", "turns"))
    model = _model_ref(p, "distill.model", body.get("model"), models)
    system_prompt = body.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        p.add("distill.system_prompt", "must be a string or null")
        system_prompt = None
    turns = body.get("turns", EVERY_USER)
    if turns not in TURN_RULES:
        p.add(
            "distill.turns",
            f"must be one of {', '.join(TURN_RULES)}, got {turns!r} (every_user: each user "
            "message gets its own reply; as_in_input: the input's assistant messages mark "
            "where a turn ends)",
        )
        turns = EVERY_USER
    if not model:
        return None
    return DistillConfig(model=model, system_prompt=system_prompt, turns=turns)


def _parse_preference(
    p: _Problems, raw: Any, models: Mapping[str, ModelConfig]
) -> PreferenceConfig | None:
    if raw is None:
        p.add("preference", "missing; add preference: {generators: [a, b], judge: judge}")
        return None
    body = p.mapping("preference", raw)
    if body is None:
        return None
    p.unknown("preference", body, ("generators", "num_generations", "judge", "aspect"))
    generators_raw = body.get("generators")
    generators: list[str] = []
    if not isinstance(generators_raw, list) or not generators_raw:
        p.add("preference.generators", "must be a non-empty list of model names, e.g. [a, b]")
    else:
        for i, item in enumerate(generators_raw):
            name = _model_ref(p, f"preference.generators[{i}]", item, models)
            if name is not None:
                generators.append(name)
        if len(set(generators)) != len(generators):
            p.add("preference.generators", "lists a model twice; use num_generations instead")
    num = p.positive_int("preference.num_generations", body.get("num_generations"), 1) or 1
    judge = None
    if body.get("judge") is not None:
        judge = _model_ref(p, "preference.judge", body.get("judge"), models)
    aspect = body.get("aspect", "overall")
    if aspect not in ASPECTS:
        p.add("preference.aspect", f"must be one of {', '.join(ASPECTS)}, got {aspect!r}")
        aspect = "overall"
    return PreferenceConfig(
        generators=tuple(generators), num_generations=num, judge=judge, aspect=aspect
    )


def _parse_journal(p: _Problems, raw: Any) -> JournalConfig:
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
