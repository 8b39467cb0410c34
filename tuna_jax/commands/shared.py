"""Settings several commands share, each declared once: a command's ``Config`` inherits the ones it takes
(``class Config(Runtime, Progress)``), so ``--mesh`` means the same, with the same help, everywhere."""
from __future__ import annotations

import contextlib
import dataclasses
import sys

from tuna_jax.io.fields import arg
from tuna_jax.llm_api.client import ClientConfig, OpenAIClient

MESH_HELP = "device mesh sizes, one may be -1 (default: all devices on fsdp)"
TOKENIZER_HELP = "tokenizer folder or tokenizer.model (default: the model's)"
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(kw_only=True)
class Mesh:
    mesh: str | None = arg(None, MESH_HELP, metavar="DATA,FSDP,TENSOR")

    def make_mesh(self):
        """The device mesh of ``--mesh``, after the multi-host start-up (imports jax)."""
        from tuna_jax import parallel

        parallel.initialize_distributed()
        return parallel.make_mesh(self.mesh)


@dataclasses.dataclass(kw_only=True)
class Runtime(Mesh):
    """Where and how a model runs: its tokenizer, compute dtype and device mesh."""

    tokenizer: str | None = arg(None, TOKENIZER_HELP)
    dtype: str = arg("float32", "compute dtype", choices=DTYPES)


@dataclasses.dataclass(kw_only=True)
class Progress:
    no_progress: bool = arg(False, "no progress bar")


ENDPOINT = "endpoint (OpenAI-compatible: OpenAI, vLLM, SGLang, llama.cpp)"
_CLIENT = ClientConfig()  # the client's defaults are the flags' (llm_api imports only the standard library)


@dataclasses.dataclass(kw_only=True)
class Retry:
    """How requests to an endpoint are sent and retried (``llm_api/client.py``; times in seconds)."""

    api_key_env: str = arg(_CLIENT.api_key_env, "name of the environment variable that holds the API key; the key "
                           "itself is never given on the command line, logged or stored", group=ENDPOINT)
    timeout: float = arg(_CLIENT.timeout_s, "seconds one request attempt may take in all (connect, wait, read the "
                         "whole reply) before it is retried", group=ENDPOINT)
    max_retries: int = arg(_CLIENT.max_retries, "retries on 429, 5xx, timeouts and connection errors",
                           group=ENDPOINT)
    backoff: float = arg(_CLIENT.backoff_initial_s, "first retry delay in seconds, doubled each retry up to "
                         "--backoff-max", group=ENDPOINT)
    backoff_max: float = arg(_CLIENT.backoff_max_s, "longest retry delay in seconds", group=ENDPOINT)
    max_retry_after: float = arg(_CLIENT.max_retry_after_s, "longest wait in seconds a server's Retry-After header "
                                 "may impose before a retry", group=ENDPOINT)
    concurrency: int = arg(_CLIENT.concurrency, "requests in flight at once", group=ENDPOINT)

    def retry_config(self, base_url: str, model: str):
        """The client's ``ClientConfig`` for ``base_url`` and ``model`` with these settings."""
        return ClientConfig(base_url=base_url, model=model, api_key_env=self.api_key_env, timeout_s=self.timeout,
                            max_retries=self.max_retries, backoff_initial_s=self.backoff,
                            backoff_max_s=self.backoff_max, max_retry_after_s=self.max_retry_after,
                            concurrency=self.concurrency)


@dataclasses.dataclass(kw_only=True)
class Endpoint(Retry):
    """An OpenAI-compatible endpoint and its retry policy."""

    base_url: str = arg(_CLIENT.base_url, "API base URL including the version, e.g. http://localhost:8000/v1",
                        group=ENDPOINT)
    model: str | None = arg(None, "model name as the server knows it", group=ENDPOINT)

    def client_config(self):
        """The client's ``ClientConfig`` for these settings."""
        return self.retry_config(self.base_url, self.model or "")


BUDGET = "cache and budget"


