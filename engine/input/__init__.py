"""Input: one source per format (JSONL, Parquet, datasets folders) and the row formats."""
