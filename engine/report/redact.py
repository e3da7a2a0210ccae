"""Keeping secrets out of the report: the config shown masked, and API keys scrubbed.

A report is made to be passed around (attached to a ticket, put on a wiki), so it
must not carry what the run used to authenticate. Two guards: the config is shown
with every value under a secret-looking key masked (by name: a key's value is not
looked at, since a secret looks like any string), and the final page has every
value of the environment variables the models read their keys from replaced, in
case one was pasted where no name gives it away (a URL, a header, a prompt).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

MASK = "***"
SECRET_WORDS = ("key", "token", "secret", "password", "authorization")
# Replacing a value this short everywhere would rewrite the page's own markup and
# numbers; a key this short protects nothing anyway.
_SHORTEST_SECRET = 4


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with secret-looking values and every header value masked."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = str(key)
        if is_secret(name):
            out[name] = MASK
        elif name.lower() == "headers" and isinstance(value, Mapping):
            out[name] = {str(header): MASK for header in value}
        else:
            out[name] = _redact_value(value)
    return out


def is_secret(key: str) -> bool:
    """Whether a key's name says its value is a secret (``api_key``, ``HF_TOKEN``...)."""
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # a Path, an enum: shown as text


def config_text(config: Mapping[str, Any]) -> str:
    """The config as YAML, masked, keys in their order."""
    if not config:
        return ""
    dumped: str = yaml.safe_dump(
        redact(config), sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return dumped


def secret_values(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """The values of the variables named by ``models.*.api_key_env``, longest first."""
    models = config.get("models")
    names = [
        body.get("api_key_env")
        for body in (models.values() if isinstance(models, Mapping) else ())
        if isinstance(body, Mapping)
    ]
    values = {environ.get(name, "") for name in names if isinstance(name, str)}
    return sorted((v for v in values if len(v) >= _SHORTEST_SECRET), key=len, reverse=True)


def scrub(page: str, secrets: Iterable[str]) -> str:
    """``page`` with every secret masked, as written and as HTML-escaped."""
    for secret in secrets:
        page = page.replace(secret, MASK).replace(html.escape(secret), MASK)
    return page
