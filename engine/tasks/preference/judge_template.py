"""A judge prompt of the user's own: a Jinja2 template file, in a sandbox. Pure.

``preference.judge_template`` names the file. It is rendered once per row with
three variables: ``prompt`` (the conversation being answered, a list of
``{role, content}`` messages), ``generations`` (the candidate answers, a list
of strings, in output order) and ``aspect`` (``preference.aspect``). The
rendered text is the judge request's one user message; its reply is read as
``preference.judge_format`` says (UltraFeedback blocks or JSON).

A template is code run on every row, so it runs in Jinja2's immutable sandbox,
and undefined names are errors, never empty text (``StrictUndefined``). A
template that names a variable it will never get is refused with the config,
so a typo fails before any request is sent, not on every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jinja2 import Template, TemplateSyntaxError, meta

from engine.tasks.templates import ENV, BadTemplate, RenderError

Message = dict[str, str]

VARIABLES = ("prompt", "generations", "aspect")
PAIRWISE_VARIABLES = ("prompt", "a", "b")  # preference.pairwise.template's


def read_template(path: Path, variables: Sequence[str] = VARIABLES) -> str:
    """The template file's text, checked; raises BadTemplate saying what to fix.

    It must be readable UTF-8 text that is not blank, compile (a syntax error
    names its line), and use no variable besides ``variables`` (:data:`VARIABLES`, or
    :data:`PAIRWISE_VARIABLES` for ``preference.pairwise.template``).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadTemplate(f"cannot read {path} ({exc.strerror or exc}); fix the path") from exc
    except UnicodeDecodeError as exc:
        raise BadTemplate(f"{path} is not UTF-8 text; re-encode it as UTF-8") from exc
    if not text.strip():
        raise BadTemplate(f"{path} is empty; write the judge's prompt in it")
    try:
        parsed = ENV.parse(text)
    except TemplateSyntaxError as exc:
        raise BadTemplate(
            f"{path}, line {exc.lineno}: the template does not compile: {exc.message or exc}; "
            "fix that line",
            exc.lineno,
        ) from exc
    unknown = sorted(meta.find_undeclared_variables(parsed) - {*variables, *ENV.globals})
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise BadTemplate(
            f"{path} uses {names}, which the judge template never gets; its variables are "
            f"{', '.join(variables)}"
        )
    return text


def compile_template(text: str) -> Template:
    """The compiled template (``text`` as :func:`read_template` checked it)."""
    return ENV.from_string(text)


def render_judge(
    template: Template, prompt: Sequence[Message], generations: Sequence[str], aspect: str
) -> list[Message]:
    """The judge request for one row: the rendered template as one user message.

    Raises RenderError when the template fails on this row (an index past the
    last generation, a sandbox refusal, an empty result).
    """
    try:
        text = template.render(
            prompt=[dict(m) for m in prompt], generations=list(generations), aspect=aspect
        )
    except Exception as exc:
        # A template is user code run on user data: whatever it raises fails
        # this row's judging only.
        raise RenderError(f"the judge template failed on this row: {exc}") from exc
    if not text.strip():
        raise RenderError("the judge template rendered empty text for this row")
    return [{"role": "user", "content": text}]


def render_pair(template: Template, prompt: Sequence[Message], a: str, b: str) -> list[Message]:
    """A pairwise judge request of the user's own: the template rendered with ``prompt``,
    ``a`` (the answer shown first) and ``b``, as one user message.

    Raises RenderError when the template fails on this pair or renders empty text.
    """
    try:
        text = template.render(prompt=[dict(m) for m in prompt], a=a, b=b)
    except Exception as exc:
        # User code on user data: whatever it raises fails this row's judging only.
        raise RenderError(f"the pairwise judge template failed on this row: {exc}") from exc
    if not text.strip():
        raise RenderError("the pairwise judge template rendered empty text for this row")
    return [{"role": "user", "content": text}]
