"""``llama-server`` from a prebuilt wheel: llama.cpp's own server code, run by xllamacpp.

The ``local`` extra installs ``xllamacpp``, a PyPI wheel that carries llama.cpp,
including the C++ HTTP server of ``llama-server`` (the same routes, slots and
continuous batching), prebuilt for the CPU: no compiler, no 15-minute build.
This module is a ``llama-server`` with the subset of its command line that
:func:`engine.local.server.server_command` writes; ``engine/local/llama-server``
runs it, and :mod:`engine.local.server` starts that file as the server process
(its ``argv[0]``), so the process looks and is stopped like any llama-server.

It serves until SIGTERM, SIGINT or SIGHUP, then stops the server and exits 0;
it exits 1 with llama.cpp's own log lines on stderr when the model cannot be
loaded or the port cannot be bound, and 2 on a flag it does not know.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama-server (xllamacpp)",
        description="llama.cpp's server from the xllamacpp wheel; the flags mean what they "
        "mean to llama-server.",
    )
    p.add_argument("-m", "--model", required=True, help="the GGUF file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-np", "--parallel", type=int, default=None, help="server slots")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context of all slots")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--alias", default=None, help="the API's model name")
    p.add_argument("--no-webui", "--no-ui", action="store_true", help="no web page (always)")
    p.add_argument("--no-repack", action="store_true", help="no repacked weights")
    return p


def params_for(args: argparse.Namespace, xllamacpp: Any) -> Any:
    """xllamacpp's ``CommonParams`` for ``args``, as llama-server's parser would set them."""
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.ui = False
    if args.parallel is not None:
        params.n_parallel = args.parallel
    if args.ctx_size is not None:
        params.n_ctx = args.ctx_size
    if args.threads is not None:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    if args.alias is not None:
        params.model_alias = {args.alias}  # a set of names: the first is the API's
    params.no_extra_bufts = args.no_repack
    return params


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import xllamacpp
    except ImportError as exc:
        print(
            f"llama-server: xllamacpp is not installed ({exc}); pip install -e '.[local]'",
            file=sys.stderr,
        )
        return 1
    # Blocked before the server's threads exist, so they inherit the mask and the
    # signals wait here for sigwait instead of landing in a native thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        server = xllamacpp.Server(params_for(args, xllamacpp))
    except RuntimeError as exc:  # llama.cpp has logged why (model, port) on stderr
        print(f"llama-server: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"llama-server: listening on {server.listening_address}", file=sys.stderr, flush=True)
    received = signal.sigwait(STOP_SIGNALS)
    print(f"llama-server: {signal.Signals(received).name}, stopping", file=sys.stderr, flush=True)
    del server  # stops the HTTP server and the slots; returns in tens of milliseconds
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
