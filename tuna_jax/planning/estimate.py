"""An analytic estimate of a train step's memory per device, for targets this machine cannot compile for
(GPUs it does not have: ``--topology h100:8``). It is arithmetic over the architecture, the mesh and the
planned batch, not a compile: ``tests/unit/planning/test_plan.py`` holds it to the compiled figure of small models on
``cpu:8`` within a factor (see ``ESTIMATE_FACTOR`` there).

Per device, with S = fsdp x tensor (parameters are replicated over ``data``):

* parameters P x bytes(param_dtype) / S; AdamW's two moments twice that (optax keeps them in the
  parameters' dtype); gradients: the step's float32 accumulator plus one micro-batch's gradient;
* one layer's weights gathered in the compute dtype (FSDP), twice (forward and backward);
* activations: T token positions per device and micro-batch; each layer keeps for the backward pass
  what the remat policy saves (:func:`saved_bytes_per_token`), and the layer being differentiated holds
  everything once;
* the vocabulary projection: the float32 logits of the scored tokens, at most ``loss.logits_budget_mb``
  (chunked beyond it), for the forward pass and its gradient.

LoRA (``trainable``: the count of trained float32 parameters, adapters and ``lora.train_also``): the
frozen base in its param_dtype, no moments or gradients for it; the trained parameters, their two moments
and gradients in float32; each gathered layer weight also merged with its adapters (W + s A B in float32,
then cast), and, unless remat recomputes it, each layer's merged weight (``none``) or its float32 A B
(``dots*``: a dot without batch dims) kept for the backward pass. The forward pass of the frozen
reference (``loss.reference=model``) is not counted.
"""
from __future__ import annotations

import math

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def saved_bytes_per_token(lcfg, policy: str) -> int:
    """Bytes one decoder layer keeps per token position for the backward pass under ``policy``.

    The residual stream h is float32 (4 D); matmuls and their outputs are in the compute dtype c. ``none``
    keeps every intermediate: two norm outputs, q/k/v before and after RoPE, the attention output, the
    attention and MLP projections, gate, up, silu(gate) and their product (the xla / splash attention
    recompute their scores, so no [L, L] term). ``dots_no_batch`` / ``dots`` keep the outputs of the
    weight matmuls (q, k, v, o, gate, up, down); ``full`` / ``nothing_saveable`` only the layer's input.
    """
    c = _BYTES[lcfg.dtype]
    d, f = lcfg.hidden_size, lcfg.intermediate_size
    q, kv = lcfg.num_heads * lcfg.head_dim, lcfg.num_kv_heads * lcfg.head_dim
    layer_input = 4 * d
    if policy in ("full", "nothing_saveable"):
        return layer_input
    dots = c * (q + 2 * kv + d + 2 * f + d)
    if policy in ("dots", "dots_no_batch"):
        return layer_input + dots
    return layer_input + dots + c * (2 * d + q + kv + q + 2 * f) + 4 * d  # + norms, RoPE'd q/k, attn out, silu, h mid


def estimate_memory(cfg, lcfg, mesh_shape: dict, batch_shape, scored_per_unit: int,
                    trainable: int | None = None, lm_head: bool = True) -> dict:
    """Per-device bytes of one training step, by part (see the module docstring).

    ``mesh_shape``: {"data", "fsdp", "tensor"}; ``batch_shape``: the planned ``BatchShape`` of the
    global batch (U units of Q rows of L tokens); ``scored_per_unit``: S, tokens projected per unit;
    ``trainable``: LoRA's trained parameters (None: full fine-tuning); ``lm_head``: the objective projects
    scored tokens onto the vocabulary (not a PRM)."""
    p_bytes, c_bytes = _BYTES[lcfg.param_dtype], _BYTES[lcfg.dtype]
    shard = mesh_shape["fsdp"] * mesh_shape["tensor"]
    n_data = mesh_shape["data"] * mesh_shape["fsdp"]
    accum = cfg.train.grad_accum
    params = lcfg.num_params()
    d, f, v = lcfg.hidden_size, lcfg.intermediate_size, lcfg.vocab_size
    layer_params = d * lcfg.head_dim * (2 * lcfg.num_heads + 2 * lcfg.num_kv_heads) + 3 * d * f + 2 * d

    units = math.ceil(batch_shape.units / accum / n_data)  # per device and micro-batch
    tokens = units * batch_shape.rows * batch_shape.length
    scored = units * scored_per_unit
    policy = lcfg.remat_policy
    per_layer = saved_bytes_per_token(lcfg, policy)
    working = saved_bytes_per_token(lcfg, "none")
    logits = min(scored * v * 4, cfg.loss.logits_budget_mb * 2**20) if lm_head else 0
    if trainable is None:
        parts = {"params": params * p_bytes / shard, "optimizer": 2 * params * p_bytes / shard,
                 "gradients": params * (4 + p_bytes) / shard,
                 "gathered_layer_weights": 2 * layer_params * c_bytes / mesh_shape["tensor"]}
    else:
        kept = {"none": c_bytes, "dots": 4, "dots_no_batch": 4}.get(policy, 0)
        parts = {"frozen_base": params * p_bytes / shard, "trainable": trainable * 4 / shard,
                 "optimizer": 2 * trainable * 4 / shard, "gradients": trainable * (4 + 4) / shard,
                 "gathered_layer_weights": 2 * layer_params * (p_bytes + 4 + c_bytes) / mesh_shape["tensor"],
                 "merged_weights_kept": lcfg.num_layers * layer_params * kept / mesh_shape["tensor"]}
    parts |= {
        "activations": lcfg.num_layers * tokens * per_layer + tokens * working,
        "logits": 2 * logits + scored * d * (4 + c_bytes),
        "embeddings": tokens * d * (4 + c_bytes),
    }
    parts = {k: int(x) for k, x in parts.items() if x or k != "merged_weights_kept"}
    return {"total": sum(parts.values()), "parts": parts, "tokens_per_device": tokens,
            "scored_per_device": scored}
