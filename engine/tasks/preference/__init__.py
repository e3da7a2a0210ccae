"""Preference data from a pool of models: generate, judge, pair.

``task: preference``. The section, the fingerprint, the filters' view and the
card live here; the runner is ``engine.tasks.preference.task``, the judge's
UltraFeedback prompt and reply parser ``judge``, its JSON ratings
``judge_json``, a judge prompt of the user's own ``judge_template``, pairwise
verdicts in both orders and their round robin ``pairwise``, the pairing and the
output row ``pairs``.

Rows may bring generations of their own (``generations``, with
``generation_models``): they are judged with the generators' (theirs first),
and with no generators the judge alone runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.output.filters import FilterConfig, Reply, ints_of, list_of, messages_of, text_of
from engine.problems import MOST_GENERATIONS
from engine.tasks.base import Task, TaskKind
from engine.tasks.preference.judge import ASPECTS, JSON, JUDGE_FORMATS, PAIRWISE, ULTRAFEEDBACK
from engine.tasks.preference.judge_template import PAIRWISE_VARIABLES, VARIABLES, read_template
from engine.tasks.preference.pairs import JUDGEMENTS_KEY, TRUNCATED_KEY
from engine.tasks.preference.pairwise import ON_DISAGREE, TIE_ON_DISAGREE, flip_rate, flips_of
from engine.tasks.templates import BadTemplate

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.problems import Problems


_KEYS = (
    "generators",
    "num_generations",
    "judge",
    "aspect",
    "judge_template",
    "judge_format",
    "pairwise",
)
_PAIRWISE_KEYS = ("swap", "template", "on_disagree")
# Row keys a row brings its own generations under (input_columns may map onto them).
BROUGHT_KEYS = ("generations", "generation_models")


@dataclass(frozen=True, slots=True)
class PreferenceConfig:
    generators: tuple[str, ...] = ()  # empty: only the input's own generations are judged
    num_generations: int = 1
    judge: str | None = None
    aspect: str = "overall"
    judge_template: str | None = None  # the template file, as the config names it
    judge_template_text: str | None = None  # its text, read and checked with the config
    judge_format: str = ULTRAFEEDBACK
    pairwise: PairwiseConfig | None = None  # set with judge_format: pairwise


@dataclass(frozen=True, slots=True)
class PairwiseConfig:
    """``preference.pairwise``: judge each pair in both orders (``swap``), with the
    built-in prompt or a template file's (``template``, its text in ``template_text``),
    and what an order-dependent verdict becomes (``on_disagree``: tie | drop)."""

    swap: bool = True
    template: str | None = None
    template_text: str | None = None
    on_disagree: str = TIE_ON_DISAGREE

    def fields(self) -> dict[str, Any]:
        return {"swap": self.swap, "template": self.template_text, "on_disagree": self.on_disagree}


class Preference(TaskKind[PreferenceConfig]):
    name = "preference"
    section_type = PreferenceConfig
    tags = ("preference", "dpo")
    column_keys = ("messages", "conversations", "prompt", *BROUGHT_KEYS)
    pairs = True

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
    ) -> PreferenceConfig | None:
        body = p.section("preference", raw, _KEYS, "{generators: [a, b], judge: judge}")
        if body is None:
            return None
        has_judge = body.get("judge") is not None
        judge = p.model_ref("preference.judge", body.get("judge"), models) if has_judge else None
        generators = _generators(body.get("generators"), models, p, judged=has_judge)
        num = (
            p.positive_int(
                "preference.num_generations", body.get("num_generations"), 1, most=MOST_GENERATIONS
            )
            or 1
        )
        aspect = body.get("aspect", "overall")
        if aspect not in ASPECTS:
            p.add("preference.aspect", f"must be one of {', '.join(ASPECTS)}, got {aspect!r}")
            aspect = "overall"
        judge_format = body.get("judge_format")
        if judge_format is None:
            judge_format = ULTRAFEEDBACK
        elif judge_format not in JUDGE_FORMATS:
            p.add(
                "preference.judge_format",
                f"must be one of {' | '.join(JUDGE_FORMATS)}, got {judge_format!r}",
            )
            judge_format = ULTRAFEEDBACK
        template, text = _judge_template(body.get("judge_template"), p, base)
        pairwise = None
        if judge_format == PAIRWISE:
            pairwise = _pairwise(body.get("pairwise"), p, base)
            if template is not None:
                p.add(
                    "preference.judge_template",
                    "rates every candidate at once; a pairwise judge takes "
                    "preference.pairwise.template (variables: prompt, a, b)",
                )
        elif body.get("pairwise") is not None:
            p.add(
                "preference.pairwise",
                "is only read with judge_format: pairwise; set that, or remove it",
            )
        if not has_judge:
            for key in ("judge_template", "judge_format"):
                if body.get(key) is not None:
                    p.add(
                        f"preference.{key}",
                        "is set but there is no preference.judge to use it; "
                        "add judge: <a model under models:>, or remove it",
                    )
        return PreferenceConfig(
            generators=tuple(generators),
            num_generations=num,
            judge=judge,
            aspect=aspect,
            judge_template=template,
            judge_template_text=text,
            judge_format=judge_format,
            pairwise=pairwise,
        )

    def section_fields(self, section: PreferenceConfig) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "generators": list(section.generators),
            "num_generations": section.num_generations,
            "judge": section.judge,
            "aspect": section.aspect,
        }
        # Only when set, so checkpoints made before these keys existed still resume.
        # The template's text, not its path, decides the judge's replies: moving the
        # file is fine, editing it is a change.
        if section.judge_template_text is not None:
            fields["judge_template"] = section.judge_template_text
        if section.judge_format != ULTRAFEEDBACK:
            fields["judge_format"] = section.judge_format
        if section.pairwise is not None:
            fields["pairwise"] = section.pairwise.fields()
        return fields

    def models_used(self, section: PreferenceConfig) -> set[str]:
        used = set(section.generators)
        if section.judge:
            used.add(section.judge)
        return used

    def build(self, config: RunConfig) -> Task:
        from engine.tasks.preference.task import PreferenceTask

        return PreferenceTask(config)

    def card_text(self, config: RunConfig) -> str:
        p = self.section(config)
        brings = "generations" in config.input_columns
        if p.generators:
            makers = ", ".join(f"`{config.models[g].model}`" for g in p.generators)
            made = f"each prompt went to {makers} ({p.num_generations} generation(s) each)"
            if brings:
                made += (
                    f"; the generations an input row brought (column "
                    f"`{config.input_columns['generations']}`) come first"
                )
        else:
            column = config.input_columns.get("generations", "generations")
            made = f"the generations came with the input (column `{column}`), none were made"
        if p.judge and p.pairwise is not None:
            judge = f"`{config.models[p.judge].model}` {_pairwise_card(p.pairwise)}"
        elif p.judge:
            judge = (
                f"`{config.models[p.judge].model}` rated them together ({_judged_by(p)}); "
                "chosen is the highest rating, rejected the lowest"
            )
        else:
            judge = "no judge was configured, so no row has a pair"
        return f"Preference pairs: {made}; {judge}."

    def card_usage(self, config: RunConfig, *, pairs_only: bool) -> str:
        text = (
            "`prompt`, `chosen` and `rejected` are lists of `{role, content}` messages: TRL's "
            "conversational preference format, ready for `DPOTrainer` and `ORPOTrainer`. "
            "Rows are in input order.\n"
        )
        if pairs_only:
            return text + (
                "Exported with `--pairs-only`: rows with no pair are left out of this dataset."
            )
        return text + (
            "Rows with no pair have null `chosen` and `rejected`, and `pair_error` says why; "
            "drop them before training (`dataset.filter(lambda r: r['chosen'] is not None)`), "
            "or export with `--pairs-only`."
        )

    def replies(self, row: Mapping[str, Any]) -> Iterator[Reply]:
        """The chosen and rejected replies (a pair is only as good as its worse half), or
        every generation when the row has no pair."""
        previous = None
        for message in messages_of(row.get("prompt")):
            if message.get("role") == "assistant":
                previous = text_of(message)
        generations = [g if isinstance(g, str) else None for g in list_of(row.get("generations"))]
        cut_at = ints_of(row.get(TRUNCATED_KEY))
        cut = {generations[i] for i in cut_at if i < len(generations)}
        chosen, rejected = _pair_texts(row)
        if chosen is not None:
            pair: tuple[tuple[str, str], ...] = (("chosen", chosen), ("rejected", rejected or ""))
            for name, text in pair:
                model = row.get(f"{name}_model")
                where = f"{name} ({model})" if isinstance(model, str) else name
                yield Reply(text, where, previous, text in cut)
            return
        for i, generation in enumerate(generations):
            if generation is not None:  # a failed generation is recorded, not offered
                yield Reply(generation, f"generation {i}", previous, i in cut_at)

    def row_problem(self, row: Mapping[str, Any], cfg: FilterConfig) -> str | None:
        if cfg.same_as_previous:
            chosen, rejected = _pair_texts(row)
            if chosen is not None and chosen.strip() == (rejected or "").strip():
                return "same_as_previous: chosen and rejected are identical"
        return None

    def is_paired(self, row: Mapping[str, Any]) -> bool:
        return _pair_texts(row)[0] is not None

    def status_lines(self, config: RunConfig) -> list[str]:
        """The pairwise judge's flip rate over the rows written so far (output and
        filtered files): verdicts that changed with the order, over pairs judged in both."""
        section = self.section(config)
        if section.judge is None or section.pairwise is None or not section.pairwise.swap:
            return []
        flipped = both = 0
        for path in (config.output, config.filtered_output):
            f, b = _file_flips(path)
            flipped, both = flipped + f, both + b
        return [f"flip rate:  {section.judge}: {flip_rate(flipped, both)}"]


def _generators(
    raw: Any, models: Mapping[str, ModelConfig], p: Problems, *, judged: bool
) -> list[str]:
    """The generator names; an empty list is fine when a judge rates the input's own."""
    key = "preference.generators"
    fix = "e.g. [a, b], or [] with a judge to rate the generations the input rows bring"
    if raw is None or raw == []:
        if not judged:
            p.add(key, f"must be a non-empty list of model names when there is no judge; {fix}")
        return []
    if not isinstance(raw, list):
        p.add(key, f"must be a non-empty list of model names, got {type(raw).__name__}; {fix}")
        return []
    generators: list[str] = []
    for i, item in enumerate(raw):
        name = p.model_ref(f"{key}[{i}]", item, models)
        if name is not None:
            generators.append(name)
    if len(set(generators)) != len(generators):
        p.add(key, "lists a model twice; use num_generations instead")
    return generators


