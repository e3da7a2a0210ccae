"""HTTP to the models: the client, the replicas of a model, retry decisions, rate limits."""
