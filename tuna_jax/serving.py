"""Generation through an OpenAI-compatible serving engine (vLLM, SGLang, TGI, llama.cpp, `transformers serve`) that
serves the exported HF folder: :class:`ServedSampler` stands where ``generate.Sampler`` stands, for `tuna-jax
generate`, `sample-diverse` (``--base-url``) and `eval run` (``generation.base_url``).

The prompt goes as text to the completions API, exactly the Alpaca (or raw) prompt the local sampler would
encode; the server's tokenizer adds BOS as the exported tokenizer does. Chat is not used: it would wrap the prompt
in the server's chat template, which an Alpaca-trained model never saw. The n samples of a prompt go in requests of
``n_per_request``; request g of a prompt carries the seed ``request_seed(seed, rng_id, g)``, so a rerun sends the
same bodies and the request store (``llm_api/store.py``) answers them: nothing is paid twice, and a killed run
resumes. Token ids are not in the API (``token_ids`` is null); the completion's length comes from ``usage`` when a
request has one response; token log-probs are asked for only with ``logprobs=True``.

How to serve a checkpoint and what each server supports: docs/workflow.md#serving.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from typing import Sequence

from tuna_jax.llm_api.client import OpenAIClient
from tuna_jax.llm_api.replies import check_choices
from tuna_jax.samples import Sample


def request_seed(seed: int, rng_id: int, group: int) -> int:
    """The seed of request ``group`` of the prompt whose random stream is ``rng_id``: 31 bits of sha256."""
    h = hashlib.sha256(f"{seed}\x00{rng_id}\x00{group}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


class ServedSampler:
    """``generate.Sampler``'s interface over an endpoint: ``encode`` (text only), ``check_length`` (the server
    checks), ``generate`` and ``settings``. client: an ``OpenAIClient`` (its store caches every request, its
    ``concurrency`` is the number of requests in flight); n_per_request: responses per request (None: all n)."""

    tokenizer = None  # the server's; nothing is tokenised here
    gives_text = True

    def __init__(self, client: OpenAIClient, n_per_request: int | None = None, logprobs: bool = False):
        if n_per_request is not None and n_per_request < 1:
            raise ValueError(f"n_per_request={n_per_request}: must be >= 1")
        self.client, self.n_per_request, self.logprobs = client, n_per_request, logprobs
        self.batch_size = max(1, client.config.concurrency)

    def encode(self, prompt: str | Sequence[int], where: str = "prompt") -> str:
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: token-id prompts cannot be sent to a serving engine (not every server takes "
                             f"them); give 'prompt' text or an 'instruction'")
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
        return prompt

    def check_length(self, n_prompt: int, max_new_tokens: int, where: str = "prompt") -> None:
        """Nothing to check here: the server refuses a prompt over its context with a 400 naming it."""

    def settings(self) -> dict:
        """What else defines the samples, for OUT.params.json (a resume with another server is refused)."""
        return {"base_url": self.client.base_url, "served_model": self.client.config.model,
                "n_per_request": self.n_per_request}

    def _body(self, prompt: str, k: int, params, seed: int) -> dict:
        body = {"model": self.client.config.model, "prompt": prompt, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "n": k, "seed": seed}
        if params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.top_k > 0:
            body["top_k"] = params.top_k  # vLLM, SGLang, TGI and llama.cpp take it; OpenAI and transformers refuse
        if self.logprobs:
            body["logprobs"] = 1
        return body

    def _request(self, prompt: str, k: int, params, seed: int) -> list[Sample]:
        logprobs = self.logprobs

        def validate(response):
            check_choices(response, k, "completions", logprobs=logprobs)

        r = self.client.post("completions", self._body(prompt, k, params, seed), validate=validate)
        choices = check_choices(r.response, k, "completions", logprobs=logprobs)
        usage = r.response.get("usage") if k == 1 else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        out = []
        for ch in choices:
            lp = ch.get("logprobs") if logprobs else None
            out.append(Sample(text=ch["text"], token_logprobs=lp.get("token_logprobs") if lp else None,
                              finish_reason=ch.get("finish_reason"),
                              reported_tokens=tokens if isinstance(tokens, int) else None))
        return out

    def generate(self, prompts: Sequence[str], params, n: int = 1,
                 rng_ids: Sequence[int] | None = None) -> list[list[Sample]]:
        """``n`` samples per prompt, ``out[i][j]`` sample j of prompt i, as ``Sampler.generate``; the requests go
        out ``client.config.concurrency`` at a time."""
        if n < 1:
            raise ValueError(f"n={n}: must be >= 1")
        rng_ids = list(range(len(prompts))) if rng_ids is None else [int(r) for r in rng_ids]
        per = min(self.n_per_request or n, n)
        jobs = [(i, g, min(per, n - g * per)) for i in range(len(prompts)) for g in range(-(-n // per))]
        texts = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        failed = threading.Event()  # after a failure no new request goes out (the run stops on it)

        def request(text: str, k: int, seed: int) -> list[Sample]:
            if failed.is_set():
                return []
            try:
                return self._request(text, k, params, seed)
            except BaseException:
                failed.set()
                raise

        pool = concurrent.futures.ThreadPoolExecutor(self.batch_size)
        try:
            futures = [pool.submit(request, texts[i], k, request_seed(params.seed, rng_ids[i], g))
                       for i, g, k in jobs]
            out: list[list[Sample]] = [[] for _ in prompts]
            for (i, _, _), fut in zip(jobs, futures):
                out[i].extend(fut.result())
        finally:  # on a failure (or Ctrl-C) the requests not yet sent are dropped; those in flight finish
            pool.shutdown(wait=True, cancel_futures=True)
        return out