def _judge_template(
    raw: Any,
    p: Problems,
    base: Path,
    *,
    key: str = "preference.judge_template",
    pairwise: bool = False,
) -> tuple[str | None, str | None]:
    """The template file as the config names it and its text, read and checked."""
    name = p.string(key, raw, required=False, fix="set it to a Jinja2 template file's path")
    if name is None:
        return None, None
    path = Path(name).expanduser()
    try:
        text = read_template(
            path if path.is_absolute() else base / path,
            PAIRWISE_VARIABLES if pairwise else VARIABLES,
        )
    except BadTemplate as exc:
        p.add(key, str(exc))
        return None, None
    return name, text


def _pairwise(raw: Any, p: Problems, base: Path) -> PairwiseConfig:
    """``preference.pairwise`` (absent: swap both orders, the built-in prompt, ties)."""
    if raw is None:
        return PairwiseConfig()
    body = p.section("preference.pairwise", raw, _PAIRWISE_KEYS, "{swap: true, on_disagree: tie}")
    if body is None:
        return PairwiseConfig()
    swap = body.get("swap", True)
    if not isinstance(swap, bool):
        p.add("preference.pairwise.swap", f"must be true or false, got {swap!r}")
        swap = True
    on_disagree = body.get("on_disagree", TIE_ON_DISAGREE)
    if on_disagree not in ON_DISAGREE:
        p.add(
            "preference.pairwise.on_disagree",
            f"must be one of {' | '.join(ON_DISAGREE)}, got {on_disagree!r}",
        )
        on_disagree = TIE_ON_DISAGREE
    template, text = _judge_template(
        body.get("template"), p, base, key="preference.pairwise.template", pairwise=True
    )
    return PairwiseConfig(swap=swap, template=template, template_text=text, on_disagree=on_disagree)


