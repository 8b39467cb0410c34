"""Alpaca template text, the tokenizer wrapper and the prompt/response boundary."""
import json

import pytest

from tuna_jax.data.templates import (
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    SpecialTokenPolicy,
    encode_prompt,
    encode_prompt_response,
    format_prompt,
    load_tokenizer,
    parse_prompt,
)

# stanford_alpaca train.py PROMPT_DICT, written out in full.
EXPECTED_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:")
EXPECTED_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Add the numbers.\n\n### Input:\n2 and {3}\n\n### Response:")


def test_template_text_exact():
    assert format_prompt("Name a colour.") == EXPECTED_NO_INPUT
    assert format_prompt("Name a colour.", "") == EXPECTED_NO_INPUT
    assert format_prompt("Add the numbers.", "2 and {3}") == EXPECTED_INPUT  # braces in values stay
    assert PROMPT_INPUT.endswith("### Response:") and PROMPT_NO_INPUT.endswith("### Response:")


def test_parse_prompt_inverts_the_template():
    assert parse_prompt(EXPECTED_NO_INPUT) == ("Name a colour.", "")
    assert parse_prompt(EXPECTED_INPUT) == ("Add the numbers.", "2 and {3}")
    tricky = format_prompt("A\n\n### Input:\nnot the input", "real input")
    assert format_prompt(*parse_prompt(tricky)) == tricky
    assert parse_prompt("Tell me a joke.\n") is None
    # the with-input template with an empty input is not what format_prompt makes: keep verbatim
    assert parse_prompt(PROMPT_INPUT.format(instruction="a", input="")) is None


@pytest.fixture(scope="module")
def llama_tok(shared_dir):
    return load_tokenizer(shared_dir / "models/llama2_tokenizer/tokenizer.model")


@pytest.fixture(scope="module")
def demo(shared_dir):
    with open(shared_dir / "data/alpaca/alpaca_gpt4_demo_999.json", encoding="utf-8") as f:
        return json.load(f)


def test_sentencepiece_wrapper(llama_tok):
    tok = llama_tok
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.pad_id == 2  # LLaMA has no pad token: falls back to EOS
    ids = tok.encode("Hello world")
    assert 1 not in ids and 2 not in ids and tok.decode(ids) == "Hello world"


def test_boundary_and_dummy_prefix(llama_tok):
    tok, pol = llama_tok, SpecialTokenPolicy()
    prompt = format_prompt("Name a colour.")
    ids, start = encode_prompt_response(tok, prompt, "The answer", pol)
    assert ids[:start] == encode_prompt(tok, prompt, pol) == [1] + tok.encode(prompt)
    assert ids[-1] == 2
    resp = ids[start:-1]
    # no dummy-prefix space: 'The' (as after "Response:" in running text), not '▁The'
    assert resp == [1576, 1234] and tok.encode("The answer") == [450, 1234]
    assert tok.decode(resp) == "The answer"
    # the concatenation merges ':' and '"' into one token ':"': the boundary would move
    quote = '"The children ran to school."'
    ids, start = encode_prompt_response(tok, prompt, quote, pol)
    concat = [1] + tok.encode(prompt + quote)
    assert concat[: start - 1] == ids[: start - 1]
    assert tok._sp.id_to_piece(ids[start - 1]) == ":" and tok._sp.id_to_piece(concat[start - 1]) == ':"'
    assert tok.decode(ids[start:-1]) == quote
    assert ids[:start] == encode_prompt(tok, prompt, pol)


def test_demo_set_ids_match_running_text(llama_tok, demo):
    """On all 999 demo examples: the prompt ids are the generation prompt, the response decodes back,
    and where nothing merges across the boundary (response starts with a letter or digit) the ids are
    exactly those of the running text prompt+response, as the model reads and generates it."""
    tok, pol = llama_tok, SpecialTokenPolicy()
    compared = 0
    for r in demo:
        prompt = format_prompt(r["instruction"], r["input"])
        ids, start = encode_prompt_response(tok, prompt, r["output"], pol)
        assert ids[:start] == encode_prompt(tok, prompt, pol)
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[start:-1]) == r["output"]
        assert tok.decode_continuation(ids[start:-1]) == r["output"]
        if r["output"][0].isalnum():
            assert ids == [1] + tok.encode(prompt + r["output"]) + [2]
            compared += 1
    assert compared > 900


def test_generated_ids_round_trip(llama_tok):
    tok = llama_tok
    for gen in ([450, 1234], [1576, 1234], [13, 1576, 1234]):  # '▁The answer', 'The answer', '\nThe answer'
        assert tok.encode_continuation(tok.decode_continuation(gen)) == gen
    assert tok.decode_continuation([450, 1234]) == " The answer"


def test_policy(llama_tok):
    tok, prompt = llama_tok, "Hi"
    ids, start = encode_prompt_response(tok, prompt, "yes", SpecialTokenPolicy.reference_quirk(tok))
    assert ids[0] == 2 and ids[-1] == 2  # the reference's '</s>' as BOS
    ids, start = encode_prompt_response(tok, prompt, "yes", SpecialTokenPolicy(add_bos=False, add_eos=False))
    assert ids == tok.encode(prompt) + tok.encode_continuation("yes") and start == len(tok.encode(prompt))
    assert encode_prompt(tok, prompt, SpecialTokenPolicy(bos_override=7))[0] == 7
    with pytest.raises(ValueError, match="empty response"):
        encode_prompt_response(tok, prompt, "", SpecialTokenPolicy())


def test_hf_directory_matches_sentencepiece(llama_tok, demo, shared_dir, tmp_path):
    src = shared_dir / "models/llama2_tokenizer/tokenizer.model"
    only_model = tmp_path / "sp_only"
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes(src.read_bytes())
    assert load_tokenizer(only_model)._sp is not None  # a bare tokenizer.model dir: sentencepiece

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes(src.read_bytes())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    hf = load_tokenizer(hf_dir)
    assert hf._hf is not None
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, 2, 32000)
    pol = SpecialTokenPolicy()
    n = 0
    for r in demo[:200]:
        if "  " in r["output"] + r["instruction"] + r["input"]:
            continue  # HF's converted tokenizer splits runs of spaces differently from sentencepiece
        prompt = format_prompt(r["instruction"], r["input"])
        assert encode_prompt_response(hf, prompt, r["output"], pol) == \
            encode_prompt_response(llama_tok, prompt, r["output"], pol)
        n += 1
    assert n > 150
    assert hf.decode_continuation([450, 1234]) == " The answer"
    assert hf.encode_continuation("\n\nx") == llama_tok.encode_continuation("\n\nx")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        load_tokenizer(bad)
