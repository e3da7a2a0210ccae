"""The counting side of bench.opcodes, run as a script in the engine's process: it
imports nothing from bench/ (the engine on PYTHONPATH may be an older tree).

    python bench/_counting.py DUMP CONFIG

runs ``turnstile run CONFIG --quiet`` with every bytecode instruction and every frame
entry counted, by function, in every thread, and writes them to DUMP as JSON:
``{"file:function": [instructions, calls]}``, the file from its package on.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import orjson

# Where a file's path starts to say something: the package it is in.
_SHORT = re.compile(r".*?/(engine/|site-packages/|lib/python3\.\d+/)")

Counts = dict[str, list[int]]  # "file:function" -> [instructions, calls]


def name_of(code: CodeType) -> str:
    return _SHORT.sub(r"\1", code.co_filename) + ":" + code.co_name


def count(argv: list[str]) -> Counts:
    """Run ``turnstile`` with ``argv`` in this process, counting."""
    from engine.cli import main  # imported before the counting starts

    instructions: collections.Counter[CodeType] = collections.Counter()
    calls: collections.Counter[CodeType] = collections.Counter()

    def step(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            instructions[frame.f_code] += 1
        return step

    def enter(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[frame.f_code] += 1
        return step

    threading.settrace(enter)
    sys.settrace(enter)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    if code not in (0, None):
        raise SystemExit(f"turnstile {' '.join(argv)} exited {code}")
    out: Counts = {}
    for code_ in instructions.keys() | calls.keys():
        entry = out.setdefault(name_of(code_), [0, 0])
        entry[0] += instructions[code_]
        entry[1] += calls[code_]
    return out


if __name__ == "__main__":
    dump, config = sys.argv[1:3]
    Path(dump).write_bytes(orjson.dumps(count(["run", config, "--quiet"])))
