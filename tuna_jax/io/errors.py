"""The one bad-input error type.

Every reader in the project raises :class:`InputError` for input a user can fix: a missing or
malformed file, a line that is not JSON, a field of the wrong type, a config key that does not
exist. ``str(e)`` is one line that starts with the place (``FILE:LINE`` or ``FILE``) and names the
field, so the CLI prints it as it is.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: where it is, which field, what is wrong.

    Two ways to build one::

        InputError("data.jsonl:3", "candidates", "empty list", reason="empty_candidates")
            -> "data.jsonl:3: field 'candidates': empty list"
        InputError("data.jsonl:3: expected a JSON object, got list")     # a whole message

    Attributes: ``where`` ("FILE:LINE", "FILE" or None), ``field`` (the key, or None), ``reason``
    (a short counter name for skip reports, e.g. "malformed_json", "wrong_type").
    """

    def __init__(self, where: str | None, field: str | None = None, message: str | None = None,
                 reason: str = "invalid"):
        if message is None:  # the one-argument form: ``where`` holds the whole message
            message, where = where, None
        self.where, self.field, self.reason = where, field, reason
        loc = f"{where}: " if where else ""
        if field:
            loc += f"field {field!r}: "
        super().__init__(loc + str(message))


class ServiceError(RuntimeError):
    """A remote service (an LLM endpoint) that failed for good, after its retries; ``str(e)`` says why in one line
    the CLI prints as it is. Raised as ``llm_api.client.APIError``."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose or could not go on, with its exit status: the CLI and the pipeline
    print ``str(e)`` as one line and exit with ``exit_status`` (e.g. 128 + N for signal N, 3 for a
    diverged loss). Raised by training (``train.Interrupted``, ``train.TrainingDiverged``)."""

    exit_status: int = 1
