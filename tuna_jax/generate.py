"""The sampler: batched prefill + decode over a fixed-size, donated KV cache, with token log-probs.

Used by the local teacher backend, diverse sampling, the PRM and evaluation (greedy), and by ``tuna-jax
generate`` (:func:`generate_file`; the command and its flags: ``tuna_jax/commands/generate.py``).

:class:`Sampler` runs B rows at a time, prompts LEFT-padded to a bucketed length P so that one
``cache.index`` serves all rows and few shapes compile: ``prefill`` writes all but the last prompt
column into a fresh [N_l, B, P-1+T, K, Dh] cache (T = max_new_tokens), then ``decode``, one jitted
``lax.while_loop`` over the donated cache, samples until every row stopped or T tokens were made (no
host round trip per token). Temperature, top-p, top-k and seed are traced values, so a hotter retry
does not recompile; filters apply in Hugging Face's and vLLM's order, and ``top_k=1`` is exactly
greedy. A sample depends on (seed, prompt, rng_id, j) only: not on the batch, the order or the mesh.

Per sample (:class:`tuna_jax.samples.Sample`): ``token_ids`` (with the stop token when it stopped),
``text``, ``token_logprobs`` (float32, under the model at temperature 1, untempered and unfiltered:
what a teacher score needs), ``sampling_logprobs`` (under the distribution sampled from) and
``finish_reason`` ("stop" or "length"). jax/flax are imported inside functions.

How a batch runs, randomness and each returned field: docs/feedback.md#sampler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any, Sequence

from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import check_settings, dumps, iter_jsonl, read_out_lines
from tuna_jax.io.lock import OutputLock
from tuna_jax.samples import Sample

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"


# ---- public types ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy (argmax); ``top_k=0`` and ``top_p=1`` disable
    those filters. ``seed`` fixes the samples (what they depend on: docs/feedback.md#sampler)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**32)")

    @classmethod
    def greedy(cls, max_new_tokens: int = 256) -> "SamplingParams":
        return cls(temperature=0.0, max_new_tokens=max_new_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


# ---- device code -----------------------------------------------------------------------

def _row_keys(seed, rng_ids, sample_ids):
    """[B] typed PRNG keys, one per row: fold_in(fold_in(key(seed), rng_id), sample_id)."""
    import jax

    base = jax.random.key(seed)
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base, r), s))(rng_ids, sample_ids)


def sample_logits(logits, keys, step, temperature, top_p, top_k):
    """Pick one token per row.

    logits [B, V] float32; keys [B] typed PRNG keys (step t uses ``fold_in(key, t)``); step, temperature,
    top_p, top_k: scalars (traced). Returns token [B] int32, logprob [B] float32 (log-softmax of the
    raw logits: the model at temperature 1) and sampling_logprob [B] float32 (under the tempered,
    filtered, renormalised distribution; 0 for greedy).
    """
    import jax
    import jax.numpy as jnp

    b, v = logits.shape
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)

    def pick(x, idx):
        return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros((b,), jnp.float32)

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
        # Gumbel-max == categorical sampling; one noise vector per row from the row's own key,
        # drawn once for both branches below (the PRNG is the slowest thing here to compile).
        noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), (v,), jnp.float32))(keys)

        def plain():
            tok = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
            return tok, pick(jax.nn.log_softmax(scaled, axis=-1), tok)

        def filtered():
            iota = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
            # Descending by value, ties by token id (stable sort of the negated values).
            neg, perm = jax.lax.sort((-scaled, iota), dimension=-1, is_stable=True, num_keys=1)
            s = -neg
            rank = jnp.arange(v)[None, :]
            keep = (top_k <= 0) | (rank < top_k)
            s = jnp.where(keep, s, -jnp.inf)
            probs = jax.nn.softmax(s, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep &= (top_p >= 1.0) | (mass_before < top_p)  # rank 0 always kept (mass_before == 0)
            s = jnp.where(keep, s, -jnp.inf)
            # The noise is indexed by rank here, not by token id: still iid Gumbel per candidate.
            j = jnp.argmax(s + noise, axis=-1).astype(jnp.int32)
            return pick(perm, j), pick(jax.nn.log_softmax(s, axis=-1), j)

        return jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, plain)

    tok, sampling_lp = jax.lax.cond(temperature <= 0, greedy, sampled)
    logprob = pick(jax.nn.log_softmax(logits, axis=-1), tok)
    return tok, logprob, sampling_lp


def _project(model, h):
    """h [B, D] (compute dtype) -> logits [B, V] float32 (f32 accumulation, as losses.py scores)."""
    import jax.numpy as jnp

    from tuna_jax.model.llama import DTYPES
    from tuna_jax.parallel import constrain

    w = model.lm_head_weight().astype(DTYPES[model.cfg.dtype])
    logits = jnp.einsum("bd,dv->bv", h, w, preferred_element_type=jnp.float32)
    # Replicate the vocabulary axis: the sort / argmax below then never crosses devices.
    return constrain(logits, ("batch", None))


def _constrain_cache(cache):
    from tuna_jax.model.llama import KVCache
    from tuna_jax.parallel import constrain

    kv_axes = ("layers", "batch", "length", "kv_heads", "head_dim")
    return KVCache(constrain(cache.k, kv_axes), constrain(cache.v, kv_axes),
                   constrain(cache.segment_ids, ("batch", "length")),
                   constrain(cache.branch_ids, ("batch", "length")), cache.index)


def _prefill(graphdef, state, input_ids, positions, segment_ids, *, cache_len):
    """The prompt minus its last column into a fresh cache.

    input_ids, positions, segment_ids [B, P-1] (left-padded prompts without their last token) ->
    the cache [N_l, B, cache_len, K, Dh] with those tokens in slots [0, P-1) and ``index = P-1``.
    The last prompt token goes through the first decode step instead: it produces step 0's logits
    there, so sampling is compiled once (inside the loop) rather than also here, and no [B, P, V]
    logits or vocabulary projection is needed in the prefill at all.
    """
    from flax import nnx

    from tuna_jax.model.llama import KVCache

    model = nnx.merge(graphdef, state)
    cache = _constrain_cache(KVCache.create(model.cfg, input_ids.shape[0], cache_len))
    _, cache = model.hidden_states(input_ids, positions, segment_ids, cache=cache)
    return _constrain_cache(cache)


def _decode(graphdef, state, cache, last_prompt_token, prompt_len, active, seed, rng_ids, sample_ids, knobs,
            stop_ids, pad_id, *, max_new_tokens):
    """The decode loop over the donated cache: step t feeds x_t (x_0 = the last prompt token, then
    the token sampled at t-1) at position prompt_len - 1 + t, cache slot P - 1 + t, and samples token t.

    last_prompt_token [B] int32; prompt_len [B] int32 (real prompt tokens); active [B] bool (False:
    a dummy row, finished from the start); seed, rng_ids, sample_ids: the rows' random streams;
    knobs: temperature, top_p, top_k scalars; stop_ids [S] int32 and pad_id (written after a row
    stopped) -- all traced, so none of them recompiles. Returns tokens, logprobs, sampling_logprobs
    [B, T], lengths [B] int32 (tokens produced, the stop token included), stopped [B] bool, and the
    final cache (returned so that the donated input buffers alias it: updated in place).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    b, t_max = last_prompt_token.shape[0], max_new_tokens
    keys = _row_keys(seed, rng_ids, sample_ids)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    def cond(carry):
        t, done = carry[0], carry[6]
        return (t < t_max) & ~jnp.all(done)

    def body(carry):
        t, prev, cache, tokens, lps, slps, done, lengths = carry
        model = nnx.merge(graphdef, state)
        pos = (prompt_len - 1 + t)[:, None]
        h, cache = model.hidden_states(prev[:, None], pos, jnp.ones_like(pos), cache=cache)
        logits = _project(model, h[:, 0])
        tok, lp, slp = sample_logits(logits, keys, t, knobs["temperature"], knobs["top_p"], knobs["top_k"])
        tok = jnp.where(done, pad_id, tok)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, jnp.where(done, 0.0, lp)[:, None], t, axis=1)
        slps = jax.lax.dynamic_update_slice_in_dim(slps, jnp.where(done, 0.0, slp)[:, None], t, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(tok)
        return t + 1, tok, _constrain_cache(cache), tokens, lps, slps, done, lengths

    carry = (jnp.asarray(0, jnp.int32), last_prompt_token, cache, jnp.full((b, t_max), pad_id, jnp.int32),
             jnp.zeros((b, t_max), jnp.float32), jnp.zeros((b, t_max), jnp.float32), ~active,
             jnp.zeros((b,), jnp.int32))
    _, _, cache, tokens, lps, slps, _, lengths = jax.lax.while_loop(cond, body, carry)
    last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    return tokens, lps, slps, lengths, active & (lengths > 0) & is_stop(last), cache


@functools.cache
def _kernels():
    """The jitted prefill and decode (built once per process; the graphdef is a static argument,
    so models of one architecture share compilations)."""
    import jax

    prefill = jax.jit(_prefill, static_argnames=("graphdef", "cache_len"))
    decode = jax.jit(_decode, static_argnames=("graphdef", "max_new_tokens"),
                     donate_argnames=("cache",))
    return prefill, decode


# ---- the sampler -----------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Sampler:
    """Batched generation with a model on an optional mesh.

    model: a ``Llama`` (e.g. from ``load_model(path, mesh)``); tokenizer: a ``templates.Tokenizer``
    (needed for text prompts and to fill ``Sample.text``); policy: the BOS policy applied to text
    prompts (``encode_prompt``; token-id prompts are used exactly as given); mesh: the
    ("data", "fsdp", "tensor") mesh the model lives on (None: one device); batch_size: rows per
    device call (rounded up to a multiple of data x fsdp); max_prompt_len: longer prompts are an
    error (None: only the model's max_position_embeddings limits prompt + max_new_tokens); it also
    caps the padded prompt length, hence the cache; stop_ids: ids that end a row (default: the
    config's eos ids plus the tokenizer's EOS).
    """

    def __init__(self, model, tokenizer=None, policy=None, mesh=None, batch_size: int = 8,
                 max_prompt_len: int | None = None, stop_ids: Sequence[int] | None = None):
        from flax import nnx

        from tuna_jax.data.templates import SpecialTokenPolicy

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.model, self.cfg, self.tokenizer, self.mesh = model, model.cfg, tokenizer, mesh
        self.policy = policy if policy is not None else SpecialTokenPolicy()
        self.n_data = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // self.n_data) * self.n_data
        self.max_prompt_len = max_prompt_len
        if stop_ids is None:
            ids = set(self.cfg.eos_ids)
            if tokenizer is not None and tokenizer.eos_id is not None:
                ids.add(int(tokenizer.eos_id))
            stop_ids = ids
        self.stop_ids = tuple(sorted(int(i) for i in stop_ids))
        pad = tokenizer.pad_id if tokenizer is not None else 0
        self.pad_id = int(pad) if pad is not None and 0 <= int(pad) < self.cfg.vocab_size else 0
        self._graphdef, self._state = nnx.split(model)

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], where: str = "prompt") -> list[int]:
        """Prompt ids: text through the tokenizer and BOS policy, token ids validated as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where}: a text prompt needs a tokenizer (pass tokenizer= or token ids)")
            from tuna_jax.data.templates import encode_prompt
            ids = encode_prompt(self.tokenizer, prompt, self.policy)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{where}: token-id prompts must be lists of integers")
        if not ids:
            raise ValueError(f"{where}: the prompt has no tokens; the first generated token needs a context")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        return ids

    def check_length(self, n_prompt: int, max_new_tokens: int, where: str = "prompt") -> None:
        """Raise a ValueError when a prompt of ``n_prompt`` tokens cannot be generated from."""
        if self.max_prompt_len is not None and n_prompt > self.max_prompt_len:
            raise ValueError(f"{where}: {n_prompt} prompt tokens, over max_prompt_len={self.max_prompt_len}")
        limit = self.cfg.max_position_embeddings
        if n_prompt + max_new_tokens > limit:
            raise ValueError(f"{where}: {n_prompt} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                             f"model's max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens")

    @property
    def gives_text(self) -> bool:
        """Whether samples carry their text (only with a tokenizer)."""
        return self.tokenizer is not None

    def settings(self) -> dict:
        """What else defines the samples: the stop ids and the BOS policy (OUT.params.json)."""
        return {"stop_ids": list(self.stop_ids), "add_bos": self.policy.add_bos,
                "bos_override": self.policy.bos_override}

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None,
                 n: int = 1, rng_ids: Sequence[int] | None = None) -> list[list[Sample]]:
        """``n`` samples for every prompt: ``out[i][j]`` is sample j of prompt i.

        prompts: text (encoded with the tokenizer and the BOS policy; give the full prompt, e.g.
        ``format_prompt(instruction)``) or token-id lists (used as they are). rng_ids: the identity
        of each prompt for the random stream (default: its position); equal (seed, prompt, rng_id)
        give equal samples whatever else is in the call.
        """
        params = params or SamplingParams()
        if n < 1:
            raise ValueError(f"n={n}: must be >= 1")
        rng_ids = list(range(len(prompts))) if rng_ids is None else [int(r) for r in rng_ids]
        if len(rng_ids) != len(prompts):
            raise ValueError(f"rng_ids has {len(rng_ids)} entries for {len(prompts)} prompts")
        if any(not 0 <= r < 2**31 for r in rng_ids):
            raise ValueError("rng_ids must be in [0, 2**31)")
        encoded = []
        for i, p in enumerate(prompts):
            ids = self.encode(p, f"prompt {i}")
            self.check_length(len(ids), params.max_new_tokens, f"prompt {i}")
            encoded.append(ids)
        # Rows sorted by prompt length (stable) so a batch pads little.
        rows = sorted(((i, j) for i in range(len(encoded)) for j in range(n)), key=lambda r: len(encoded[r[0]]))
        out: list[list[Sample | None]] = [[None] * n for _ in encoded]
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            results = self._run_batch([(encoded[i], rng_ids[i], j) for i, j in chunk], params)
            for (i, j), sample in zip(chunk, results):
                out[i][j] = sample
        return out  # type: ignore[return-value]

    def _rows_for(self, n_real: int) -> int:
        """Batch rows for ``n_real`` real rows: a power of two, a multiple of data x fsdp, <= batch_size."""
        b = -(-_next_pow2(n_real) // self.n_data) * self.n_data
        return min(b, self.batch_size)

    def _run_batch(self, rows: list[tuple[list[int], int, int]], params: SamplingParams) -> list[Sample]:
        """rows: (prompt ids, rng_id, sample index) -> one Sample each (at most batch_size rows)."""
        import jax
        import numpy as np

        from tuna_jax import parallel
        from tuna_jax.data.shapes import bucket_length

        b = self._rows_for(len(rows))
        longest = max(len(r[0]) for r in rows)
        p = bucket_length(longest)
        if self.max_prompt_len is not None:
            p = max(longest, min(p, self.max_prompt_len))
        t = params.max_new_tokens
        ids = np.full((b, p), self.pad_id, np.int32)
        seg = np.zeros((b, p), np.int32)
        pos = np.zeros((b, p), np.int32)
        plen = np.ones((b,), np.int32)
        active = np.zeros((b,), bool)
        rid = np.zeros((b,), np.int32)
        sid = np.zeros((b,), np.int32)
        seg[:, -1] = 1  # dummy rows: a one-token prompt (pad id), so no query is fully masked
        for r, (prompt, ri, si) in enumerate(rows):
            n = len(prompt)
            ids[r, p - n:], seg[r, p - n:], pos[r, p - n:] = prompt, 1, np.arange(n)
            plen[r], active[r], rid[r], sid[r] = n, True, ri, si

        # Columns [0, P-1) are prefilled; column P-1 (every row's last prompt token) is decode step 0.
        host = dict(input_ids=ids[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1], last_token=ids[:, -1],
                    prompt_len=plen, active=active, rng_ids=rid, sample_ids=sid)
        knobs = {"temperature": np.float32(params.temperature), "top_p": np.float32(params.top_p),
                 "top_k": np.int32(params.top_k)}
        seed = np.uint32(params.seed)
        prefill, decode = _kernels()
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            dev = _put_batch(host, self.mesh)
            cache = prefill(self._graphdef, self._state, dev["input_ids"], dev["positions"], dev["segment_ids"],
                            cache_len=p - 1 + t)
            tokens, lps, slps, lengths, stopped, cache = decode(
                self._graphdef, self._state, cache, dev["last_token"], dev["prompt_len"], dev["active"],
                seed, dev["rng_ids"], dev["sample_ids"], knobs, np.asarray(self.stop_ids, np.int32),
                np.int32(self.pad_id), max_new_tokens=t)
            del cache
            tokens, lps, slps, lengths, stopped = (parallel.to_host(x) for x in (tokens, lps, slps, lengths, stopped))

        samples = []
        for r in range(len(rows)):
            k = int(lengths[r])
            tok = [int(x) for x in tokens[r, :k]]
            reason = FINISH_STOP if bool(stopped[r]) else FINISH_LENGTH
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode_continuation(tok[:-1] if reason == FINISH_STOP else tok)
            samples.append(Sample(text=text, token_ids=tok, token_logprobs=[float(x) for x in lps[r, :k]],
                                  finish_reason=reason, sampling_logprobs=[float(x) for x in slps[r, :k]]))
        return samples


def _put_batch(batch: dict, mesh) -> dict:
    """Host arrays [B, ...] -> device arrays split over data x fsdp (every host passes the whole
    batch; each places only its own shards). Without a mesh: the default device."""
    import jax.numpy as jnp

    from tuna_jax import parallel

    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return parallel.put_global_batch(batch, mesh)


# ---- `tuna-jax generate` -----------------------------------------------------------------

@dataclasses.dataclass
class PromptLine:
    index: int
    lineno: int
    id: Any
    has_id: bool
    prompt: str | list[int]


def parse_prompt_line(obj: dict, where: str) -> str | list[int]:
    """One input object -> the prompt text (Alpaca-formatted or raw) or token ids."""
    from tuna_jax.data.templates import format_prompt

    kinds = [k for k in ("prompt_ids", "prompt", "instruction") if k in obj]
    if len(kinds) > 1:
        raise InputError(f"{where}: give exactly one of 'instruction', 'prompt', 'prompt_ids' "
                         f"(found {kinds})")
    if not kinds:
        raise InputError(f"{where}: missing field 'instruction' (or give 'prompt' / 'prompt_ids')")
    kind = kinds[0]
    if kind == "prompt_ids":
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: field 'prompt_ids' must be a list of integer token ids")
        return ids
    if kind == "prompt":
        if not isinstance(obj["prompt"], str):
            raise InputError(f"{where}: field 'prompt' must be a string")
        return obj["prompt"]
    if not isinstance(obj["instruction"], str):
        raise InputError(f"{where}: field 'instruction' must be a string")
    inp = obj.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise InputError(f"{where}: field 'input' must be a string")
    return format_prompt(obj["instruction"], inp)


def read_prompts(path: str) -> list[PromptLine]:
    """Every non-blank line of ``path`` (index = position among non-blank lines, as ``score``)."""
    out = []
    for index, (lineno, where, obj) in enumerate(iter_jsonl(path, what="prompts file")):
        out.append(PromptLine(index, lineno, obj.get("id"), "id" in obj, parse_prompt_line(obj, where)))
    return out


def read_done(out_path: str, prompts: list[PromptLine], fix: bool = True) -> set[int]:
    """Indices already in OUT (a resumed run).

    Every record is written as one line ending in a newline, so a last line without one is a write
    torn by a crash: it is cut off the file when ``fix`` (and that input line regenerated). Any other
    malformed line, or a record that does not belong to this input, is an error naming OUT:line.
    """
    done: set[int] = set()
    for where, rec in read_out_lines(out_path, fix=fix, logger=log):
        if not (isinstance(rec, dict) and isinstance(rec.get("index"), int) and isinstance(rec.get("samples"), list)):
            raise InputError(f"{where}: not an output record of `tuna-jax generate` (cannot resume)")
        i = rec["index"]
        if not 0 <= i < len(prompts):
            raise InputError(f"{where}: index {i} is not a line of the input ({len(prompts)} lines); "
                             f"OUT belongs to another input file")
        if prompts[i].has_id and rec.get("id") != prompts[i].id:
            raise InputError(f"{where}: id {rec.get('id')!r} but input line {i} has id {prompts[i].id!r}; "
                             f"OUT belongs to another input file")
        done.add(i)
    return done


def generate_file(sampler, prompts_path: str, out_path: str, params: SamplingParams, n: int = 1,
                  sampling_logprobs: bool = False, progress: bool = True, lines_per_call: int | None = None,
                  meta: dict | None = None, prompts: list[PromptLine] | None = None) -> int:
    """Generate for every line of ``prompts_path`` not yet in ``out_path`` and append them; returns
    the number of lines written by this call. ``sampler``: a :class:`Sampler`, or ``serving.ServedSampler``.

    Everything is validated before anything is generated. Lines are written in input order, flushed
    and fsynced after every group of ``lines_per_call``, each seeded by its index, so a killed and
    resumed run writes the same samples as an uninterrupted one (token ids and text exactly; log-probs
    to float rounding, since resumed lines may run in a batch of another shape). The settings
    (sampling, n, ``sampler.settings()``, ``meta``) go to OUT.params.json and must match on resume.
    Multi-host: every process generates (the batch is global), process 0 alone writes.
    """
    from tqdm import tqdm

    prompts = read_prompts(prompts_path) if prompts is None else prompts
    encoded = []
    for pl in prompts:  # validate everything before generating anything
        where = f"{prompts_path}:{pl.lineno}"
        try:
            ids = sampler.encode(pl.prompt, where)
            sampler.check_length(len(ids), params.max_new_tokens, where)
        except InputError:
            raise
        except ValueError as e:
            raise InputError(str(e)) from None
        encoded.append(ids)
    settings = {"n": n, **dataclasses.asdict(params), **sampler.settings(), **(meta or {})}
    writer = is_main_process()
    # One run per OUT: a second one would append the same lines again (OUT.lock, released at the end).
    with OutputLock(out_path) if writer else contextlib.nullcontext():
        # OUT.params.json: resuming with other settings would mix samples from two distributions.
        check_settings(out_path, settings, write=writer)
        done = read_done(out_path, prompts, fix=writer)
        todo = [pl for pl in prompts if pl.index not in done]
        if done:
            print(f"resuming: {len(done)} of {len(prompts)} lines already in {out_path}", file=sys.stderr)
        group = lines_per_call or max(1, (4 * sampler.batch_size) // n)
        written = 0
        bar = tqdm(total=len(prompts), initial=len(done), desc="generate", unit="ex", file=sys.stderr,
                   disable=not progress)
        with open(out_path if writer else os.devnull, "a", encoding="utf-8") as f, bar:
            for s in range(0, len(todo), group):
                part = todo[s:s + group]
                results = sampler.generate([encoded[pl.index] for pl in part], params, n=n,
                                           rng_ids=[pl.index for pl in part])
                for pl, samples in zip(part, results):
                    rec: dict[str, Any] = {"index": pl.index}
                    if pl.has_id:
                        rec["id"] = pl.id
                    rec["samples"] = [smp.to_json(sampling_logprobs) for smp in samples]
                    f.write(dumps(rec) + "\n")
                    written += 1
                f.flush()
                if writer:
                    os.fsync(f.fileno())
                bar.update(len(part))
        return written


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
