"""Preference data from a pool of models: generate, judge, pair.

``task: preference``. The section, the fingerprint, the filters' view and the
card live here; the runner is ``engine.tasks.preference.task``, the judge's
prompt and parsing ``judge``, the pairing and the output row ``pairs``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.output.filters import FilterConfig, Reply, ints_of, list_of, messages_of, text_of
from engine.tasks.base import Task, TaskKind
from engine.tasks.preference.judge import ASPECTS
from engine.tasks.preference.pairs import TRUNCATED_KEY

if TYPE_CHECKING:
    from engine.config import ModelConfig, RunConfig
    from engine.problems import Problems


@dataclass(frozen=True, slots=True)
class PreferenceConfig:
    generators: tuple[str, ...]
    num_generations: int = 1
    judge: str | None = None
    aspect: str = "overall"


class Preference(TaskKind):
    name = "preference"
    tags = ("preference", "dpo")
    column_keys = ("messages", "conversations", "prompt")
    pairs = True

    def parse_section(
        self, raw: Any, models: Mapping[str, ModelConfig], p: Problems, base: Path
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
                name = p.model_ref(f"preference.generators[{i}]", item, models)
                if name is not None:
                    generators.append(name)
            if len(set(generators)) != len(generators):
                p.add("preference.generators", "lists a model twice; use num_generations instead")
        num = p.positive_int("preference.num_generations", body.get("num_generations"), 1) or 1
        judge = None
        if body.get("judge") is not None:
            judge = p.model_ref("preference.judge", body.get("judge"), models)
        aspect = body.get("aspect", "overall")
        if aspect not in ASPECTS:
            p.add("preference.aspect", f"must be one of {', '.join(ASPECTS)}, got {aspect!r}")
            aspect = "overall"
        return PreferenceConfig(
            generators=tuple(generators), num_generations=num, judge=judge, aspect=aspect
        )

    def section_fields(self, section: PreferenceConfig) -> dict[str, Any]:
        return {
            "generators": list(section.generators),
            "num_generations": section.num_generations,
            "judge": section.judge,
            "aspect": section.aspect,
        }

    def models_used(self, section: PreferenceConfig) -> set[str]:
        used = set(section.generators)
        if section.judge:
            used.add(section.judge)
        return used

    def build(self, config: RunConfig) -> Task:
        from engine.tasks.preference.task import PreferenceTask

        return PreferenceTask(config)

    def card_text(self, config: RunConfig) -> str:
        p: PreferenceConfig = config.section
        makers = ", ".join(f"`{config.models[g].model}`" for g in p.generators)
        judge = (
            f"`{config.models[p.judge].model}` rated them together (UltraFeedback template, "
            f"aspect: {p.aspect}); chosen is the highest rating, rejected the lowest"
            if p.judge
            else "no judge was configured, so no row has a pair"
        )
        return (
            f"Preference pairs: each prompt went to {makers} ({p.num_generations} generation(s) "
            f"each); {judge}."
        )

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


def _pair_texts(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    chosen = messages_of(row.get("chosen"))
    rejected = messages_of(row.get("rejected"))
    if not chosen or not rejected:
        return None, None
    return text_of(chosen[-1]), text_of(rejected[-1])


KIND = Preference()
