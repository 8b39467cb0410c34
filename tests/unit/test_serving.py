"""``serving.ServedSampler`` against the loopback OpenAI-compatible server: the requests it sends (the prompt as
text, n split by n_per_request, one seed per request, top_k only when set), the samples it returns, the cache that
makes a second call free, and the refusals. The real serving engine: tests/e2e/test_serving.py."""
from __future__ import annotations

import pytest

from tests.support.openai_server import OpenAIServer
from tuna_jax.generate import SamplingParams
from tuna_jax.llm_api.client import ClientConfig, OpenAIClient
from tuna_jax.llm_api.store import Store
from tuna_jax.serving import ServedSampler, request_seed


def _sampler(srv, tmp_path, **kw):
    client = OpenAIClient(ClientConfig(base_url=srv.base_url, model="m", max_retries=0, concurrency=2),
                          Store(str(tmp_path / "s.jsonl")))
    return ServedSampler(client, **kw)


def test_requests_split_seeded_and_cached(tmp_path):
    with OpenAIServer() as srv:
        sampler = _sampler(srv, tmp_path, n_per_request=2)
        params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3)
        out = sampler.generate(["PROMPT ONE", "PROMPT TWO"], params, n=3, rng_ids=[11, 12])
        assert [len(row) for row in out] == [3, 3]
        assert all(isinstance(s.text, str) and s.token_ids is None and s.finish_reason for r in out for s in r)
        bodies = sorted((r["body"]["prompt"], r["body"]["n"], r["body"]["seed"]) for r in srv.requests)
        assert bodies == sorted([(p, k, request_seed(3, r, g)) for p, r in (("PROMPT ONE", 11), ("PROMPT TWO", 12))
                                 for g, k in ((0, 2), (1, 1))])
        body = srv.requests[0]["body"]
        assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 5
        assert "top_k" not in body and "logprobs" not in body  # only what was asked for
        # the same call again: every reply from the store, nothing sent
        assert sampler.generate(["PROMPT ONE", "PROMPT TWO"], params, n=3, rng_ids=[11, 12]) == out
        assert srv.count() == 4
        sampler.generate(["PROMPT ONE"], SamplingParams(temperature=1.0, top_k=5, max_new_tokens=5), n=1)
        assert srv.requests[-1]["body"]["top_k"] == 5


def test_reported_tokens_and_refusals(tmp_path):
    with OpenAIServer() as srv:
        sampler = _sampler(srv, tmp_path)
        (s,), = sampler.generate(["HELLO"], SamplingParams(temperature=0, max_new_tokens=4), n=1)
        assert s.num_tokens == s.reported_tokens > 0  # usage.completion_tokens of a one-response request
        with pytest.raises(ValueError, match="token-id prompts cannot be sent"):
            sampler.encode([1, 2, 3], "p.jsonl:2")
        assert sampler.settings() == {"base_url": srv.base_url, "served_model": "m", "n_per_request": None}
        with pytest.raises(ValueError, match="n_per_request=0"):
            ServedSampler(sampler.client, n_per_request=0)


def test_no_api_key_travels_to_a_serving_engine_unless_named(tmp_path, monkeypatch, capsys):
    """`--base-url` generation sends no Authorization header by default, though OPENAI_API_KEY (the teacher's and
    the judge's) is set: a server that wants exactly that key refuses the request. `--api-key-env NAME` sends the
    key NAME holds."""
    from tuna_jax.cli import parse_config

    openai_key, server_key = "sk-openai-must-not-travel-0123", "sk-server-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", openai_key)
    monkeypatch.setenv("SERVER_KEY", server_key)
    params = SamplingParams(temperature=0, max_new_tokens=3)

    def served(srv, out, *extra):
        argv = ["generate", "m", "p.jsonl", str(tmp_path / out), "--base-url", srv.base_url, "--max-retries", "0",
                *extra]
        return parse_config(argv).run_served("generate", "m", str(tmp_path / out),
                                             lambda sampler: sampler.generate(["HELLO"], params))

    with OpenAIServer(api_key=openai_key) as srv:
        status, _ = served(srv, "a.jsonl")
        assert status == 2 and "401" in capsys.readouterr().err  # refused: the request carried no key
        assert [r["auth_ok"] for r in srv.requests] == [False]
    with OpenAIServer(api_key=server_key) as srv:
        status, out = served(srv, "b.jsonl", "--api-key-env", "SERVER_KEY")
        assert status == 0 and out[0][0].text
        assert [r["auth_ok"] for r in srv.requests] == [True]
