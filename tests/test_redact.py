"""engine.redact: the one policy for secrets, by key name, in URLs and in text."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.redact import (
    MASK,
    config_secrets,
    is_secret_name,
    model_secrets,
    redact,
    redact_url,
    scrub,
    scrub_bytes,
    url_secrets,
)

KEY = "sk-test-secret-0123456789"


@pytest.mark.parametrize(
    "name",
    [
        "api_key",
        "apiKey",
        "API-KEY",
        "HF_TOKEN",
        "accessToken",
        "client_secret",
        "Password",
        "passwd",
        "authorization",
        "Authorization",
        "auth",
        "x-api-key",
        "sig",
        "credentials",
        "cookie",
        "key",
    ],
)
def test_a_key_named_like_a_credential_is_secret(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "max_tokens",
        "tokens_per_minute",
        "max_completion_tokens",
        "api_key_env",
        "API_KEY_ENV",
        "temperature",
        "author",
        "model",
        "base_url",
        "top_k",
        "seed",
        "stop",
    ],
)
def test_counts_of_tokens_and_variable_names_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_the_config_keeps_max_tokens_and_masks_what_is_secret() -> None:
    config = {
        "models": {
            "teacher": {
                "base_url": [
                    "http://user:hunter2@gpu1:8000/v1",
                    "http://gpu2:8000/v1?key=q-secret",
                ],
                "api_key_env": "OPENAI_API_KEY",
                "params": {"max_tokens": 256, "temperature": 0.7, "api_key": "inline"},
                "tokens_per_minute": 1000,
                "headers": {"X-Org": "org-1"},
            }
        },
        "output": Path("/data/out.jsonl"),
    }
    teacher = redact(config)["models"]["teacher"]
    assert teacher["base_url"] == ["http://gpu1:8000/v1", f"http://gpu2:8000/v1?key={MASK}"]
    assert teacher["api_key_env"] == "OPENAI_API_KEY"
    assert teacher["params"] == {"max_tokens": 256, "temperature": 0.7, "api_key": MASK}
    assert teacher["tokens_per_minute"] == 1000
    assert teacher["headers"] == {"X-Org": MASK}
    assert redact(config)["output"] == "/data/out.jsonl"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:PASSWORD@host:8080/v1", "http://host:8080/v1"),
        ("https://tok@api.example.com/v1", "https://api.example.com/v1"),
        (
            "http://h/v1?api_key=abc&api-version=2024",
            f"http://h/v1?api_key={MASK}&api-version=2024",
        ),
        ("http://h/v1?access_token=abc#frag", f"http://h/v1?access_token={MASK}#frag"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("local", "local"),
        ("http://u:p@[::1/v1?key=zz", f"http://[::1/v1?key={MASK}"),  # does not parse
    ],
)
def test_a_url_is_shown_without_user_password_or_secret_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_secrets_of_a_url_are_its_password_and_secret_query_values() -> None:
    assert url_secrets("http://user:hunter2@h/v1?key=q-secret&x=1") == ["hunter2", "q-secret"]
    assert url_secrets("https://a-long-token@h/v1") == ["a-long-token"]  # a token as the user
    assert url_secrets("http://h/v1") == []


def test_scrub_replaces_every_form_of_every_secret_longest_first() -> None:
    text = f"key={KEY} again {KEY} prefix sk-test"
    assert scrub(text, ["sk-test", KEY, "", "ab"]) == f"key={MASK} again {MASK} prefix {MASK}"
    assert scrub("<p>a&amp;b&lt;c and a%26b%3Cc</p>", ["a&b<c"]) == f"<p>{MASK} and {MASK}</p>"
    assert scrub_bytes(f"Bearer {KEY}".encode(), [KEY.encode()]) == f"Bearer {MASK}".encode()


def test_the_secrets_of_a_config_and_of_a_model() -> None:
    config = {
        "models": {
            "a": {"api_key_env": "K1", "base_url": "http://u:pass-word@h/v1"},
            "b": {"api_key_env": "K2", "base_url": ["http://h/v1?token=t-secret"]},
            "c": {},
        }
    }
    assert config_secrets(config, {"K1": KEY, "K2": "abc"}) == [KEY, "pass-word", "t-secret"]
    assert model_secrets(KEY, ["http://u:pass-word@h/v1"]) == [KEY, "pass-word"]
    assert model_secrets(None, ["http://h/v1"]) == []
