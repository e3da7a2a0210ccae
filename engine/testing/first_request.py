"""``python -m engine.testing.first_request CONFIG``: what a run has imported when its
first request goes out.

Runs ``turnstile run CONFIG --quiet`` in this process and records ``sys.modules`` at
its first POST (aiohttp's request method wrapped to look, then called as it is: the
request goes out unchanged). Prints one JSON line, ``{"code": exit code, "modules":
[names] or null when no request went out}``. Used by tests/test_imports.py and
bench/startup.py to check and count what start-up imports.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(argv: list[str]) -> int:
    import aiohttp.client

    send = aiohttp.client.ClientSession._request
    seen: list[list[str]] = []

    async def first(self: Any, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        if method == "POST" and not seen:
            seen.append(sorted(sys.modules))
        return await send(self, method, url, *args, **kwargs)

    aiohttp.client.ClientSession._request = first  # type: ignore[method-assign, assignment]
    from engine.cli import main as turnstile

    code = turnstile(["run", argv[0], "--quiet"])
    print(json.dumps({"code": code, "modules": seen[0] if seen else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
