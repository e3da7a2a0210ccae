"""Test doubles shipped with the package: the mock OpenAI-compatible server, and an
in-memory model endpoint for unit tests."""
