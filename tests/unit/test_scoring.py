"""`tuna-jax score` against PyTorch HF log-softmax, and its errors for bad lines."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.support.hf_utils import save_hf, tiny_hf_model  # noqa: E402
from tuna_jax.cli import main as cli  # noqa: E402


def hf_candidate_logprob(model, prompt, cand):
    ids = torch.tensor([prompt + cand])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(cand))


@pytest.mark.parametrize("mesh,layout", [(None, "padded"), (None, "prefix_shared"), (None, "packed"),
                                         ("2,2,2", "auto")])
def test_pretokenised_lines_match_hf(tmp_path, mesh, layout):
    hf = tiny_hf_model(num_kv_heads=2)
    src = save_hf(hf, tmp_path / "hf")
    rng = np.random.RandomState(0)
    lines = []
    for i in range(5):
        prompt = rng.randint(0, 128, rng.randint(1, 9)).tolist()
        cands = [rng.randint(0, 128, rng.randint(1, 12)).tolist() for _ in range(rng.randint(1, 5))]
        lines.append({"id": f"ex{i}", "prompt_ids": prompt, "candidate_ids": cands})
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["score", str(src), str(data), str(tmp_path / "out.jsonl"), "--batch-size", "3", "--layout", layout]
    assert cli(args + (["--mesh", mesh] if mesh else [])) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["index"] for o in out] == list(range(5))
    assert [o["id"] for o in out] == [x["id"] for x in lines]
    for o, x in zip(out, lines):
        assert len(o["candidates"]) == len(x["candidate_ids"])
        for c, cand in zip(o["candidates"], x["candidate_ids"]):
            assert c["num_tokens"] == len(cand)
            assert abs(c["logprob_sum"] - hf_candidate_logprob(hf, x["prompt_ids"], cand)) <= 1e-4
        assert o["logprob_sum"] == [c["logprob_sum"] for c in o["candidates"]]


@pytest.mark.parametrize("line,message", [
    ('{"prompt_ids": [1, 2], "candidate_ids": [[3]]', "in.jsonl:2: not valid JSON"),
    ('{"prompt_ids": [1, 2]}', "in.jsonl:2: pre-tokenised line is missing field 'candidate_ids'"),
    ('{"prompt_ids": [], "candidate_ids": [[3]]}', "in.jsonl:2: 'prompt_ids' is empty"),
    ('{"prompt_ids": [1], "candidate_ids": [[3, 999]]}', "in.jsonl:2: candidate 0: token id 999 is outside"),
    ('{"prompt_ids": [1], "candidate_ids": [["a"]]}',
     "in.jsonl:2: field 'candidate_ids\\[0\\]': must be a list of integer"),
    ('{"input": "x", "candidates": ["a"]}', "in.jsonl:2: missing field 'instruction'"),
    ('{"prompt_ids": [1], "candidate_ids": [[2, 3, 4, 5, 6, 7, 8, 9, 10]]}', "over --max-len 8"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, capsys, line, message):
    import re

    src = save_hf(tiny_hf_model(num_kv_heads=1, layers=1), tmp_path / "hf")
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt_ids": [1], "candidate_ids": [[2]]}\n' + line + "\n")
    assert cli(["score", str(src), str(data), str(tmp_path / "out.jsonl"), "--max-len", "8"]) == 2
    assert re.search(message, capsys.readouterr().err)
    # A refused run leaves nothing behind: no output, no empty OUT.partial, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "in.jsonl"]
