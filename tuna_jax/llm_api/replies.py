"""What makes a reply usable, checked before the reply is cached as good.

A server can answer HTTP 200 with JSON that an item still cannot use: choices that are strings, fewer
choices than ``n``, no log-probs although they were asked for, a judge reply whose ranking does not
parse. Such a reply must never sit in the store as a good answer (a rerun would read it back, send no
request and fail again). So every caller passes a *validator* to ``OpenAIClient.post``: a function of
the reply that raises :class:`ReplyError`. The client then records the reply as ``invalid`` (its cost is
counted; a rerun requests it again) instead of ``ok``. See ``client.py`` and ``store.py``.

The loop that asks a judge until its reply parses is ``ask.py`` (it uses the client, which uses
these checks).
"""
from __future__ import annotations

from typing import Any, Mapping


class ReplyError(ValueError):
    """A reply (or a sample) the item cannot use; the message says why. ``cause``: a short name for the kind of
    fault; the causes of :data:`SERVER_CAUSES` are the server's, the same for every item."""

    def __init__(self, message: str, cause: str = "unusable_reply"):
        super().__init__(message)
        self.cause = cause


# Faults that are the server's, not the item's: every item fails the same way, so the item loops stop after a
# few in a row (``io.items.run_items``) with this fix instead of paying for every item. Measured: llama.cpp's
# server and `transformers serve` ignore `n`; llama.cpp's chat API returns log-probs only when top_logprobs is
# sent; `transformers serve` returns none.
SERVER_CAUSES = {
    "server_ignores_n": "the server returns fewer responses than `n` asks for: rerun with --n-per-request 1",
    "no_logprobs": "the server returns no token log-probs: with --api chat add --top-logprobs 1 (llama.cpp "
                   "needs it), or use a server that returns them (see the server table in docs/feedback.md)",
}


def chat_content(response: Mapping[str, Any]) -> tuple[str, str | None]:
    """(assistant text, finish_reason) of the first choice of a chat reply, or ReplyError."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ReplyError("the reply has no choices")
    ch = choices[0]
    if not isinstance(ch, dict):
        raise ReplyError(f"choices[0] is a {type(ch).__name__}, not an object")
    msg = ch.get("message")
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, str):
        raise ReplyError("choices[0].message.content is not text")
    return content, ch.get("finish_reason")


def check_choices(response: Mapping[str, Any], n: int, api: str, logprobs: bool) -> list[dict]:
    """The ``n`` choices of a sampling reply sorted by ``index``, each an object with its text (``text``
    for the completions API, ``message.content`` for chat) and, when ``logprobs`` were asked for, their
    per-token list (``logprobs.token_logprobs`` / ``logprobs.content``); else ReplyError."""
    choices = response.get("choices")
    if not isinstance(choices, list):
        raise ReplyError("the reply has no choices list")
    for k, c in enumerate(choices):
        if not isinstance(c, dict):
            raise ReplyError(f"choices[{k}] is a {type(c).__name__}, not an object")
    if len(choices) != n:
        raise ReplyError(f"asked for n={n} responses, the server returned {len(choices)}; if it ignores `n`, "
                         f"use --n-per-request 1", cause="server_ignores_n" if len(choices) < n else "extra_choices")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0)
    for k, c in enumerate(choices):
        if api == "chat":
            msg = c.get("message")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise ReplyError(f"choices[{k}].message.content is not text")
        elif not isinstance(c.get("text"), str):
            raise ReplyError(f"choices[{k}].text is not text")
        if logprobs:
            lp = c.get("logprobs")
            toks = (lp.get("content") if api == "chat" else lp.get("token_logprobs")) if isinstance(lp, dict) else None
            if not isinstance(toks, list):
                where = "logprobs.content" if api == "chat" else "logprobs.token_logprobs"
                raise ReplyError(f"choices[{k}] has no {where} although log-probs were asked for (does the "
                                 f"server support them for this model?)", cause="no_logprobs")
    return choices
