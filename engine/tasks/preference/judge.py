"""The judge: UltraFeedback rating requests out, ratings and rationales back in.

Pure functions. :func:`judge_messages` renders one request that shows a judge
model every candidate answer to one prompt at once, with UltraFeedback's rubric
for the chosen aspect (Cui et al., 2023, "UltraFeedback: Boosting Language
Models with Scaled AI Feedback"; the wording here is our own rendering of it).
:func:`parse_ratings` reads the judge's free-text reply back into one rating
(1-5, or ``None``) and one rationale per candidate, and never raises: judges
write markdown, reorder blocks and drift from the format, and a reply we cannot
read is data (``None`` ratings), not a crash. With ``judge_format: json`` the
format section asks for a JSON object instead, and
``engine.tasks.preference.judge_json`` holds its schema and its parser.

The request lays out, in order: the rubric, the answer format, then the
annotation itself (instruction, then ``<text 1> ...``, ``<text 2> ...`` each
on its own line), closed by a ``### Output`` line. Nothing but that heading
follows the last candidate, so a reader that cuts candidates at the next
``<text j>`` tag or ``###`` line (the mock server does) gets them back exactly.
The format section never writes a literal numbered tag for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Message = dict[str, str]

ULTRAFEEDBACK, JSON, PAIRWISE = "ultrafeedback", "json", "pairwise"
# Free-text blocks, or a JSON object fitting a schema, both rating every candidate at
# once; or two candidates at a time (engine.tasks.preference.pairwise).
JUDGE_FORMATS = (ULTRAFEEDBACK, JSON, PAIRWISE)
RATINGS = (1, 2, 3, 4, 5)

ASPECTS = ("overall", "helpfulness", "honesty", "instruction-following", "truthfulness")

_SYSTEM = (
    "Your role is to evaluate the quality of texts against given criteria.\n"
    'You will receive an instruction ("Instruction") and {n} text outputs ("Texts") '
    "written in response to it.\n"
    "Read and interpret the instruction carefully so that you can evaluate well.\n"
    "For each text, give a rating and a short rationale.\n"
    "The {n} texts are independent of each other: evaluate each one on its own."
)

_RUBRICS: dict[str, str] = {
    "overall": """\
# General Text Quality Assessment

Judge each output on these criteria together:

1. **Correctness & Informativeness**: is the information accurate and helpful?
2. **Honesty & Uncertainty**: is the output as confident as its correctness warrants, \
and does it express uncertainty where it should?
3. **Truthfulness & Hallucination**: does it introduce misleading or made-up details?
4. **Instruction Following**: does it match the instruction and the user's intent?

Give one holistic judgement that weighs all of these factors.

**Scoring**: rate each output from 1 to 5 for its overall quality:
1. **Low Quality**: inaccurate, possibly entirely wrong, or severely hallucinated.
2. **Moderate Quality**: covers some of the task but has errors or only partly \
follows the instruction.
3. **Good**: generally accurate, with minor errors or slight deviations.
4. **Very Good**: close to perfect, with small issues of alignment or confidence.
5. **Excellent**: accurate, appropriately confident, fully aligned with the \
instruction and free of hallucinations.""",
    "helpfulness": """\
# Informativeness / Helpfulness Assessment

Judge whether each output fulfils the task's objective and gives high-quality, \
correct and informative content. Helpfulness weighs the overall quality of the \
answer through its correctness and its informativeness.

**Correctness**: computations, reasoning steps and results are accurate, with \
no misunderstanding and nothing made up.

**Informativeness**:
- **Clarity and Relevance**: the output relates to the task and seeks \
clarification when the task is ambiguous.
- **Useful and Comprehensive Information**: it provides relevant background, \
reasoning steps or detailed descriptions.
- **Not Lengthy, No Repetition**: it avoids verbosity and repeated content.

**Scoring**: rate each output from 1 to 5 for how helpful it is, counting both \
correctness and informativeness:
1. **Severely Incorrect**: significant inaccuracies or fabricated content, even \
if plenty of information is given.
2. **Partially Incorrect**: errors that may confuse the reader, even though \
comprehensive information is present.
3. **Correct**: accurate, with useful information that meets the task's requirements.
4. **Highly Informative**: accurate and extensive, with valuable insights and \
detailed information.
5. **Outstandingly Helpful**: accurate and in depth, with profound insights and \
comprehensive information.""",
    "honesty": """\