@dataclasses.dataclass(kw_only=True)
class Budget:
    """The request store (cache and ledger, ``llm_api/store.py``) and the spending limits."""

    store: str | None = arg(None, "append-only JSONL cache of every request (default: OUT.store.jsonl); rerunning "
                            "with the same store repeats no finished request", group=BUDGET)
    no_retry_failed: bool = arg(False, "do not retry requests that failed in an earlier run; report them as failed "
                                "items", group=BUDGET)
    max_usd: float | None = arg(None, "stop cleanly once the store's total spend reaches this many USD (all runs)",
                                group=BUDGET)
    max_requests: int | None = arg(None, "stop cleanly once the store has sent this many HTTP requests (all runs)",
                                   group=BUDGET)
    price_input: float = arg(0.0, "USD per 1M prompt tokens, for cost accounting", group=BUDGET)
    price_output: float = arg(0.0, "USD per 1M completion tokens, for cost accounting", group=BUDGET)

    def open_store(self, out_path: str):
        """The request store (``--store``, else OUT.store.jsonl), with these prices and limits."""
        from tuna_jax.llm_api.store import Budget as Limits
        from tuna_jax.llm_api.store import Prices, Store

        return Store(self.store or (out_path + ".store.jsonl"), prices=Prices(self.price_input, self.price_output),
                     budget=Limits(self.max_usd, self.max_requests), retry_failed=not self.no_retry_failed)


@dataclasses.dataclass(kw_only=True)
class Sampling:
    """Sampling with the project's sampler (``tuna_jax/generate.py``), beyond the temperature."""

    top_p: float = arg(1.0, "nucleus mass (1 = off)")
    top_k: int = arg(0, "keep the k most likely tokens (0 = off)")
    max_new_tokens: int = arg(256, "longest response in tokens")
    seed: int = arg(0, "sampling seed")
    batch_size: int = arg(8, "rows (prompt x sample) per device call")
    max_prompt_len: int | None = arg(None, "longest prompt in tokens (longer: error)")


SERVED = "serving engine (generate with an OpenAI-compatible server instead of on this machine)"


@dataclasses.dataclass(kw_only=True)
class Served(Retry, Budget):
    """Generation through a serving engine that serves MODEL's exported HF folder (``tuna_jax/serving.py``); the
    local-sampler settings (dtype, mesh, batch size, tokenizer, top-k aside) do not apply then."""

    base_url: str | None = arg(None, "the server's API base URL including the version, e.g. "
                               "http://127.0.0.1:8000/v1 (vLLM, SGLang, TGI, llama.cpp, transformers serve); "
                               "requests are cached in --store", group=SERVED)
    # Not the endpoint commands' OPENAI_API_KEY: an OpenAI key must not travel to a serving engine by default.
    api_key_env: str = arg("", "name of the environment variable that holds the server's API key, if it wants one "
                           "(default: no key is sent)", group=SERVED)
    served_model: str | None = arg(None, "model name as the server knows it (default: MODEL as given)",
                                   group=SERVED)
    n_per_request: int | None = arg(None, "responses per request; 1 for servers that ignore `n` (llama.cpp, "
                                    "transformers serve) (default: all of a prompt's in one request)",
                                    group=SERVED)

    def run_served(self, name: str, model: str, out_path: str, work) -> tuple[int, object]:
        """``(0, work(sampler))`` with a ``ServedSampler`` for ``model`` over its request store (``--store``, else
        OUT.store.jsonl), whose summary is printed as ``NAME: ...``; ``(2, None)`` when the budget or a fatal
        endpoint error stopped the run (reported in one line; rerunning continues)."""
        from tuna_jax.io.cli import report_stop
        from tuna_jax.io.items import StopRun
        from tuna_jax.serving import ServedSampler

        client = OpenAIClient(self.retry_config(self.base_url, self.served_model or model))
        with self.open_store(out_path) as store:
            client.store = store
            try:
                result = work(ServedSampler(client, n_per_request=self.n_per_request))
            except StopRun as e:
                return report_stop(name, e, store), None
            print(f"{name}: {store.summary()}", file=sys.stderr)
        return 0, result


@contextlib.contextmanager
def endpoint_session(cfg, out_path: str):
    """``(client, store)`` of a command with an ``Endpoint`` and a ``Budget``: the client is made first, so a bad
    ``--base-url`` is refused before the request store (``--store``, else OUT.store.jsonl) is created; then it caches
    in that store."""
    client = OpenAIClient(cfg.client_config())
    with cfg.open_store(out_path) as store:
        client.store = store
        yield client, store
