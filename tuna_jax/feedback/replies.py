"""What makes a reply usable, checked before the reply is cached as good.

A server can answer HTTP 200 with JSON that an item still cannot use: choices that are strings, fewer
choices than ``n``, no log-probs although they were asked for, a judge reply whose ranking does not
parse. Such a reply must never sit in the store as a good answer (a rerun would read it back, send no
request and fail again). So every caller passes a *validator* to ``OpenAIClient.post``: a function of
the reply that raises :class:`ReplyError`. The client then records the reply as ``invalid`` (its cost is
counted; a rerun requests it again) instead of ``ok``. See ``client.py`` and ``store.py``.

:func:`ask_parsed` is the loop shared by the LLM judges (contextual ranking, Vicuna / AlpacaEval
reviews): ask, parse, and on a reply that does not parse ask again as a *new* request (the attempt
number is part of the cache key, so a deterministic server is not asked the same thing twice), up to
``max_parse_retries`` new requests per run. Attempts a previous run already found unparseable are read
back from the store without a request, so a finished item never costs anything twice and a failed one
gets fresh attempts on the rerun.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence


class ReplyError(ValueError):
    """A reply (or a sample) the item cannot use; the message says why."""


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
                         f"use --n-per-request 1")
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
                                 f"server support them for this model?)")
    return choices


@dataclasses.dataclass
class Parsed:
    """The outcome of :func:`ask_parsed`: ``value`` (what ``parse`` returned; None if no reply parsed),
    ``tries`` ([{"reply", "finish_reason", "error"?}], every reply seen, oldest first), ``counters``."""

    value: Any
    tries: list
    counters: dict


def ask_parsed(client, messages: Sequence[Mapping[str, str]], parse: Callable[[str], Any], *,
               max_parse_retries: int, params: Mapping[str, Any], max_attempts: int = 100) -> Parsed:
    """Ask ``messages`` until ``parse(reply text)`` succeeds (see the module docstring).

    ``parse`` raises :class:`ReplyError` (or a subclass) for a reply it cannot read. API errors other than
    an unusable reply (HTTP failures, budget, fatal endpoint errors) propagate to the caller. Counters:
    ``unparsed_replies`` (replies that did not parse, from the store or new), ``reply_length_cut``.
    """
    from .client import InvalidReplyError

    def validate(response: Mapping[str, Any]) -> None:
        parse(chat_content(response)[0])

    tries: list[dict] = []
    counters: dict[str, int] = {}
    new_failures = attempt = 0
    while new_failures <= max_parse_retries and attempt < max_attempts:
        extra = {"parse_attempt": attempt} if attempt else None  # attempt 0 keeps the plain request's key
        try:
            r = client.chat(messages, extra_key=extra, validate=validate, known_invalid="raise", invalid_retries=0,
                            n=1, **params)
        except InvalidReplyError as e:
            try:
                reply, finish = chat_content(e.response or {})
            except ReplyError:
                reply, finish = None, None
            if finish == "length":  # a reply cut at max_tokens: the verdict is often missing
                counters["reply_length_cut"] = counters.get("reply_length_cut", 0) + 1
            counters["unparsed_replies"] = counters.get("unparsed_replies", 0) + 1
            # The same entry whether the reply is new or read back: a rerun writes the same record.
            tries.append({"reply": reply, "finish_reason": finish, "error": e.reason})
            new_failures += not e.cached
            attempt += 1
            continue
        reply, finish = chat_content(r.response)
        if finish == "length":
            counters["reply_length_cut"] = counters.get("reply_length_cut", 0) + 1
        tries.append({"reply": reply, "finish_reason": finish})
        return Parsed(parse(reply), tries, counters)
    return Parsed(None, tries, counters)
