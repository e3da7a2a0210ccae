"""Which files a run may write, and which it must never touch.

A run appends to its output, failed and filtered files, and ``--fresh`` deletes
them; ``turnstile export`` replaces its destination. None of these may be the
input, the config file or a file inside the checkpoint folder: one overwritten
loses the user's data or the run's own state. Paths are compared as the OS sees
them, symlinks and ``..`` resolved (``os.path.realpath``), and one file under two
names (a hard link) is caught by comparing inodes. Only ``stat`` calls: nothing
is created or changed here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, once links and ``..`` are resolved."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links resolved."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def clashes(
    targets: Sequence[tuple[str, Path]],
    *,
    input: Path,
    checkpoint_dir: Path | None,
    config_file: Path | None,
    fix: str = "pick another path",
) -> list[str]:
    """One line per target (a description and its path) that would overwrite the
    input, the config file or the checkpoint's files, ending with ``fix``.

    ``config_file`` is None when there is none (a config given as a dict), and
    ``checkpoint_dir`` None skips that check (a shard keeps its rows in its folder).
    """
    problems = []
    for what, path in targets:
        if same_file(path, input):
            clash = f"the input file ({input})"
        elif config_file is not None and same_file(path, config_file):
            clash = f"the config file ({config_file})"
        elif checkpoint_dir is not None and inside(path, checkpoint_dir):
            clash = f"inside checkpoint_dir ({checkpoint_dir}), whose files it would overwrite"
        else:
            continue
        resolved = os.path.realpath(path)
        shown = f"{path}" if str(path) == resolved else f"{path} (really {resolved})"
        problems.append(f"{what} {shown} must not be {clash}; {fix}")
    return problems


def run_targets(output: Path, failed: Path, filtered: Path) -> list[tuple[str, Path]]:
    """The files a run writes (and ``--fresh`` deletes), described for messages."""
    return [
        ("the output file", output),
        ("the failed file", failed),
        ("the filtered file", filtered),
    ]
