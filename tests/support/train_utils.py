"""Shared set-up for training tests: synthetic ranking data and a tiny model config."""
import json
import pathlib

from tuna_jax.assets import stories260k_hf_dir
from tuna_jax.data.synthetic import ranking_records, sft_records

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_HF = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def write_jsonl(path, rows):
    path = pathlib.Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(tmp_path, mode="ranking", n_train=64, n_eval=0, **extra):
    """Overrides for configs/tiny_{mode}.yaml writing everything under tmp_path."""
    rows = ranking_records if mode == "ranking" else sft_records
    train = write_jsonl(tmp_path / "train.jsonl", rows(n_train, seed=0))
    out = [f"model.tokenizer={stories260k_hf_dir(tmp_path.parent / 'tuna-cache')}",
           f"data.train={train}", f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
           "train.tensorboard=false"]
    if n_eval:
        out.append(f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', rows(n_eval, seed=1))}")
    out += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return out


def read_metrics(run_dir):
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def final_params(run_dir):
    """The parameters a run exported to RUN_DIR/final, as a tree of NumPy arrays."""
    import jax
    import numpy as np
    from flax import nnx

    from tuna_jax.model import load_model
    from tuna_jax.parallel import make_mesh

    # On an explicit one-device mesh: without a mesh, Orbax would restore onto the devices recorded at
    # save time, which do not exist here when a multi-process run saved it.
    model = load_model(pathlib.Path(run_dir) / "final", make_mesh((1, 1, 1), jax.devices()[:1]))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def max_param_diff(a, b) -> float:
    """The largest absolute difference between two parameter trees of the same structure."""
    import jax
    import numpy as np

    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
