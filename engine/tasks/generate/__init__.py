"""Templated generation: each row's columns fill a prompt template, a model answers it.

``task: generate``. Rows need no messages: any columns will do. The section, the
fingerprint, the filters' view and the card live here; the runner is
``engine.tasks.generate.task``, the sandboxed template ``template``, structured
replies ``schema``, a row's replies ``attempts``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from engine.output.filters import Reply, ints_of, list_of
from engine.problems import MOST_GENERATIONS
from engine.tasks.base import Task, TaskKind
from engine.tasks.structured import plain_schema, reference_problem, schema_problem
from engine.tasks.templates import BadTemplate, compile_template

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.problems import Problems

TRUNCATED_KEY = "truncated_generations"
REASONING_KEY = "reasoning"  # each generation's trace, parallel to generations
_KEYS = (
    "model",
    "template",
    "template_file",
    "system_prompt",
    "num_generations",
    "json_schema",
    "max_invalid",
)
_TEMPLATE_FIX = (
    "set generate.template to a Jinja2 template (the row's columns are its variables, e.g. "
    "'Write a question about {{ topic }}.'), or generate.template_file to a file holding one"
)


@dataclass(frozen=True, slots=True)
class GenerateConfig:
    model: str
    template: str  # the text, also when it came from template_file
    template_file: str | None = None  # where the text came from, as the config says
    system_prompt: str | None = None
    num_generations: int = 1
    json_schema: Mapping[str, Any] | None = None  # replies must be JSON that fits it
    max_invalid: int = 2  # invalid replies re-requested per generation before the row fails


class Generate(TaskKind[GenerateConfig]):
    name = "generate"
    section_type = GenerateConfig
    tags = ("generation",)
    column_keys = ()  # the template reads any column; input_columns may only map `id`

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> GenerateConfig | None:
        example = "{model: <a name under models>, template: ...}"
        body = p.section("generate", raw, _KEYS, example)
        if body is None:
            return None
        model = p.model_ref("generate.model", body.get("model"), models)
        template = _template(body, p, base)
        system_prompt = body.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            p.add("generate.system_prompt", "must be a string or null")
            system_prompt = None
        num = (
            p.positive_int(
                "generate.num_generations", body.get("num_generations"), 1, most=MOST_GENERATIONS
            )
            or 1
        )
        max_invalid = p.non_negative_int("generate.max_invalid", body.get("max_invalid"), 2)
        schema = _schema(body.get("json_schema"), p)
        if model is None or template is None:
            return None
        return GenerateConfig(
            model=model,
            template=template,
            template_file=body.get("template_file"),
            system_prompt=system_prompt,
            num_generations=num,
            json_schema=schema,
            max_invalid=max_invalid,
        )

    def section_fields(self, section: GenerateConfig) -> dict[str, Any]:
        return {
            "model": section.model,
            "template": section.template,
            "system_prompt": section.system_prompt,
            "num_generations": section.num_generations,
            "json_schema": None if section.json_schema is None else dict(section.json_schema),
            "max_invalid": section.max_invalid,
        }

    def models_used(self, section: GenerateConfig) -> set[str]:
        return {section.model}

    def build(self, config: RunConfig) -> Task:
        from engine.tasks.generate.task import GenerateTask

        return GenerateTask(config)

    def card_text(self, config: RunConfig) -> str:
        g = self.section(config)
        served = config.models[g.model].model
        system = " after a system prompt" if g.system_prompt else ""
        shape = (
            "each reply JSON that fits the config's `json_schema` (asked for as structured "
            f"output, checked here, an invalid reply re-requested up to {g.max_invalid} times)"
            if g.json_schema is not None
            else "free text, no schema"
        )
        return (
            f"Templated generation: each input row filled {_describe_template(g)}, sent as one "
            f"user turn{system} to `{served}` for {g.num_generations} generation(s) per row; "
            f"{shape}."
        )

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        g = self.section(config)
        held = (
            "JSON values parsed from the replies, each valid against the config's `json_schema`"
            if g.json_schema is not None
            else "strings"
        )
        return (
            "`prompt` is the request as sent, a list of `{role, content}` messages (the system "
            "prompt, if any, then the rendered template as the user turn). `generations` holds "
            f"the model's replies, one per generation, as {held}. The input's columns come "
            "first, unchanged. Rows are in input order."
        )

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        """Each generation: a string as it is, a parsed object as compact JSON text."""
        truncated = ints_of(row.get(TRUNCATED_KEY))
        for i, generation in enumerate(list_of(row.get("generations"))):
            yield Reply(_text(generation), f"generation {i}", None, i in truncated)


def _template(body: Mapping[str, Any], p: Problems, base: Path) -> str | None:
    """The template's text from ``template`` or ``template_file``, compiled once to check it."""
    inline, file = body.get("template"), body.get("template_file")
    if inline is not None and file is not None:
        p.add("generate.template", "and generate.template_file are both set; keep one of them")
        return None
    if inline is None and file is None:
        p.add("generate.template", f"missing; {_TEMPLATE_FIX}")
        return None
    if inline is not None:
        key = "generate.template"
        text = p.string(key, inline, required=True, fix=_TEMPLATE_FIX)
        where = ""
    else:
        key = "generate.template_file"
        name = p.string(key, file, required=True, fix="set it to a template file's path")
        if name is None:
            return None
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        where = f"{path}: "
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            p.add(key, f"cannot read {path} ({exc.strerror or exc}); fix the path")
            return None
        except UnicodeDecodeError:
            p.add(key, f"{path} is not UTF-8 text; re-encode it as UTF-8")
            return None
        if not text.strip():
            p.add(key, f"{path} is empty; write the template in it")
            return None
    if text is None:
        return None
    try:
        compile_template(text)
    except BadTemplate as exc:
        p.add(key, f"{where}the template does not compile: {exc}")
        return None
    return text


def _schema(raw: Any, p: Problems) -> dict[str, Any] | None:
    key = "generate.json_schema"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        p.add(
            key,
            f"must be a mapping (a JSON Schema, e.g. {{type: object, properties: {{...}}}}), "
            f"got {type(raw).__name__}",
        )
        return None
    try:
        schema = plain_schema(raw)
    except TypeError as exc:
        p.add(key, f"must hold plain JSON values, with string keys ({exc})")
        return None
    problem = schema_problem(schema)
    if problem is not None:
        p.add(key, f"is not a valid JSON Schema: {problem}")
        return None
    problem = reference_problem(schema)
    if problem is not None:
        p.add(key, problem)
        return None
    return schema


def _describe_template(g: GenerateConfig) -> str:
    text = g.template.strip()
    if "\n" not in text and "`" not in text and len(text) <= 200:
        return f"the Jinja2 template `{text}`"
    lines = len(text.splitlines())
    source = f" from `{g.template_file}`" if g.template_file else ""
    return f"a {lines}-line Jinja2 template{source} (its text is in the config below)"


def _text(generation: Any) -> str:
    if isinstance(generation, str):
        return generation
    try:
        return orjson.dumps(generation).decode()
    except TypeError:
        return str(generation)


KIND = Generate()
