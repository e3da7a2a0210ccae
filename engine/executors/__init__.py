"""Executors: where a run's rows are processed. ``executor: {kind: ray}`` shards a run
over a Ray cluster (Ray itself is the optional ``ray`` extra); ``cluster`` starts or
joins that cluster, and ties a cluster it started to the driver's life."""
