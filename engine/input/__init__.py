"""Input: one source per format (JSONL, Parquet, saved datasets), shard plans, and the
row formats."""
