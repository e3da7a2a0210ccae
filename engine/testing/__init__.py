"""Test doubles shipped with the package: the mock OpenAI-compatible server."""
