"""One generated response with its token log-probs: what the sampler returns and what every teacher
backend (a remote endpoint, a local model) hands to the teacher.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Sample:
    """One response.

    text: the response text (None when the sampler has no tokenizer).
    token_logprobs: [T] log p(token) in nats under the model at temperature 1 (the stop token included when
      ``finish_reason == "stop"`` and the backend reports it); None where the backend gave none; an entry
      may be None or the -9999 sentinel where an endpoint lacks the value (the teacher checks them).
    finish_reason: "stop" | "length" | None.
    token_ids: [T] the generated ids (stop token included), None when unknown (a remote endpoint).
    sampling_logprobs: [T] log q(token) under the distribution actually sampled from (tempered, filtered);
      0.0 for greedy decoding; None when not recorded.
    reported_tokens: the response's length in tokens as a serving engine reported it (``usage``), where neither
      token_ids nor token_logprobs are known.
    """

    text: str | None
    token_logprobs: list | None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    sampling_logprobs: list[float] | None = None
    reported_tokens: int | None = None

    @property
    def logprob_sum(self) -> float:
        """sum of token_logprobs: log p(response [+ EOS] | prompt) under the model, nats."""
        return float(sum(self.token_logprobs or ()))

    @property
    def num_tokens(self) -> int:
        """Tokens in the response (the stop token included when present)."""
        if self.token_ids is not None:
            return len(self.token_ids)
        if self.token_logprobs is None and self.reported_tokens is not None:
            return self.reported_tokens
        return len(self.token_logprobs or ())

    def to_json(self, sampling_logprobs: bool = False) -> dict:
        """The output record of ``tuna-jax generate``: text, token_ids, token_logprobs, finish_reason."""
        out = {"text": self.text, "token_ids": self.token_ids, "token_logprobs": self.token_logprobs,
               "finish_reason": self.finish_reason}
        if sampling_logprobs:
            out["sampling_logprobs"] = self.sampling_logprobs
        return out
