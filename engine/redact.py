"""Keeping secrets out of everything a run shows or stores: one policy, used everywhere.

A run holds three kinds of secret: the API key (read from the variable that
``api_key_env`` names), credentials written into a ``base_url`` (a user and
password, or a query parameter such as ``?api_key=...``), and values a config
puts under a secret-looking key. What is shown (the report, the dataset card,
metrics, logs, error messages, the failed file) goes through here:

- a *key* is secret by its name: a word of it (split at ``_``, ``-``, ``.``,
  spaces) is or ends in ``key``, ``token``, ``secret``, ``password``... so
  ``api_key``, ``HF_TOKEN``, ``accessToken`` and ``client_secret`` are masked but
  ``max_tokens`` and ``tokens_per_minute`` are not (a count of tokens is not one).
  A name ending in ``_env`` names an environment variable (``api_key_env``): the
  name is shown, never the variable's value;
- a *URL* is shown without its user and password, and with the value of every
  secret-looking query parameter masked;
- *text* (a server's message, a crash's traceback, a whole page) has every known
  secret value replaced, as written, HTML-escaped and URL-encoded.

Values are not guessed at: a secret looks like any string. That is why the known
values (the keys and the URLs' credentials) are also scrubbed from text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

MASK = "***"
_MASK_BYTES = MASK.encode()
# A key's word that is, or ends in, one of these names a secret ("apikey", "hf_token").
_SECRET_ENDINGS = ("key", "token", "secret", "password", "passwd", "pwd", "credential")
# Words that name a secret only as a whole word ("auth" but not "author").
_SECRET_WORDS = frozenset(
    {"auth", "authorization", "credentials", "cookie", "bearer", "sig", "signature", "session"}
)
# Replacing a value this short everywhere would rewrite ordinary text (and a page's
# markup); a key this short protects nothing anyway.
SHORTEST_SECRET = 4
# A URL's user is a credential only when it comes alone and is this long (a token); a
# user name such as "admin" is shown nowhere but is not scrubbed from every text.
_TOKEN_AS_USER = 8
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_name(name: str) -> bool:
    """Whether a key's name says its value is a secret (``api_key``, ``HF_TOKEN``...)."""
    words = [w.lower() for w in _WORD.findall(name)] or [name.lower()]
    if len(words) > 1 and words[-1] == "env":
        return False  # the NAME of an environment variable, shown so a user knows which
    joined = "".join(words)
    if joined.endswith(_SECRET_ENDINGS) or any(w in _SECRET_WORDS for w in words):
        return True
    return any(w.endswith(_SECRET_ENDINGS) for w in words)


def redact_url(url: str) -> str:
    """``url`` with no user or password, and its secret-looking query values masked."""
    if "@" not in url and "?" not in url:
        return url  # the common case, and `local`
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_unparsed(url)
    if not parts.scheme or not parts.netloc:
        return _redact_unparsed(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret values a URL carries: its password (or a token given as its user) and
    its secret query values."""
    if "@" not in url and "?" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found.append(unquote(parts.password))
    elif parts.username and len(parts.username) >= _TOKEN_AS_USER:
        found.append(unquote(parts.username))  # a token given as the user (https://TOKEN@host)
    for param in parts.query.split("&") if parts.query else ():
        name, sep, value = param.partition("=")
        if sep and value and is_secret_name(unquote(name)):
            found.append(unquote(value.replace("+", " ")))
    return found


def redact(value: Any) -> Any:
    """A copy of a config (or any plain value) with no secret in it.

    Values under a secret-looking key are masked, and so is every header's value;
    URLs anywhere keep no credentials. Other values stay as they are, except that
    what is not a plain value (a Path, an enum) is shown as text.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if is_secret_name(name):
                out[name] = MASK
            elif name.lower() == "headers" and isinstance(item, Mapping):
                out[name] = {str(header): MASK for header in item}
            else:
                out[name] = redact(item)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if value is None or isinstance(value, int | float | bool):
        return value
    return str(value)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value masked: as written, HTML-escaped and URL-encoded.

    Longest first, so a secret that holds another is not half replaced. Values
    shorter than ``SHORTEST_SECRET`` are left alone.
    """
    for secret in _ordered(secrets):
        for form in {secret, html.escape(secret), quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return text


def scrub_bytes(data: bytes, secrets: Iterable[bytes]) -> bytes:
    """``data`` (a server's reply, before anything reads it) with every secret masked;
    ``secrets`` encoded, longest first, as ``model_secrets`` gives them."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, _MASK_BYTES)
    return data


def config_secrets(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """The secret values of a config given as a plain mapping, longest first: the values
    of the variables named by ``models.*.api_key_env`` and the credentials in each
    ``base_url``."""
    models = config.get("models")
    found: list[str] = []
    for body in models.values() if isinstance(models, Mapping) else ():
        if not isinstance(body, Mapping):
            continue
        name = body.get("api_key_env")
        if isinstance(name, str) and environ.get(name):
            found.append(environ[name])
        urls = body.get("base_url")
        for url in urls if isinstance(urls, list | tuple) else [urls]:
            if isinstance(url, str):
                found.extend(url_secrets(url))
    return _ordered(found)


def model_secrets(key: str | None, urls: Iterable[str]) -> list[str]:
    """A model's secret values: its API key and its URLs' credentials, longest first."""
    found = [key] if key else []
    for url in urls:
        found.extend(url_secrets(url))
    return _ordered(found)


def _ordered(secrets: Iterable[str]) -> list[str]:
    return sorted({s for s in secrets if len(s) >= SHORTEST_SECRET}, key=len, reverse=True)


def _redact_param(param: str) -> str:
    name, sep, value = param.partition("=")
    if sep and value and is_secret_name(unquote(name)):
        return f"{name}={MASK}"
    return param


def _redact_unparsed(url: str) -> str:
    """What ``urlsplit`` cannot take apart (a broken IPv6 host, text around a URL): the
    same policy, applied to the text after ``://``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, mark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if mark:
        query = "&".join(_redact_param(p) for p in query.split("&"))
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}{mark}{query}"
