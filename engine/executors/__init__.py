"""Executors: where a run's rows are processed, one class per way of launching them.

``local`` (this process, the default), ``processes`` (shards as local processes) and
``ray`` (shards on a Ray cluster; Ray itself is the optional ``ray`` extra). The seam
is engine.executors.base (``Executor``, ``Session``, ``RunResult``), the names are in
engine.executors.registry, and engine.executors.launch runs the one sequence the CLI
and the Python API share. Sharded executors share engine.executors.sharded (plan,
driver, merge, counts) and differ only in their ``ShardBackend``; ``cluster`` starts
or joins a Ray cluster and ties one it started to the driver's life.
"""
