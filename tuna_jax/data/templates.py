"""The Alpaca prompt template, the tokenizer wrapper and the one BOS/EOS policy.

Everything that turns text into model ids goes through here, so SFT, ranking, scoring and
generation see byte-identical prompts and identical prompt ids.

The template (:func:`format_prompt`) is tatsu-lab/stanford_alpaca's ``PROMPT_DICT`` byte for byte: it
ends with ``"### Response:"`` and no newline or space; the response follows directly. A (prompt,
response) pair is ``[BOS] + encode(prompt) + encode_continuation(response) + [EOS]``
(:func:`encode_prompt_response`): the two are tokenised SEPARATELY, because tokenising the joined text
can merge tokens across the boundary, and the response as a *continuation* of the prompt (no
sentencepiece dummy-prefix space), as the model sees and generates it after ``"Response:"``.
Generated ids become text with ``Tokenizer.decode_continuation``, whose ``encode_continuation`` gives
the same ids back, so responses the model generated are scored on the tokens it generated.

Why, with the examples that made it so: docs/data.md#templates.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, byte for byte.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_DICT = {"prompt_input": PROMPT_INPUT, "prompt_no_input": PROMPT_NO_INPUT}


def alpaca_chat_template() -> str:
    """A Hugging Face chat template (Jinja) that renders ``[{"role": "user", "content": INSTRUCTION,
    "input": INPUT (optional)}]`` as ``bos_token + format_prompt(INSTRUCTION, INPUT)``: the exact prompt
    (and, tokenised, the exact ids of ``encode_prompt`` with the default BOS policy) that the model
    was trained on, so ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` just
    works on an export. The Alpaca prompt ends with its own "### Response:", so the generation prompt
    is always there. An assistant message is rendered as the response followed by ``eos_token``
    (the training target). Built from PROMPT_INPUT / PROMPT_NO_INPUT, so the two cannot drift apart."""
    def fill(template: str) -> str:
        return (template.replace("{instruction}", "{{ message['content'] }}")
                .replace("{input}", "{{ message['input'] }}"))

    return ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% if message['input'] is defined and message['input'] %}" + fill(PROMPT_INPUT) + "{% else %}"
            + fill(PROMPT_NO_INPUT) + "{% endif %}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
            "{% else %}{{ raise_exception('the Alpaca prompt has the roles user (content, optional input) and "
            "assistant only') }}{% endif %}{% endfor %}")


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the Alpaca field name)
    """The Alpaca prompt. The with-input template is used iff ``input != ""`` (as stanford_alpaca)."""
    if input != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def parse_prompt(text: str) -> Optional[tuple[str, str]]:
    """Inverse of ``format_prompt``: ``(instruction, input)`` if ``text`` is exactly an Alpaca prompt.

    Used to import the reference code's files, whose ``instruction`` is already templated. Returns
    None when ``text`` is not byte-identical to ``format_prompt`` of any split, so a caller keeps
    such a prompt verbatim instead of guessing.
    """
    head_in, tail_in = PROMPT_INPUT.split("{instruction}")
    mid_in, end_in = tail_in.split("{input}")
    if text.startswith(head_in) and text.endswith(end_in):
        body = text[len(head_in): len(text) - len(end_in)]
        cut = body.rfind(mid_in)
        if cut >= 0:
            ins, inp = body[:cut], body[cut + len(mid_in):]
            if format_prompt(ins, inp) == text:
                return ins, inp
    head, end = PROMPT_NO_INPUT.split("{instruction}")
    if text.startswith(head) and text.endswith(end) and len(text) >= len(head) + len(end):
        ins = text[len(head): len(text) - len(end)]
        if format_prompt(ins, "") == text:
            return ins, ""
    return None


class Tokenizer:
    """A small wrapper over a sentencepiece model or a Hugging Face tokenizer.

    ``encode`` never adds special tokens; BOS/EOS are the ``SpecialTokenPolicy``'s job.
    ``pad_id``: the tokenizer's pad token, else its EOS, else 0 (LLaMA has no pad token; padded
    positions are masked by ``segment_ids`` so the value only has to be a valid id).
    """

    def __init__(self, *, sp=None, sp_continuation=None, hf=None, name: str = ""):
        self._sp, self._sp_cont, self._hf, self.name = sp, sp_continuation, hf, name
        if sp is not None:
            self.bos_id = _nonneg(sp.bos_id())
            self.eos_id = _nonneg(sp.eos_id())
            pad = _nonneg(sp.pad_id())
            self.vocab_size = int(sp.vocab_size())
        else:
            self.bos_id, self.eos_id, pad = hf.bos_token_id, hf.eos_token_id, hf.pad_token_id
            self.vocab_size = len(hf)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._sentinel_ids: dict[str, list[int]] = {}

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as a standalone string (sentencepiece adds its dummy-prefix space)."""
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False))

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of ``text`` as it is tokenised when it follows other text: no dummy prefix."""
        if self._sp is not None:
            return list(self._sp_cont.encode(text))
        # HF: tokenise sentinel + text and drop the sentinel's ids; the first sentinel whose ids
        # are an exact prefix (no merge into the text) wins.
        for s in _SENTINELS:
            pre = self._sentinel(s)
            ids = self._hf.encode(s + text, add_special_tokens=False)
            if ids[: len(pre)] == pre:
                return list(ids[len(pre):])
        raise ValueError(f"{self.name}: cannot tokenise {text[:40]!r} as a continuation (every sentinel merged)")

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped; a leading dummy-prefix space is removed."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` generated after a prompt, leading space kept: the inverse of
        ``encode_continuation`` (use it to store generated responses)."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp_cont.decode(ids)
        for s in _SENTINELS:
            pre = self._sentinel(s)
            head = self._hf.decode(pre, skip_special_tokens=True)
            full = self._hf.decode(pre + ids, skip_special_tokens=True)
            if full.startswith(head):
                return full[len(head):]
        return self.decode(ids)

    def _sentinel(self, s: str) -> list[int]:
        if s not in self._sentinel_ids:
            self._sentinel_ids[s] = list(self._hf.encode(s, add_special_tokens=False))
        return self._sentinel_ids[s]

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


