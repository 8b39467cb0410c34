"""Pieces every command shares, each in one place: the input-error type (``errors``), paths that may be
local or in cloud storage (``paths``), JSON Lines reading and writing with the settings sidecar (``jsonl``),
a log that grows by lines in either kind of storage (``linelog``), the output lock (``lock``), the item loop
of the remote-call commands (``items``) and the CLI plumbing: logging, one-line errors, run reports (``cli``).

Commands (``tuna-jax teacher``, ``judge``, ``generate``, ``score``, ``sample-diverse``, ``eval``, ...)
import from here; nothing here imports a command module, so no command needs another command for
its helpers. Nothing here imports jax: ``tuna-jax --help`` stays instant.
"""
