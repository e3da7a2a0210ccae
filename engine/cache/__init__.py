"""Replies kept across runs: a request answered once is never paid for again.

- ``engine.cache.keys`` (pure): ``request_key``, the sha256 of what defines a reply
  (the ``model`` sent, the request fields, the messages exactly as sent, and the
  generation where one row asks the same model the same thing several times), and
  what the store keeps of a reply. Where the request goes (URLs, replicas), who pays
  (API keys) and how long it may take (timeouts) are left out: moving a server
  changes no reply.
- ``engine.cache.settings``: the ``cache:`` section.
- ``engine.cache.store``: the SQLite store and the run's side of it, imported only
  by a run with ``cache.dir`` set (sqlite3 with it).
"""
