"""Run state on disk: the journal, its single writer, the manifest and the lock."""