# Honesty and Uncertainty Expression Assessment

Judge how honestly each output conveys its confidence: does the confidence it \
expresses match how correct it is?

**Expressions of uncertainty**:
1. Weakeners, such as "I guess" or "probably".
2. Refusing to answer.
3. Verbalised confidence scores: [0, 20] low; (20, 40] uncertain; (40, 60] \
moderate; (60, 80] leaning confident; (80, 100] high.
An output that expresses no uncertainty counts as confident.

**Correctness**: the output agrees with the ground truth, or gives accurate \
content without fabrication.

**Scoring**: rate each output from 1 to 5 (or "N/A"):
1. **Confidently Incorrect**: confident but entirely wrong.
2. **Confident with Significant Mistakes / Unconfident Incorrect**: confident \
but with major errors, or unconfident and entirely wrong.
3. **Uncertain / "I Don't Know" / Subtle Mistakes**: says it does not know or \
declines; or is confident with minor errors; or is unconfident with significant \
mistakes.
4. **Correct but Uncertain / Expressed Subtle Mistakes**: correct but \
unconfident; or makes subtle mistakes while expressing uncertainty without \
saying exactly where the doubt lies.
5. **Correct and Confident / Precisely Expressed Uncertainty**: correct and \
confident; or makes mistakes but precisely acknowledges the minor errors and \
flags where it may be wrong.
N/A. **Not Applicable**: creative writing tasks.""",
    "instruction-following": """\
# Instruction Following Assessment

Judge how well each output aligns with the intent of the instruction: does it \
understand the task goal and respect the restrictions?

**Parts of an instruction**: the task goal (the intended outcome) and the \
restrictions (text style, format, designated methods and so on).

**Scoring**: rate each output from 1 to 5:
1. **Irrelevant**: no alignment at all.
2. **Partial Focus**: addresses one part of the instruction, and poorly.
3. **Partial Compliance**: meets either the goal or the restrictions but \
neglects the other; or acknowledges both with slight deviations.
4. **Almost There**: close alignment, with minor deviations.
5. **Comprehensive Compliance**: fully aligned; meets every requirement.""",
    "truthfulness": """\
# Truthfulness and Hallucination Assessment

Judge how accurately each output provides information, without introducing \
misleading or made-up details.

**Kinds of hallucination**:
1. **Contradictory with the World (Factual Error)**: entities, places, concepts \
or events that conflict with established knowledge.
2. **Contradictory with Instruction and Input**: the output diverges from the \
instruction or its input, introducing facts that do not fit them.
3. **Self-Contradictory / Logical Error**: the output contradicts itself or \
contains a logical error.
Name the kinds you observe in the rationale.

**Scoring**: rate each output from 1 to 5 by how much it hallucinates:
1. **Completely Hallucinated**: entirely unreliable because of hallucinations.
2. **Severe Hallucination**: nearly half of it is hallucinated; severe \
deviation from the main points.
3. **Partial Hallucination / Misunderstanding**: truthful overall, with a \
partial misunderstanding caused by hallucination.
4. **Insignificant Hallucination**: mostly truthful; a slight hallucination \
that does not affect the main points.
5. **No Hallucination**: free of hallucinations.""",
}

_FORMAT = """\
## Format

### Input
Instruction: [the task, with its goal and restrictions]

Texts:
[the {n} texts to rate, each on its own line after its numbered tag]

### Output
{blocks}

---

## Annotation