def _pairwise_card(pw: PairwiseConfig) -> str:
    prompt = (
        f"the config's Jinja2 template `{pw.template}`"
        if pw.template is not None
        else "the built-in prompt"
    )
    if not pw.swap:
        return (
            f"judged every pair of answers once, in candidate order ({prompt}; a JSON verdict "
            "checked against a schema); chosen and rejected are the most and fewest wins"
        )
    after = (
        "such a row was left out (on_disagree: drop)"
        if pw.on_disagree != TIE_ON_DISAGREE
        else "counted as a tie"
    )
    return (
        f"judged every pair of answers twice, in both orders ({prompt}; a JSON verdict checked "
        "against a schema): a verdict that changed with the order is position bias, "
        f"{after}; chosen and rejected are the most and fewest order-corrected wins"
    )


def _file_flips(path: Path) -> tuple[int, int]:
    """Flips and pairs judged in both orders over a JSONL file's rows' judgements."""
    import orjson

    flipped = both = 0
    try:
        with path.open("rb") as f:
            for line in f:
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line after a crash
                if isinstance(row, dict):
                    f_, b_ = flips_of(row.get(JUDGEMENTS_KEY))
                    flipped, both = flipped + f_, both + b_
    except OSError:
        return 0, 0
    return flipped, both


def _judged_by(p: PreferenceConfig) -> str:
    if p.judge_template is not None:
        prompt = f"the config's Jinja2 judge template `{p.judge_template}`"
    else:
        prompt = f"UltraFeedback template, aspect: {p.aspect}"
    if p.judge_format == JSON:
        return f"{prompt}; ratings asked for as JSON fitting a schema, and checked against it"
    return f"{prompt}; ratings read from free-text UltraFeedback blocks"


def _pair_texts(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    chosen = messages_of(row.get("chosen"))
    rejected = messages_of(row.get("rejected"))
    if not chosen or not rejected:
        return None, None
    return text_of(chosen[-1]), text_of(rejected[-1])


KIND = Preference()
