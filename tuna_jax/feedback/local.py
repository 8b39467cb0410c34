"""A local tuna-jax model as the probabilistic-ranking teacher (``tuna-jax teacher --local-model PATH``).

:class:`LocalTeacher` implements ``teacher.TeacherBackend`` with a model on this machine (a HF folder or a
tuna-jax params checkpoint), so Tuna_p data can come from any LLaMA-family teacher you can run, with no
endpoint, no API key and exact log-probs. ``sample(prompt, n)`` draws n responses from
``tuna_jax.generate.Sampler``, each token's log-prob under the model at temperature 1, the EOS included
when the response stopped, so ``sum(token_logprobs)`` is ``log p(r | i)`` over response tokens plus EOS
in the units the student's scorer counts. ``score(prompt, responses)`` teacher-forces given responses
with ``tuna_jax.scoring.Scorer``. A sample whose tokens are not the tokenizer's own segmentation of its
text is re-scored on the canonical tokens (``rescore``: ``"noncanonical"``, the default, ``"always"`` or
``"never"``), so the teacher's number for a text is always what ``tuna-jax score`` gives for it.

A sample depends on (seed, prompt, j) only (``rng_id = sha256(prompt)``). With a ``store`` every
``sample`` result is cached under (model path, prompt, n, sampling settings), so a killed run restarts
where it stopped; the key holds the model *path*: after changing the weights there, use a new store.

jax is imported inside functions: ``tuna-jax --help`` imports this module (``commands/teacher.py``: RESCORE).

Why re-score, randomness, resuming and throughput: docs/feedback.md#local.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

from tuna_jax.llm_api.replies import ReplyError
from tuna_jax.samples import Sample

RESCORE = ("noncanonical", "always", "never")


def stable_rng_id(*parts: Any) -> int:
    """A sampler ``rng_id`` in [0, 2**31) from text parts: the same on every run and machine."""
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


@dataclasses.dataclass
class LocalStats:
    """Counts over the teacher's lifetime: samples drawn, those whose tokens were not the canonical
    tokenisation of their text, those re-scored, responses scored, sample calls answered from the store."""

    samples: int = 0
    noncanonical: int = 0
    rescored: int = 0
    scored: int = 0
    cache_hits: int = 0

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


class LocalTeacher:
    """A ``TeacherBackend`` over a local tuna-jax model.

    Args:
      model_path: HF LlamaForCausalLM folder (safetensors) or tuna-jax params checkpoint. Ignored for loading
        when ``model`` is given (then it only names the model in cache keys; default "local").
      model: an already loaded ``Llama`` (tests, or sharing one model between tools).
      tokenizer: a ``templates.Tokenizer`` or a path (default: the model folder's).
      policy: the BOS/EOS policy (default ``SpecialTokenPolicy()``: BOS before the prompt, EOS after responses).
      mesh: the mesh the model lives on / is loaded onto (None: one device).
      temperature, top_p, top_k, max_new_tokens, seed: sampling (paper teacher: temperature 1, no filters).
      batch_size: sampler rows per device call; max_prompt_len: longer prompts fail the item.
      dtype: compute dtype when loading (float32 by default: teacher log-probs are compared across samples).
      rescore: "noncanonical" | "always" | "never" (docs/feedback.md#local).
      store: a ``llm_api.store.Store`` caching ``sample`` results (resumable runs), or None.
    """

    def __init__(self, model_path: str | None = None, *, model=None, tokenizer=None, policy=None, mesh=None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
                 seed: int = 0, batch_size: int = 8, max_prompt_len: int | None = None, dtype: str = "float32",
                 rescore: str = "noncanonical", store=None):
        from tuna_jax.data.templates import SpecialTokenPolicy, load_tokenizer
        from tuna_jax.generate import Sampler, SamplingParams

        if rescore not in RESCORE:
            raise ValueError(f"rescore={rescore!r}: choose one of {', '.join(RESCORE)}")
        if model is None:
            if model_path is None:
                raise ValueError("LocalTeacher needs model_path (a HF folder or params checkpoint) or model=")
            from tuna_jax.model import load_model

            model = load_model(model_path, mesh, dtype=dtype, param_dtype="float32")
        if tokenizer is None or isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
            src = tokenizer if tokenizer is not None else model_path
            if src is None:
                raise ValueError("LocalTeacher needs a tokenizer (or a model_path whose folder has one)")
            tokenizer = load_tokenizer(src)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {model.cfg.vocab_size}: they do not belong together")
        self.model_id = str(model_path or "local")
        self.tokenizer = tokenizer
        self.policy = policy if policy is not None else SpecialTokenPolicy()
        self.params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=max_new_tokens, seed=seed)
        self.sampler = Sampler(model, tokenizer, self.policy, mesh=mesh, batch_size=batch_size,
                               max_prompt_len=max_prompt_len)
        from tuna_jax.scoring import Scorer

        self.scorer = Scorer(model, mesh, batch_groups=batch_size)
        self.rescore = rescore
        self.store = store
        self.stats = LocalStats()

    # ------------------------------------------------------------------ helpers
    def _prompt_ids(self, prompt: str) -> list[int]:
        try:
            return self.sampler.encode(prompt)
        except ValueError as e:
            raise ReplyError(f"local teacher: {e}") from None

    def _canonical(self, text: str, token_ids: Sequence[int], finish_reason: str) -> list[int]:
        """The tokens the student will see for ``text``: encode_continuation(text) (+ the stop token)."""
        ids = self.tokenizer.encode_continuation(text) if text else []
        return ids + [int(token_ids[-1])] if finish_reason == "stop" else ids

    def _cache_key(self, prompt: str, n: int) -> str:
        from tuna_jax.llm_api.store import content_key

        body = {"prompt": prompt, "n": n, "sampling": dataclasses.asdict(self.params), "rescore": self.rescore,
                "add_bos": self.policy.add_bos, "bos_override": self.policy.bos_override}
        return content_key(f"local:{self.model_id}", "sample", body)

    # ------------------------------------------------------------------ TeacherBackend
    def sample(self, prompt: str, n: int) -> list[Sample]:
        """n responses to ``prompt`` (the full Alpaca prompt text), each with per-token log-probs [T] under the
        model at temperature 1 (EOS included when it stopped). Raises ReplyError when the prompt
        cannot be generated from (too long for the model or for ``max_prompt_len``): the item fails, the run
        goes on."""
        key = self._cache_key(prompt, n) if self.store is not None else None
        if key is not None:
            hit = self.store.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return [Sample(s["text"], s["token_logprobs"], s["finish_reason"]) for s in hit["response"]["samples"]]
        prompt_ids = self._prompt_ids(prompt)
        try:
            got = self.sampler.generate([prompt_ids], self.params, n=n, rng_ids=[stable_rng_id(prompt)])[0]
        except ValueError as e:
            raise ReplyError(f"local teacher: {e}") from None
        out = [Sample(g.text, list(g.token_logprobs), g.finish_reason) for g in got]
        redo = []
        for j, g in enumerate(got):
            canonical = self._canonical(g.text, g.token_ids, g.finish_reason)
            same = canonical == list(g.token_ids)
            self.stats.noncanonical += not same
            if (self.rescore == "always" or (self.rescore == "noncanonical" and not same)) and canonical:
                redo.append((j, canonical))
        if redo:
            from tuna_jax.scoring import Group

            lps = self.scorer.token_logprobs([Group(prompt_ids, [c for _, c in redo])])[0]
            for (j, _), lp in zip(redo, lps):
                out[j].token_logprobs = [float(x) for x in lp]
            self.stats.rescored += len(redo)
        self.stats.samples += len(out)
        if key is not None:
            resp = {"samples": [dataclasses.asdict(s) for s in out],
                    "usage": {"prompt_tokens": len(prompt_ids) * n,
                              "completion_tokens": sum(len(g.token_ids) for g in got)}}
            self.store.put_ok(key, resp, meta={"backend": "local", "model": self.model_id}, attempts=1)
        return out

    def score(self, prompt: str, responses: Sequence[str]) -> list[Sample]:
        """Per-token log-probs of each given response after ``prompt`` (response tokens + EOS, as
        ``tuna-jax score``). An empty response gets an empty list (the teacher drops it as empty_response)."""
        prompt_ids = self._prompt_ids(prompt)
        from tuna_jax.data.templates import encode_response
        from tuna_jax.scoring import Group

        conts, where = [], []
        for k, r in enumerate(responses):
            if r != "":
                conts.append(encode_response(self.tokenizer, r, self.policy))
                where.append(k)
        try:
            lps = self.scorer.token_logprobs([Group(prompt_ids, conts)])[0] if conts else []
        except ValueError as e:
            raise ReplyError(f"local teacher: {e}") from None
        out = [Sample(r, [], "stop") for r in responses]
        for k, lp in zip(where, lps):
            out[k].token_logprobs = [float(x) for x in lp]
        self.stats.scored += len(conts)
        return out