### Input
"""


def judge_messages(
    prompt: Sequence[Message],
    candidates: Sequence[str],
    aspect: str,
    *,
    judge_format: str = ULTRAFEEDBACK,
) -> list[Message]:
    """Build the judge request: a system message and one user message.

    ``prompt`` is the conversation the candidates answer; it must end with a
    user turn, which becomes the instruction. Earlier turns, when there are
    any, are shown before it as labelled context. ``candidates`` are the
    answers to rate, shown as ``<text 1> ...``, ``<text 2> ...``, each tag at
    the start of its own line. ``aspect`` is one of :data:`ASPECTS`. With
    ``judge_format`` :data:`JSON` the format section asks for the JSON object
    of ``judge_json.ratings_schema`` instead of one text block per candidate.

    Raises ValueError for an unknown aspect, no candidates, or a prompt that
    does not end with a user turn: those are the caller's bugs, not data.
    """
    if aspect not in _RUBRICS:
        raise ValueError(f"unknown judge aspect {aspect!r}; use one of {', '.join(ASPECTS)}")
    if not candidates:
        raise ValueError("judge_messages needs at least one candidate")
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("the prompt to judge must end with a user turn")
    if judge_format not in (ULTRAFEEDBACK, JSON):
        raise ValueError(
            f"unknown judge format {judge_format!r} for rating every candidate at once; use "
            f"{ULTRAFEEDBACK} or {JSON} (a pairwise judge compares two at a time)"
        )
    n = len(candidates)
    if judge_format == JSON:
        answer = _JSON_ANSWER.format(n=n)
    else:
        scale = (
            'an integer from 1 to 5, or "N/A"' if aspect == "honesty" else "an integer from 1 to 5"
        )
        answer = _format_blocks(n, scale)
    texts = "\n".join(f"<text {i}> {text}" for i, text in enumerate(candidates, start=1))
    user = (
        f"{_RUBRICS[aspect]}\n\n"
        f"{_FORMAT.format(n=n, blocks=answer)}"
        f"{_render_prompt(prompt)}\n\n"
        f"Texts:\n{texts}\n\n"
        "### Output\n"
    )
    return [
        {"role": "system", "content": _SYSTEM.format(n=n)},
        {"role": "user", "content": user},
    ]


# The JSON format's answer section. Like the text format it never writes a
# literal numbered tag (see the module docstring).
_JSON_ANSWER = """\
One JSON object and nothing else, with exactly {n} entries in "ratings", the first \
for text 1, the second for text 2 and so on:
{{"ratings": [{{"rating": <an integer from 1 to 5>, "rationale": "<rationale for the \
rating, in short sentences>"}}, ...]}}"""


def _format_blocks(n: int, scale: str) -> str:
    blocks = [
        "#### Output for Text 1\n"
        f"Rating: [rating for text 1: {scale}]\n"
        "Rationale: [rationale for the rating, in short sentences]"
    ]
    if n >= 2:
        blocks.append(
            "#### Output for Text 2\n"
            "Rating: [rating for text 2]\n"
            "Rationale: [rationale for the rating]"
        )
    if n >= 3:
        blocks.append(f"...and so on, one block for each of the {n} texts.")
    return "\n\n".join(blocks)


def _render_prompt(prompt: Sequence[Message]) -> str:
    *earlier, last = prompt
    instruction = f"Instruction: {last.get('content', '')}"
    if not earlier:
        return instruction
    turns = "\n\n".join(
        f"[{m.get('role', 'unknown').capitalize()}]\n{m.get('content', '')}" for m in earlier
    )
    return (
        "Context (the earlier turns of the conversation; the instruction is the "
        f"user's next turn):\n{turns}\n\n{instruction}"
    )


# --- Parsing the reply -------------------------------------------------------
#
# Each pattern is anchored to a line start and tolerates markdown decoration
# (#, >, *, _, -) around the label. Number groups are bounded so that int()
# never sees thousands of digits (Python refuses those with ValueError).

_HEADER = re.compile(
    r"^[ \t>#*_\-]*output[ \t*_]+for[ \t*_]+text[ \t*_]*#?[ \t]*([0-9]{1,6})(?![0-9])",
    re.IGNORECASE | re.MULTILINE,
)
_RATING = re.compile(
    r"^[ \t>#*_\-]*(?:overall[ \t]+|final[ \t]+)?rating[ \t*_]*:[ \t*_]*(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_RATIONALE = re.compile(r"^[ \t>#*_\-]*rationale[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)
# Where a rationale ends: the next field, a heading, or a horizontal rule.
_RATIONALE_END = re.compile(
    r"^(?:[ \t>*_\-]*(?:rating|rationale|type)[ \t*_]*:"  # a field label
    r"|[ \t]*#"  # a heading
    r"|[ \t]*([-*_=])[ \t]*(?:\1[ \t]*){2,}$)",  # a rule: ---, ***, ===
    re.IGNORECASE | re.MULTILINE,
)
_VALUE = re.compile(
    r"^[\[(\"'`]*[ \t]*([0-9]{1,6})(?:\.0+)?(?![0-9]|\.[0-9])"  # 4, [4], 4.0; not 4.5
    r"[ \t]*(?:(?:/|out[ \t]+of)[ \t]*([0-9]{1,6}))?",  # 4/5, 4 out of 5
    re.IGNORECASE,
)
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def parse_ratings(reply: str, n: int) -> tuple[list[int | None], list[str | None]]:
    """Read the ratings and rationales for candidates 1..n out of a judge reply.

    Returns two lists of length ``n``: a rating from 1 to 5 or ``None`` (no
    block for that candidate, ``N/A``, out of range, unreadable), and the
    rationale text or ``None``. Blocks are found by their ``Output for Text i``
    headers in any order and case, through markdown bold and heading marks; a
    rating may read ``4``, ``**4**``, ``4/5``, ``4 out of 5`` or ``4 (good)``.
    With no headers at all but exactly ``n`` rating lines, the ratings are
    taken in order. Never raises on a string.
    """
    if n <= 0:
        return [], []
    ratings: list[int | None] = [None] * n
    rationales: list[str | None] = [None] * n
    if not isinstance(reply, str):
        return ratings, rationales
    text = reply.replace("\r\n", "\n").replace("\r", "\n")
    headers = list(_HEADER.finditer(text))
    if headers:
        for i, match in enumerate(headers):
            index = int(match.group(1)) - 1
            if not 0 <= index < n or ratings[index] is not None:
                continue  # outside 1..n, or already read: the first usable block wins
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            rating, rationale = _read_block(text[match.end() : end])
            if rating is not None or rationales[index] is None:
                ratings[index], rationales[index] = rating, rationale
        return ratings, rationales
    lines = list(_RATING.finditer(text))
    if len(lines) != n:
        return ratings, rationales
    for i, match in enumerate(lines):
        end = lines[i + 1].start() if i + 1 < n else len(text)
        ratings[i], rationales[i] = _read_block(text[match.start() : end])
    return ratings, rationales


def has_usable_rating(ratings: Sequence[int | None]) -> bool:
    """Whether a parsed reply rated at least one candidate.

    A reply with no usable rating at all is a judge that ignored the format;
    the caller may ask again. One usable rating is a real answer, even though
    it is too few to make a pair.
    """
    return any(r is not None for r in ratings)


def _read_block(block: str) -> tuple[int | None, str | None]:
    rating_match = _RATING.search(block)
    rating: int | None = None
    after = 0
    if rating_match is not None:
        after = rating_match.end()
        value = rating_match.group(1)
        if not value.strip(" \t*_"):
            # "Rating:" alone on its line: the value may sit on the next line.
            following = block[after:].lstrip("\n").split("\n", 1)[0]
            if not _RATIONALE.match(following):
                value = following
        rating = _rating_value(value)
    # The rationale for the rating follows it; UltraFeedback's truthfulness
    # format also puts one before it (for the hallucination type), the fallback.
    rationale_match = _RATIONALE.search(block, after) or _RATIONALE.search(block)
    rationale = None
    if rationale_match is not None:
        start = rationale_match.end()
        stop = _RATIONALE_END.search(block, start)
        body = block[start : stop.start() if stop else len(block)]
        rationale = body.strip() or None
    return rating, rationale


def _rating_value(value: str) -> int | None:
    value = value.strip().strip("*_").strip()
    word = re.match(r"[a-z]+", value, re.IGNORECASE)
    if word is not None and word.group(0).lower() in _WORDS:
        return _WORDS[word.group(0).lower()]
    match = _VALUE.match(value)
    if match is None:
        return None
    number = int(match.group(1))
    scale = match.group(2)
    if scale is not None and int(scale) != 5:
        return None  # "3/10" is on some other scale; guessing would mislead
    return number if 1 <= number <= 5 else None
