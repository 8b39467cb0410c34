"""Every command that takes a model, run through the CLI on a tiny checkpoint of every supported family.

The parity suites call the model class directly, so a config that the model accepts but a command
cannot carry slipped through: a Llama-3.1 config (``rope_scaling`` a dict, ``eos_token_id`` a list)
crashed ``score`` and ``generate``, whose jitted kernels take the config as a static (hashed)
argument. Here each command runs end to end on HF folders as users bring them:

* ``llama3.1``: GQA (4 query / 2 kv heads), ``rope_scaling`` of type llama3, untied embeddings,
  ``eos_token_id`` a list (as Llama-3.1-Instruct ships it); ``llama3.2``: the same, tied (Llama-3.2-1B/3B);
* ``mistral`` (GQA, a sliding window longer than every row), ``qwen2`` (q/k/v biases, tied), ``qwen3``
  (q/k RMSNorm, one kv head, attention biases), ``stablelm`` (partial rotary, qkv biases, LayerNorm),
  ``neox`` (GPT-NeoX: fused qkv, parallel residual, partial rotary).

Outputs are compared with HF PyTorch where an independent answer exists (log-likelihoods, greedy
tokens, converted and exported weights); the other commands must finish and write what they claim.
The SFT run is LLaMA's only: it shares every family-dependent path with the ranking run.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.support.hf_utils import LLAMA3_SCALING, tiny_family_model  # noqa: E402
from tests.support.train_utils import REPO, write_jsonl  # noqa: E402
from tests.unit.eval.test_run import ni_checkout  # noqa: E402
from tuna_jax.assets import stories260k_hf_dir  # noqa: E402
from tuna_jax.cli import main as cli  # noqa: E402
from tuna_jax.data.records import read_records  # noqa: E402
from tuna_jax.data.synthetic import ranking_records, sft_records  # noqa: E402

pytestmark = pytest.mark.slow

EOS = [2, 3]  # a list, as Llama-3.1-Instruct's config.json has it; 2 is the tokenizer's EOS
# The other families (tests/unit/model/test_families.py holds each option to HF on its own): vocab and
# positions sized for the stories260K tokenizer and the tiny configs' 192-token rows.
OTHERS = {
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=4096)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie=True)),
    "qwen3": ("qwen3", dict(num_key_value_heads=1, head_dim=16, attention_bias=True)),
    "stablelm": ("stablelm", dict(hidden=64, num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25)),
    "neox": ("gpt_neox", dict(hidden=64, rotary_pct=0.25)),
}
INSTRUCTIONS = [{"id": "a", "instruction": "Name the first word.", "input": "cat dog"},
                {"id": "b", "instruction": "Say something short."}]


def _hf_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7 if tied else 3)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=list(EOS))
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # a larger init than HF's, so that greedy tokens and losses depend on every weight
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module", params=["llama3.1", "llama3.2", *OTHERS])
def family(request, tmp_path_factory):
    """(name, HF folder with the stories260K tokenizer, the PyTorch model, a scratch folder)."""
    root = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    if request.param in OTHERS:
        kind, kw = OTHERS[request.param]
        model = tiny_family_model(kind, vocab=512, max_position_embeddings=256, **kw)
    else:
        model = _hf_model(tied=request.param == "llama3.2")
    hf = root / "hf"
    model.save_pretrained(str(hf), safe_serialization=True)
    tok = stories260k_hf_dir(root / "cache")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).exists():
            shutil.copy(tok / name, hf / name)
    cfg = json.loads((hf / "config.json").read_text())
    assert request.param in OTHERS or (cfg["eos_token_id"] == EOS and _rope(cfg)["rope_type"] == "llama3")
    return request.param, hf, model, root


def _eos(hf) -> list[int]:
    eos = json.loads((hf / "config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def _rope(hf_config: dict) -> dict:
    """The rope settings of a config.json in either style (transformers 4's rope_scaling, 5's rope_parameters)."""
    return hf_config.get("rope_scaling") or hf_config["rope_parameters"]


def _hf_logprob(model, prompt, cand):
    ids = torch.tensor([list(prompt) + list(cand)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(cand))


def _safetensors(folder):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_convert_both_ways_is_bitwise(family):
    name, hf, _, root = family
    ckpt, back = root / "ckpt", root / "back"
    assert cli(["convert", "hf-to-orbax", str(hf), str(ckpt)]) == 0
    assert cli(["convert", "orbax-to-hf", str(ckpt), str(back), "--like", str(hf), "--overwrite"]) == 0
    a, b = _safetensors(hf), _safetensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cfg, orig = (json.loads((d / "config.json").read_text()) for d in (back, hf))
    for key in ("model_type", "architectures", "eos_token_id", "tie_word_embeddings", "num_key_value_heads"):
        assert cfg.get(key) == orig.get(key), key
    if name.startswith("llama3"):
        assert ("lm_head.weight" in a) == (name == "llama3.1") and _rope(cfg)["rope_type"] == "llama3"


def test_score_matches_hf(family):
    _, hf, model, root = family
    rng = np.random.RandomState(0)
    lines = [{"id": f"x{i}", "prompt_ids": rng.randint(4, 512, 1 + i).tolist(),
              "candidate_ids": [rng.randint(4, 512, 1 + (i + k) % 5).tolist() for k in range(3)]} for i in range(4)]
    data = write_jsonl(root / "score_in.jsonl", lines)
    out = root / "scores.jsonl"
    out.unlink(missing_ok=True)
    assert cli(["score", str(hf), str(data), str(out), "--batch-size", "2"]) == 0
    for o, x in zip(_jsonl(out), lines):
        for c, cand in zip(o["candidates"], x["candidate_ids"]):
            assert c["logprob_sum"] == pytest.approx(_hf_logprob(model, x["prompt_ids"], cand), abs=1e-4)


def test_generate_greedy_equals_hf_generate(family):
    _, hf, model, root = family
    ckpt = root / "ckpt"  # written by the convert test; made here if that test was deselected
    if not ckpt.exists():
        assert cli(["convert", "hf-to-orbax", str(hf), str(ckpt)]) == 0
    prompts = [[1, 40, 41, 42], [1, 300, 5, 77, 9, 100]]
    data = write_jsonl(root / "gen_in.jsonl", [{"prompt_ids": p} for p in prompts])
    for i, src in enumerate((hf, ckpt)):  # a HF folder and a params checkpoint
        out = root / f"gen_{i}.jsonl"
        assert cli(["generate", str(src), str(data), str(out), "--max-new-tokens", "12", "--temperature", "0"]) == 0
        for row, p in zip(_jsonl(out), prompts):
            with torch.no_grad():
                ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=12, do_sample=False, eos_token_id=_eos(hf),
                                     pad_token_id=0)[0, len(p):].tolist()
            sample = row["samples"][0]
            assert sample["token_ids"] == ref[:len(sample["token_ids"])] and len(sample["token_ids"]) == len(ref)
            if sample["finish_reason"] == "stop":
                assert sample["token_ids"][-1] in _eos(hf)


def test_teacher_local_model_logprobs_match_hf(family):
    _, hf, model, root = family

    data = root / "alpaca.json"
    data.write_text(json.dumps(INSTRUCTIONS))
    out = root / "teacher.jsonl"
    rc = cli(["teacher", str(data), str(out), "--local-model", str(hf), "--n", "2", "--max-tokens", "8",
              "--min-candidates", "1", "--no-strip", "--no-progress"])
    assert rc in (0, 1)  # 1 only if every sample of an instruction was empty
    rows = _jsonl(out)
    assert rows and all(r["teacher"]["api"] == "local" for r in rows)
    # Each candidate's recorded log-likelihood is HF PyTorch's log p(tokens | BOS + Alpaca prompt), the tokens
    # being those the student trains on: the canonical encoding of the text, then EOS where it stopped (the
    # local teacher re-scores samples whose sampled tokens are not that encoding).
    from tuna_jax.data.templates import format_prompt, load_tokenizer

    tok = load_tokenizer(hf)
    checked = 0
    for r in rows:
        src = next(x for x in INSTRUCTIONS if x["id"] == r["id"])
        prompt = [1] + tok.encode(format_prompt(src["instruction"], src.get("input", "")))
        for cand, lp, n, why in zip(r["candidates"], r["logprobs"], r["num_tokens"], r["finish_reasons"]):
            ids = tok.encode_continuation(cand) + ([2] if why == "stop" else [])
            assert len(ids) == n
            assert lp == pytest.approx(_hf_logprob(model, prompt, ids), abs=2e-4)
            checked += 1
    assert checked, "no candidate could be checked against HF"


def test_sample_diverse(family):
    _, hf, _, root = family
    data = root / "instr.json"
    data.write_text(json.dumps(INSTRUCTIONS))
    out = root / "diverse.jsonl"
    assert cli(["sample-diverse", str(hf), str(data), str(out), "--n", "3", "--max-new-tokens", "8",
                "--max-trials", "2", "--no-progress"]) == 0
    rows = _jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b"] and all(len(r["candidates"]) == 3 for r in rows)


def _train(root, hf, mode, tag, extra=()):
    data = write_jsonl(root / f"{tag}.jsonl", (ranking_records if mode == "ranking" else sft_records)(16, seed=0))
    out = root / f"run_{tag}"
    cfg = REPO / "configs" / f"tiny_{mode}.yaml"
    args = ["train", str(cfg), f"model.path={hf}", "model.hf_config=null", f"model.tokenizer={hf}",
            f"data.train={data}", f"train.output_dir={out}", "train.progress=false", "train.tensorboard=false",
            "train.max_steps=2", "train.global_batch=8", *extra]
    assert cli(args) == 0
    metrics = _jsonl(out / "metrics.jsonl")
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    return out


def test_train_sft_ranking_and_export(family):
    name, hf, model, root = family
    if name.startswith("llama3"):
        _train(root, hf, "sft", "sft")
    run = _train(root, hf, "ranking", "rank", ("train.mesh=2,4,1",))  # data x fsdp over the 8 test devices
    # The trained model exported to HF loads in transformers, tied or untied as it came, with the config it came with.
    out = root / "export"
    assert cli(["convert", "orbax-to-hf", str(run / "final"), str(out), "--like", str(hf), "--overwrite"]) == 0
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is type(model) and back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert _eos(out) == _eos(hf)
    trained = _safetensors(out)
    assert any(not np.array_equal(trained[k], v.numpy()) for k, v in model.state_dict().items() if k in trained)
    ours = _hf_logprob(back, [1, 5], [9, 300, 7])
    from tuna_jax.model import load_model

    scored = load_model(run / "final")
    from tuna_jax.scoring import Group, Scorer

    (((s, n),),) = Scorer(scored).score([Group([1, 5], [[9, 300, 7]])])
    assert n == 3 and s == pytest.approx(ours, abs=1e-4)


def test_reference_scores(family):
    _, hf, _, root = family
    ranked = write_jsonl(root / "ranked.jsonl", ranking_records(4, seed=2))
    scores = root / "ref_scores.jsonl"
    scores.unlink(missing_ok=True)
    assert cli(["score", str(hf), str(ranked), str(scores)]) == 0
    out = root / "ranked_ref.jsonl"
    assert cli(["reference-scores", str(ranked), str(scores), str(out)]) == 0
    rows = _jsonl(out)
    assert len(rows) == 4 and all(len(r["ref_logprob_sum"]) == len(r["candidates"]) for r in rows)


def test_prm_train_and_rerank(family):
    _, hf, _, root = family
    train = write_jsonl(root / "prm_train.jsonl", ranking_records(8, seed=3))
    prm = root / "prm"
    assert cli(["prm", "train", "configs/prm.yaml", f"model.path={hf}", f"data.train={train}",
                f"train.output_dir={prm}", "train.max_steps=2", "data.max_len=192", "train.progress=false"]) == 0
    cands = write_jsonl(root / "cands.jsonl", [{"instruction": "Name the first word.", "input": "cat dog",
                                                 "candidates": ["cat.", "dog.", "The sun is big."]}])
    out = root / "reranked.jsonl"
    assert cli(["prm", "rerank", str(prm), str(cands), str(out), "--no-progress"]) == 0
    (rec,), _ = read_records(str(out), kind="ranking")
    assert sorted(rec.candidates) == sorted(["cat.", "dog.", "The sun is big."])
    assert list(rec.scores) == sorted(rec.scores, reverse=True)


def test_eval_generation(family):
    import yaml

    name, hf, _, root = family
    ni = ni_checkout(root, [("task001_animals", "Keyword Tagging", "Name the animal", 2)])
    cfg = root / "eval.yaml"
    out = root / "eval_out"
    cfg.write_text(yaml.safe_dump({"name": name, "output_dir": str(out),
                                   "models": [{"name": "m", "path": str(hf)}],
                                   "generation": {"max_new_tokens": 6, "batch_size": 4},
                                   "superni": {"tasks": str(ni), "shots": [0], "num_instances": 2}}))
    assert cli(["eval", "run", str(cfg), "--no-progress"]) == 0
    preds = list(out.rglob("superni_0shot.jsonl"))
    assert preds and len(_jsonl(preds[0])) == 2
