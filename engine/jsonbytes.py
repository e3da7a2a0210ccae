"""JSON to keep: orjson's output copied into bytes of its own size.

``orjson.dumps`` hands back its working buffer with the length set short: an
allocation of 4 KiB at the least, and about sixteen times the text for a long string
(a 16 KB reply holds 260 KB, of which the pages written count in RSS). That costs
nothing for bytes written or hashed at once and then dropped. Bytes that are held (a
request body while it is in flight and retried, a batch's results waiting for their
rows) are made with ``dumps`` instead (a reply queued for the reply store is such a
copy too, a bytearray, which the store's sqlite3 binds as it is): one copy,
tens of nanoseconds for a short line, where thousands of held buffers take memory,
page faults and the allocator's time (measured: a store's queued replies 79 -> 64 MB
peak RSS for a run of 20,000 rows; 20 KB prompts at cap 512, 154 -> 132 MB).
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any, option: int | None = None) -> bytes:
    """``orjson.dumps(value, option=option)`` in bytes of its own size (a copy)."""
    return b"%b" % (orjson.dumps(value, option=option),)
