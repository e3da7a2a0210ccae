"""Turnstile: a streaming, checkpointed engine for LLM-generated training data."""

__version__ = "0.1.0"
