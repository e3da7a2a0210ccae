"""A model whose requests go through a provider's Batch API (``models.NAME.batch``).

- ``settings``: the ``batch:`` block, parsed;
- ``lines``: pure: custom ids, input lines, output and error lines read back;
- ``log``: the endpoint's own durability records (file ids, batch ids), replayed on resume;
- ``api``: the Batch API over HTTP (files, batches);
- ``endpoint``: ``BatchEndpoint``, the ``ModelEndpoint`` that queues, submits, polls and
  hands results back to ``complete``.
"""
