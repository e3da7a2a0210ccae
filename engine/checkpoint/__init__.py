"""Run state on disk. ``engine.checkpoint.checkpoint.Checkpoint`` is the entry point
(lock, manifest, state, writer, emits); behind it the journal (journal.py), the group
writer (writer.py) and its snapshotter (snapshotter.py, snapshot.py), the manifest and
locks (manifest.py), and the two ways a file is written (files.py)."""