# "\n" is byte-fallback in LLaMA vocabularies and a separate pre-token in byte-level BPEs, so it
# rarely merges; the others cover texts that start with a newline.
_SENTINELS = ("\n", "!", "\t")


def _nonneg(i: int) -> Optional[int]:
    return int(i) if i is not None and int(i) >= 0 else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A bare sentencepiece ``*.model`` file, or a Hugging Face tokenizer directory.

    A directory holding only ``tokenizer.model`` (no ``tokenizer.json`` / ``tokenizer_config.json``)
    is read with sentencepiece. HF directories load with ``AutoTokenizer`` (fast by default,
    ``trust_remote_code=False``, local files only). A path in cloud storage (``gs://...``) is read from a
    local copy of its small files (``io.paths.local_copy``: the weights are left behind).
    """
    from tuna_jax.io import paths

    path = paths.local_copy(path, skip=paths.MODEL_WEIGHTS) if paths.is_remote(path) else os.fspath(path)
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "tokenizer.model" in names and not names & {"tokenizer.json", "tokenizer_config.json"}:
            return _load_sp(os.path.join(path, "tokenizer.model"))
        try:
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers raises many types; name the directory in every case
            raise ValueError(f"{path}: cannot load a Hugging Face tokenizer: {e}") from e
        return Tokenizer(hf=hf, name=path)
    if os.path.isfile(path):
        return _load_sp(path)
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory")


def _load_sp(path: str) -> Tokenizer:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(path, "rb") as f:
        blob = f.read()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(blob)
        sp = spm.SentencePieceProcessor(model_proto=blob)
    except Exception as e:
        raise ValueError(f"{path}: not a sentencepiece model: {e}") from e
    # The continuation processor is the same model without the dummy-prefix space: it encodes
    # text as it is tokenised after other text, and decodes without stripping a leading space.
    proto.normalizer_spec.add_dummy_prefix = False
    cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return Tokenizer(sp=sp, sp_continuation=cont, name=path)


@dataclasses.dataclass(frozen=True)
class SpecialTokenPolicy:
    """One BOS/EOS policy for SFT, ranking, scoring and generation.

    add_bos: prepend BOS to every prompt. add_eos: append EOS after every response (it is part of
    the scored/trained tokens, as in the scores of ``losses.py``). bos_override: the id to use as BOS
    instead of the tokenizer's. The Tuna reference code (microsoft/LMOps tuna/src/train_tuna.py)
    sets ``bos_token = "</s>"`` for LLaMA, so its sequences start with EOS (id 2); reproduce it with
    ``SpecialTokenPolicy.reference_quirk(tok)`` (= ``bos_override=tok.eos_id``).
    """

    add_bos: bool = True
    add_eos: bool = True
    bos_override: Optional[int] = None

    @classmethod
    def reference_quirk(cls, tok: Tokenizer) -> "SpecialTokenPolicy":
        return cls(add_bos=True, add_eos=True, bos_override=tok.eos_id)

    def bos(self, tok: Tokenizer) -> Optional[int]:
        """The BOS id this policy prepends, or None when it prepends nothing."""
        if not self.add_bos:
            return None
        bos = self.bos_override if self.bos_override is not None else tok.bos_id
        if bos is None:
            raise ValueError(f"{tok.name}: the tokenizer has no BOS token; set add_bos=False or bos_override")
        return int(bos)

    def eos(self, tok: Tokenizer) -> Optional[int]:
        if not self.add_eos:
            return None
        if tok.eos_id is None:
            raise ValueError(f"{tok.name}: the tokenizer has no EOS token; set add_eos=False")
        return int(tok.eos_id)


def encode_prompt(tok: Tokenizer, prompt: str, policy: SpecialTokenPolicy) -> list[int]:
    """Prompt ids for generation and scoring: ``[BOS] + encode(prompt)``."""
    bos = policy.bos(tok)
    return ([bos] if bos is not None else []) + tok.encode(prompt)


def encode_response(tok: Tokenizer, response: str, policy: SpecialTokenPolicy) -> list[int]:
    """Response ids as they follow a prompt: ``encode_continuation(response) + [EOS]``."""
    if response == "":
        raise ValueError("empty response: it would have no tokens to score or train on")
    eos = policy.eos(tok)
    return tok.encode_continuation(response) + ([eos] if eos is not None else [])


def encode_prompt_response(tok: Tokenizer, prompt: str, response: str,
                           policy: SpecialTokenPolicy) -> tuple[list[int], int]:
    """``(ids, response_start)``: ids[:response_start] == encode_prompt(prompt); the rest are the
    response tokens (and EOS under the policy), tokenised separately (see docs/data.md#templates)."""
    p = encode_prompt(tok, prompt, policy)
    return p + encode_response(tok, response, policy), len(p)
