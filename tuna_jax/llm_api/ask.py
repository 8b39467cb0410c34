"""Ask an LLM judge until its reply parses: the loop shared by the contextual-ranking judge and the
Vicuna / AlpacaEval reviews.

On a reply that does not parse, :func:`ask_parsed` asks again as a *new* request (the attempt number is
part of the cache key, so a deterministic server is not asked the same thing twice), up to
``max_parse_retries`` new requests per run. Attempts a previous run already found unparseable are read
back from the store without a request, so a finished item never costs anything twice and a failed one
gets fresh attempts on the rerun. What makes a reply usable: ``replies.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from .client import InvalidReplyError
from .replies import ReplyError, chat_content


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
