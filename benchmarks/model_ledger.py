"""The model-level ledger: the predicted H200 time of one decoder layer, dense Phi-3 against KPhi-3.

    python -m kphi3_bench.model_ledger                       # kphi3 and phi3-mini, 8192 tokens
    python -m kphi3_bench.model_ledger --families kphi3 --M 4096 --batch 2
    python -m kphi3_bench.model_ledger --out ledger.json --markdown ledger.md

Nothing is timed and nothing runs on a GPU: like ``kphi3_bench.ledger`` (whose cost model, launch
records and aten recorder this module reuses), every number is arithmetic on what each launch
reads, writes and computes, **a prediction from FLOP and byte counts, not a measurement**. Each
launch costs ``max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s) + 2 us`` (``ledger.h200_model``).

One decoder layer's training step (forward, then the backward alone given the upstream gradient:
every input and weight gradient) at ``tokens = batch * seq`` tokens, for four paths that differ
only in their four projections (qkv, o, gate_up, down) and, for ``fused``, the activation, the
norms and the residual adds:

* **dense**: Phi-3, the same widths as ``F.linear`` (``ledger.dense_launches``, an aten recording).
* **reference**: KPhi-3 with ``kphi3_kernels.reference.gpc_io`` (``ledger.reference_launches``,
  the einsum chain recorded as aten ops on meta tensors).
* **triton**: KPhi-3 with today's op-level Triton kernels (``ledger.triton_launches``: the
  launches of ``kphi3_kernels.ops.triton_impl`` recorded on meta tensors, none run).
* **fused**: triton with ``KPhi3Config(fused_decoder=True)``: the activation and down_proj, the
  two RMSNorms with qkv_proj and gate_up_proj, and the residual adds are the launches of the
  fused MLP tail and norm heads (``fused_launches``: the producer writes the next IO block's
  input as both its GEMMs read it; the activation's backward runs in down_proj's input-gradient
  epilogue; the attention's residual add runs in gate_up_proj's norm head, the MLP's in
  down_proj's epilogue), also recorded, not run. o_proj is the op-level block.

The rest of the layer is the same for every path and is costed by explicit formulas (not an aten
recording), each a fused launch that reads every input and writes every output once; elementwise
and reduction FLOPs are counted as 0, as ``torch.utils.flop_counter`` does (these launches are
memory-bound by two orders of magnitude, so the time is their bytes). ``N`` tokens, hidden ``h``,
intermediate ``i``, ``H`` query heads and ``Hkv`` key/value heads of ``D``, element size ``e``:

* **norms**: two RMSNorms. Forward reads x ``[N, h]`` and the weight ``[h]``, writes y ``[N, h]``
  and the fp32 inverse RMS ``[N]`` it saves; backward reads dy, x, the weight and the inverse
  RMS, writes dx and the weight gradient.
* **rope**: one launch for q and k. Forward reads q ``[N, H*D]``, k ``[N, Hkv*D]``, cos and sin
  ``[N, D]`` (the model's per-row layout) and writes the rotated q and k; backward is the same
  rotation of dq and dk (the same bytes).
* **activation**: ``silu(gate) * up``. Forward reads gate_up ``[N, 2i]``, writes ``[N, i]``;
  backward reads the output gradient ``[N, i]`` and the saved gate_up, writes d(gate_up).
* **residuals**: two adds. Forward reads two ``[N, h]`` and writes one; backward is the add that
  accumulates the two gradients meeting at each residual branch point (the same bytes).
* **attention**, as flash attention (FA2's accounting), causal, ``B`` sequences of ``T``:
  forward ``2 * B * H * T^2 * D`` FLOPs (the non-causal ``4 * B * H * T^2 * D`` halved for the
  causal mask), one launch reading q, k, v and writing o and the fp32 logsumexp ``[B, H, T]``;
  backward 2.5 times the forward's FLOPs (five ``T x T`` matmuls against the forward's two), in
  FA2's three launches: the preprocess (reads o, do, writes the fp32 ``rowsum(do * o)``), the
  main kernel (reads q, k, v, do, the logsumexp and that rowsum, writes dk, dv and the fp32 dq
  accumulator, counted once) and the conversion of dq to ``e`` (reads fp32, writes ``e``).
  Key/value heads are read once (no repeat_kv copy). The compute ceiling is the GEMMs' 790
  TFLOP/s, which flash attention does not reach in practice.

Dropout is 0 in the released config and costs nothing; the RoPE table (cos, sin) is built once
per model, not per layer. The embedding and ``lm_head`` (an ``F.linear(h, vocab)``, the same for
every path) are listed apart, not in the layer; the final norm and the loss are not counted.

**Decode**: one new token for each of ``b`` sequences (``--decode-batches``, 1 and 16) against a
static KV cache of ``S`` positions (``--cache``, 2048): the forward alone at ``M = b``; the
projections at ``M = b``, the norms, RoPE, activation and residuals at ``N = b``, the cache
update (writes the new k and v rows) and attention as one read of the cache: reads q
``[b, H, D]`` and the cache's k and v ``[b, Hkv, S, D]``, writes o, ``4 * b * H * S * D`` FLOPs.

Python API: ``LayerConfig``, ``CONFIGS``, ``flash_attention``, ``decode_attention``,
``rms_norm``, ``rope``, ``activation``, ``residual_add``, ``projections``, ``fused_launches``,
``path_costs``, ``train_layer``,
``decode_layer``, ``outside_layer``, ``build``, ``format_table``, ``markdown``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .ledger import CostModel, LaunchCost, PathCost, h200_model

SCHEMA = "kphi3_bench.model_ledger/1"
PATHS = ("dense", "reference", "triton", "fused")
PROJECTIONS = ("qkv", "o", "gate_up", "down")
REST = ("norms", "rope", "activation", "residuals")
COMPONENTS = ("projections", "attention") + REST
from .cli import MODEL_LEDGER_BATCH as DEFAULT_BATCH, MODEL_LEDGER_CACHE as DEFAULT_CACHE
from .cli import MODEL_LEDGER_DECODE_BATCHES as DEFAULT_DECODE_BATCHES
from .cli import MODEL_LEDGER_FAMILIES as DEFAULT_FAMILIES, MODEL_LEDGER_TOKENS as DEFAULT_TOKENS
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4


@dataclass(frozen=True)
class LayerConfig:
    """The widths of one decoder layer (Phi-3 layout, kv heads = heads as released)."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    min_channels_per_group: int
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> Dict[str, Any]:
        return {"family": self.family, "hidden": self.hidden, "intermediate": self.intermediate,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab": self.vocab, "min_channels_per_group": self.min_channels_per_group,
                "source": self.source}


# hidden / intermediate / min are those of kphi3_bench.shapes.FAMILIES (checked by the tests).
CONFIGS: Dict[str, LayerConfig] = {c.family: c for c in (
    LayerConfig("kphi3", 1280, 5120, 20, 20, 32064, 256,
                "the released config.json (less-parameters-llm src/config.json): hidden 1280, "
                "intermediate 5120, 20 heads of 64, 20 kv heads, vocab 32064, min 256"),
    LayerConfig("phi3-mini", 3072, 8192, 32, 32, 32064, 256,
                "Phi-3-mini widths: hidden 3072, intermediate 8192, 32 heads of 96, vocab 32064"),
)}


# ----------------------------------------------------------------------------------------------
# The rest of the layer: explicit formulas
# ----------------------------------------------------------------------------------------------


def rms_norm(n: int, hidden: int, dtype: str, mode: str) -> LaunchCost:
    """One fused RMSNorm over ``[n, hidden]``: see the module docstring."""
    e = ELEMENT_SIZE[dtype]
    if mode == "fwd":   # x, weight -> y, inverse RMS (fp32)
        nbytes = (2 * n * hidden + hidden) * e + n * FP32
    else:               # dy, x, weight, inverse RMS -> dx, dweight
        nbytes = (3 * n * hidden + 2 * hidden) * e + n * FP32
    return LaunchCost(f"rms_norm_{mode}", 0, nbytes)


def rope(n: int, heads: int, kv_heads: int, head_dim: int, dtype: str, mode: str) -> LaunchCost:
    """RoPE of q and k in one launch: read q, k, cos, sin; write q, k (backward: the same)."""
    e = ELEMENT_SIZE[dtype]
    qk = n * (heads + kv_heads) * head_dim
    return LaunchCost(f"rope_{mode}", 0, (2 * qk + 2 * n * head_dim) * e)


def activation(n: int, intermediate: int, dtype: str, mode: str) -> LaunchCost:
    """``silu(gate) * up``: read gate_up ``[n, 2i]``, write ``[n, i]``; backward reads the output
    gradient and gate_up, writes d(gate_up)."""
    e = ELEMENT_SIZE[dtype]
    count = 3 * n * intermediate if mode == "fwd" else 5 * n * intermediate
    return LaunchCost(f"silu_mul_{mode}", 0, count * e)


def residual_add(n: int, hidden: int, dtype: str, mode: str) -> LaunchCost:
    """One add of two ``[n, hidden]`` (backward: the add accumulating the two gradients)."""
    return LaunchCost(f"residual_add_{mode}", 0, 3 * n * hidden * ELEMENT_SIZE[dtype])


def flash_attention(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                    mode: str) -> PathCost:
    """Causal flash attention (FA2's accounting): see the module docstring."""
    e = ELEMENT_SIZE[dtype]
    B, T, H, Hkv, D = batch, seq, heads, kv_heads, head_dim
    q = o = B * T * H * D
    kv = B * T * Hkv * D
    rows = B * H * T              # one fp32 per query row: the logsumexp, rowsum(do * o)
    forward_flops = 2 * B * H * T * T * D    # 4 * B * H * T^2 * D, halved by the causal mask
    if mode == "fwd":
        return PathCost([LaunchCost("flash_attn_fwd", forward_flops,
                                    (q + 2 * kv + o) * e + rows * FP32)])
    return PathCost([
        LaunchCost("flash_attn_bwd_preprocess", 0, 2 * o * e + rows * FP32),
        LaunchCost("flash_attn_bwd", forward_flops * 5 // 2,
                   (q + 2 * kv + o) * e + 2 * rows * FP32 + 2 * kv * e + q * FP32),
        LaunchCost("flash_attn_bwd_convert_dq", 0, q * FP32 + q * e),
    ])


def decode_attention(batch: int, cache: int, heads: int, kv_heads: int, head_dim: int,
                     dtype: str) -> LaunchCost:
    """One new query per sequence against ``cache`` cached keys and values (one read of them)."""
    e = ELEMENT_SIZE[dtype]
    q = batch * heads * head_dim
    kv = batch * cache * kv_heads * head_dim
    return LaunchCost("decode_attn", 4 * batch * heads * cache * head_dim, (2 * q + 2 * kv) * e)


def cache_update(batch: int, kv_heads: int, head_dim: int, dtype: str) -> LaunchCost:
    """The static cache's write of the new k and v rows (read them, write them)."""
    return LaunchCost("kv_cache_update", 0, 4 * batch * kv_heads * head_dim * ELEMENT_SIZE[dtype])


def rest_of_layer(cfg: LayerConfig, n: int, dtype: str, mode: str) -> Dict[str, PathCost]:
    """norms, rope, activation and residuals of one layer at ``n`` tokens, in ``mode``."""
    return {
        "norms": PathCost([rms_norm(n, cfg.hidden, dtype, mode) for _ in range(2)]),
        "rope": PathCost([rope(n, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype, mode)]),
        "activation": PathCost([activation(n, cfg.intermediate, dtype, mode)]),
        "residuals": PathCost([residual_add(n, cfg.hidden, dtype, mode) for _ in range(2)]),
    }


# ----------------------------------------------------------------------------------------------
# The projections: the op-level ledger
# ----------------------------------------------------------------------------------------------


def family_shapes(cfg: LayerConfig):
    """qkv, o, gate_up and down of ``cfg`` as ``kphi3_bench.shapes.Shape`` (G from min)."""
    from .shapes import Shape

    h, i, m = cfg.hidden, cfg.intermediate, cfg.min_channels_per_group
    qkv = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    return [Shape(f"{cfg.family}-{op}", cfg.family, op, cin, cout, m)
            for op, cin, cout in (("qkv", h, qkv), ("o", cfg.heads * cfg.head_dim, h),
                                  ("gate_up", h, 2 * i), ("down", i, h))]


def projection_launches(path: str, shape, m: int, dtype: str, mode: str,
                        io_forward: str = "auto") -> PathCost:
    """One projection's launches on ``path`` (the IO block ``gpc_io`` for KPhi-3)."""
    from . import ledger

    p = ledger.Problem("gpc_io", shape, m, dtype)
    if path == "dense":
        return ledger.dense_launches(p, mode)
    if path == "reference":
        return ledger.reference_launches(p, mode)
    if path == "triton":
        return ledger.triton_launches(p, mode, io_forward)
    raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")


def projections(cfg: LayerConfig, path: str, m: int, dtype: str, modes: Sequence[str],
                io_forward: str = "auto") -> Dict[str, Dict[str, PathCost]]:
    """``{projection: {mode: PathCost}}`` for the four projections of ``cfg``."""
    return {sh.op: {mode: projection_launches(path, sh, m, dtype, mode, io_forward)
                    for mode in modes}
            for sh in family_shapes(cfg)}


def fused_launches(cfg: LayerConfig, m: int, dtype: str, mode: str,
                   norm_heads: str = "auto") -> Dict[str, PathCost]:
    """What ``KPhi3Config(fused_decoder=True)`` runs differently at ``m`` tokens, recorded on meta
    tensors like ``ledger.triton_launches`` (none run): ``norms``, ``residuals``, ``qkv``,
    ``gate_up``, ``activation`` and ``down``.

    * ``ops/norm_head.py`` for each RMSNorm and the IO block after it (qkv_proj, gate_up_proj):
      forward, the norm writing the block-residue layout where it adds no channel
      (``kphi3_kernels.fused.layout_padding``), else channel order and its de-interleaved copy
      (not at the released widths: the split head), then the block reading it; backward, the
      block's input gradient in channel order, its weight gradients from the saved operands,
      the norm's backward.
    * The residual stream: gate_up_proj's norm head takes the attention's residual add (it
      reads both addends and writes ``h``), and its backward adds the stream's gradient to the
      norm's in its pass, so that branch point has no add of its own; the layer input's branch
      point keeps its add (``residual_add`` formula).
    * ``ops/mlp_tail.py`` for ``silu(gate) * up`` and down_proj: forward, the activation writing
      the layout (``activation``), down_proj reading it and adding the residual stream in its
      epilogue; backward, down_proj's three launches, the activation's backward inside its
      input-gradient epilogue (no launch of its own).

    Every norm backward is followed by the sum of the norm weight's per-program partial
    gradients (a torch reduction, counted as one launch reading the partials).
    """
    import torch

    from kphi3_kernels.fused import layout_padding
    from kphi3_kernels.layout import residue_run_length
    from kphi3_kernels.ops import mlp_tail, norm_head

    from .ledger import record_costs
    from .shapes import DTYPES

    torch_dtype = DTYPES[dtype]
    e = ELEMENT_SIZE[dtype]

    def meta(*size, dtype=torch_dtype):
        return torch.empty(*size, dtype=dtype, device="meta")

    def dweight_sum(channels: int) -> LaunchCost:
        programs = -(-m // 16)  # layout_norm's 16-row programs: one fp32 partial each
        return LaunchCost("rms_norm_dweight_sum", 0, programs * channels * FP32 + channels * e)

    rstd, norm_weight = meta(m, dtype=torch.float32), meta(cfg.hidden)
    out: Dict[str, PathCost] = {"norms": PathCost(), "residuals": PathCost()}
    for sh in family_shapes(cfg):
        G, s, og = sh.groups, sh.in_per_group, sh.out_per_group
        run = residue_run_length(G * s, G, 8)
        x, t, dy = meta(m, G * s), meta(m, G * G * run), meta(m, G * og)
        w1, w2 = meta(G, s, og), meta(G, s, og)
        if sh.op in ("qkv", "gate_up"):
            # gate_up's head takes the attention's residual add (forward: h = residual + x;
            # backward: the stream's gradient dh summed in the norm's pass).
            residual = meta(m, G * s) if sh.op == "gate_up" else None
            dh = meta(m, G * s) if sh.op == "gate_up" else None
            # "auto": what the model runs; "layout" / "split": either head everywhere, to
            # price the choice (norm_heads_delta_us).
            layout_head = (layout_padding(G, s) == 0 if norm_heads == "auto"
                           else norm_heads == "layout")
            if layout_head:
                costs = record_costs(
                    (lambda: norm_head.norm_io_fwd(x, norm_weight, 1e-5, w1, w2, run=run,
                                                   residual=residual)) if mode == "fwd" else
                    (lambda: norm_head.norm_io_bwd(dy, x, norm_weight, rstd, t, w1, w2, dh=dh)))
            else:
                n, xi = meta(m, G * s), meta(m, G * s)
                costs = record_costs(
                    (lambda: norm_head.norm_io_split_fwd(x, norm_weight, 1e-5, w1, w2,
                                                         residual=residual)) if mode == "fwd" else
                    (lambda: norm_head.norm_io_split_bwd(dy, x, norm_weight, rstd, n, xi, w1, w2,
                                                         dh=dh)))
            if mode == "bwd":
                costs.append(dweight_sum(G * s))
            norm = [c for c in costs if "rms_norm" in c.name]
            out["norms"].launches.extend(norm)
            out[sh.op] = PathCost([c for c in costs if c not in norm])
        elif sh.op == "down":
            gu = meta(m, 2 * G * s)
            costs = record_costs((lambda: mlp_tail.mlp_tail_fwd(gu, w1, w2, run=run, residual=dy))
                                 if mode == "fwd" else
                                 (lambda: mlp_tail.mlp_tail_bwd(dy, gu, t, w1, w2)))
            out["activation"] = PathCost([c for c in costs if c.name == "silu_mul_layout"])
            out["down"] = PathCost([c for c in costs if c.name != "silu_mul_layout"])
    if mode == "bwd":  # the layer input's branch point: the input norm's and the stream's
        out["residuals"].launches.append(residual_add(m, cfg.hidden, dtype, mode))
    return out


def norm_heads_delta_us(cfg: LayerConfig, tokens: int, dtype: str, model: CostModel) -> float:
    """The fused layer's forward + backward with every norm head on the block-residue layout,
    minus with every head split (channel order and its de-interleaved copy): what the layout
    heads would add per layer at these widths (negative: what they would save)."""
    def total(heads: str) -> float:
        return sum(cost.time_us(model) for mode in ("fwd", "bwd")
                   for cost in fused_launches(cfg, tokens, dtype, mode, heads).values())
    return total("layout") - total("split")


def path_costs(cfg: LayerConfig, path: str, m: int, dtype: str, modes: Sequence[str],
               io_forward: str = "auto"):
    """``(projections, replaced)`` of ``path``: the four projections' ``{op: {mode: cost}}``
    and, for ``fused`` only, the components it runs differently (``{"norms": {mode: cost},
    "activation": ..., "residuals": ...}``; else empty). o_proj stays the op-level block for
    every path."""
    if path != "fused":
        return projections(cfg, path, m, dtype, modes, io_forward), {}
    proj = projections(cfg, "triton", m, dtype, modes, io_forward)
    fused = {mode: fused_launches(cfg, m, dtype, mode) for mode in modes}
    for op in ("qkv", "gate_up", "down"):
        if op in fused[modes[0]]:
            proj[op] = {mode: fused[mode][op] for mode in modes}
    replaced = {name: {mode: fused[mode][name] for mode in modes}
                for name in ("norms", "activation", "residuals")}
    return proj, replaced


# ----------------------------------------------------------------------------------------------
# A layer
# ----------------------------------------------------------------------------------------------


def _merge(paths: Sequence[PathCost]) -> PathCost:
    return PathCost([l for p in paths for l in p.launches])


def _cost_dict(p: PathCost, model: CostModel) -> Dict[str, Any]:
    return {"launches": p.count, "flops": p.flops, "bytes": p.bytes,
            "time_us": round(p.time_us(model), 4)}


def _layer_dict(components: Dict[str, Dict[str, PathCost]],
                proj: Dict[str, Dict[str, PathCost]], tokens: int,
                model: CostModel) -> Dict[str, Any]:
    """Totals, tokens/s and the per-component (and per-projection) costs of one path."""
    out_components = {}
    for name in COMPONENTS:
        by_mode = components[name]
        entry = {mode: _cost_dict(c, model) for mode, c in by_mode.items()}
        entry["time_us"] = round(sum(c.time_us(model) for c in by_mode.values()), 4)
        out_components[name] = entry
    total = sum(c.time_us(model) for by_mode in components.values() for c in by_mode.values())
    rest = sum(c.time_us(model) for name in REST for c in components[name].values())
    launches = sum(c.count for by_mode in components.values() for c in by_mode.values())
    return {
        "time_us": round(total, 4),
        "tokens_per_s": round(tokens / (total * 1e-6), 1),
        "launches": launches,
        "rest_us": round(rest, 4),
        "components": out_components,
        "projections": {op: {mode: _cost_dict(c, model) for mode, c in by_mode.items()}
                        for op, by_mode in proj.items()},
    }


def _ratios(paths: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    t = {name: p["time_us"] for name, p in paths.items()}
    return {"triton_over_dense": round(t["triton"] / t["dense"], 4),
            "triton_over_reference": round(t["triton"] / t["reference"], 4),
            "reference_over_dense": round(t["reference"] / t["dense"], 4),
            "fused_over_dense": round(t["fused"] / t["dense"], 4),
            "fused_over_reference": round(t["fused"] / t["reference"], 4),
            "fused_over_triton": round(t["fused"] / t["triton"], 4)}


def train_layer(cfg: LayerConfig, tokens: int, batch: int, dtype: str, model: CostModel,
                io_forward: str = "auto") -> Dict[str, Any]:
    """One layer's forward + backward at ``tokens = batch * seq``, every path."""
    if tokens % batch:
        raise ValueError(f"tokens ({tokens}) must be a multiple of batch ({batch})")
    seq = tokens // batch
    modes = ("fwd", "bwd")
    shared: Dict[str, Dict[str, PathCost]] = {
        "attention": {mode: flash_attention(batch, seq, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                            dtype, mode) for mode in modes}}
    for mode in modes:
        for name, cost in rest_of_layer(cfg, tokens, dtype, mode).items():
            shared.setdefault(name, {})[mode] = cost
    paths = {}
    for path in PATHS:
        proj, replaced = path_costs(cfg, path, tokens, dtype, modes, io_forward)
        components = dict(shared, projections={
            mode: _merge([proj[op][mode] for op in PROJECTIONS]) for mode in modes})
        components.update(replaced)
        paths[path] = _layer_dict(components, proj, tokens, model)
    return {"family": cfg.family, "task": "train", "tokens": tokens, "batch": batch, "seq": seq,
            "dtype": dtype, "paths": paths, "ratios": _ratios(paths),
            "layout_norm_heads_delta_us": round(norm_heads_delta_us(cfg, tokens, dtype, model),
                                                 4)}


def decode_layer(cfg: LayerConfig, batch: int, cache: int, dtype: str, model: CostModel,
                 io_forward: str = "auto") -> Dict[str, Any]:
    """One layer's forward for one new token per sequence against a cache of ``cache``."""
    shared: Dict[str, Dict[str, PathCost]] = {"attention": {"fwd": PathCost([
        cache_update(batch, cfg.kv_heads, cfg.head_dim, dtype),
        decode_attention(batch, cache, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype)])}}
    for name, cost in rest_of_layer(cfg, batch, dtype, "fwd").items():
        shared[name] = {"fwd": cost}
    paths = {}
    for path in PATHS:
        proj, replaced = path_costs(cfg, path, batch, dtype, ("fwd",), io_forward)
        components = dict(shared, projections={
            "fwd": _merge([proj[op]["fwd"] for op in PROJECTIONS])})
        components.update(replaced)
        paths[path] = _layer_dict(components, proj, batch, model)
    return {"family": cfg.family, "task": "decode", "tokens": batch, "batch": batch,
            "cache": cache, "dtype": dtype, "paths": paths, "ratios": _ratios(paths)}


def outside_layer(cfg: LayerConfig, tokens: int, dtype: str, model: CostModel) -> Dict[str, Any]:
    """The embedding and ``lm_head`` at ``tokens`` (fwd and bwd), aten recordings on meta
    tensors; the same for every path, not part of the layer."""
    import torch
    import torch.nn.functional as F

    from . import ledger
    from .shapes import DTYPES, Shape

    dt = DTYPES[dtype]
    out: Dict[str, Any] = {}
    ids = torch.empty(tokens, dtype=torch.long, device="meta")
    for mode in ("fwd", "bwd"):
        w = torch.empty(cfg.vocab, cfg.hidden, dtype=dt, device="meta",
                        requires_grad=(mode == "bwd"))
        dy = torch.empty(tokens, cfg.hidden, dtype=dt, device="meta")
        out.setdefault("embedding", {})[mode] = _cost_dict(
            ledger.record_aten(lambda weight: F.embedding(ids, weight), [w], mode, dy), model)
    head = Shape(f"{cfg.family}-lm_head", cfg.family, "lm_head", cfg.hidden, cfg.vocab,
                 cfg.min_channels_per_group)
    for mode in ("fwd", "bwd"):
        out.setdefault("lm_head", {})[mode] = _cost_dict(
            ledger.dense_launches(ledger.Problem("gpc_io", head, tokens, dtype), mode), model)
    for entry in out.values():
        entry["time_us"] = round(entry["fwd"]["time_us"] + entry["bwd"]["time_us"], 4)
    return {"family": cfg.family, "tokens": tokens, "dtype": dtype, **out}


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------


def model_dict(model: CostModel, io_forward: str) -> Dict[str, Any]:
    return {
        "peak_tflops": model.peak_tflops, "peak_gbps": model.peak_gbps,
        "launch_overhead_us": model.overhead_us,
        "time": "sum over launches of max(flops / peak_tflops, bytes / peak_gbps) + overhead",
        "projections": ("dense: ledger.dense_launches (F.linear, aten); reference: "
                        "ledger.reference_launches (gpc_io einsum chain, aten); triton: "
                        "ledger.triton_launches (gpc_io, KernelLaunch records); fused: triton "
                        "with the norms, qkv, gate_up, the activation, down and the residual "
                        "adds as model_ledger.fused_launches (norm_head, mlp_tail KernelLaunch "
                        "records)"),
        "attention": ("causal flash attention, FA2 accounting: fwd 2*B*H*T^2*D FLOPs (4*B*H*T^2*D "
                      "halved), reads q, k, v, writes o and fp32 logsumexp; bwd 2.5x the forward's "
                      "FLOPs in 3 launches (preprocess, main with fp32 dq accumulator, dq "
                      "conversion); decode: one read of the KV cache, 4*b*H*S*D FLOPs, plus the "
                      "cache update"),
        "rest": ("explicit formulas, one fused launch each, every tensor read or written once, "
                 "0 FLOPs: 2 RMSNorms (+ fp32 inverse RMS), RoPE of q and k, silu(gate) * up, "
                 "2 residual adds (bwd: the gradient accumulation at each branch point); on the "
                 "fused path, the launches it records instead (all but RoPE and the layer "
                 "input's branch-point add)"),
        "outside_layer": "embedding and lm_head (aten recordings), not in the layer",
        "io_forward": io_forward,
        "note": "a prediction from FLOP and byte counts, not a measurement",
    }


def build(families: Sequence[str] = DEFAULT_FAMILIES, tokens: int = DEFAULT_TOKENS,
          batch: int = DEFAULT_BATCH, decode_batches: Sequence[int] = DEFAULT_DECODE_BATCHES,
          cache: int = DEFAULT_CACHE, dtype: str = "bf16", model: Optional[CostModel] = None,
          io_forward: str = "auto") -> Dict[str, Any]:
    """Everything ``main`` prints and writes, as one JSON-ready dict."""
    model = model or h200_model()
    cfgs = [CONFIGS[f] for f in families]
    return {
        "schema": SCHEMA, "tool": "python -m kphi3_bench.model_ledger",
        "model": model_dict(model, io_forward),
        "configs": [c.to_dict() for c in cfgs],
        "train": [train_layer(c, tokens, batch, dtype, model, io_forward) for c in cfgs],
        "decode": [decode_layer(c, b, cache, dtype, model, io_forward)
                   for c in cfgs for b in decode_batches],
        "outside_layer": [outside_layer(c, tokens, dtype, model) for c in cfgs],
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _us(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


TABLE_HEADERS = ("family", "task", "tokens", "path", "launches", "total us", "tokens/s",
                 "projections us", "attention us", "norms us", "rope us", "activation us",
                 "residuals us", "/dense", "/reference")


def table_body(data: Dict[str, Any]) -> List[List[str]]:
    body = []
    for row in data["train"] + data["decode"]:
        task = ("train fwd+bwd" if row["task"] == "train"
                else f"decode b={row['batch']} S={row['cache']}")
        t = {name: p["time_us"] for name, p in row["paths"].items()}
        for path in PATHS:
            p = row["paths"][path]
            c = p["components"]
            body.append([row["family"], task, str(row["tokens"]), path, str(p["launches"]),
                         _us(p["time_us"]), f"{p['tokens_per_s']:,.0f}"]
                        + [_us(c[name]["time_us"]) for name in COMPONENTS]
                        + [f"{p['time_us'] / t['dense']:.2f}",
                           f"{p['time_us'] / t['reference']:.2f}"])
    return body


def format_table(data: Dict[str, Any]) -> str:
    from .report import render

    return render(TABLE_HEADERS, table_body(data), right=range(2, len(TABLE_HEADERS)))


def outside_lines(data: Dict[str, Any]) -> List[str]:
    lines = []
    for o in data["outside_layer"]:
        lines.append(f"{o['family']} at {o['tokens']} tokens, outside the layer (every path): "
                     f"embedding fwd+bwd {_us(o['embedding']['time_us'])} us, lm_head fwd+bwd "
                     f"{_us(o['lm_head']['time_us'])} us.")
    return lines


def summary_lines(data: Dict[str, Any]) -> List[str]:
    lines = []
    for row in data["train"]:
        p, r = row["paths"], row["ratios"]
        lines.append(
            f"{row['family']}, one layer, fwd+bwd at {row['tokens']} tokens: dense "
            f"{_us(p['dense']['time_us'])} us, reference {_us(p['reference']['time_us'])} us, "
            f"triton {_us(p['triton']['time_us'])} us, fused {_us(p['fused']['time_us'])} us; "
            f"triton / dense {r['triton_over_dense']:.2f}, triton / reference "
            f"{r['triton_over_reference']:.2f}; fused / dense {r['fused_over_dense']:.2f} "
            f"({1 / r['fused_over_dense']:.2f}x dense's tokens/s), fused / reference "
            f"{r['fused_over_reference']:.2f} ({1 / r['fused_over_reference']:.2f}x) (predicted).")
        delta = row.get("layout_norm_heads_delta_us")
        if delta is not None:
            lines.append(
                f"{row['family']}, fused path: norm heads on the block-residue layout instead of "
                f"split heads would {'add' if delta >= 0 else 'save'} {_us(abs(delta))} us per "
                f"layer at {row['tokens']} tokens (predicted).")
    return lines


MARKDOWN_INTRO = """\
Predicted with `python -m kphi3_bench.model_ledger` on the H200 cost model of
`kphi3_bench.ledger`: **a prediction from FLOP and byte counts, not a measurement.** Each launch
costs `max(FLOPs / {tflops:g} TFLOP/s, bytes / {gbps:g} GB/s) + {overhead:g} us`; a layer costs
the sum of its launches.

- One decoder layer, training step = forward + backward (every input and weight gradient), at
  {tokens} tokens (batch {batch} x {seq}), {dtype}. Decode: the forward of one new token per
  sequence against a static KV cache.
- **dense** (Phi-3: the four projections as `F.linear`), **reference** (KPhi-3 with
  `kphi3_kernels.reference.gpc_io`, an aten recording), **triton** (KPhi-3 with the op-level
  Triton kernels, `ledger.triton_launches`, IO forward design `{io}`) differ only in the
  projections. **fused** (`KPhi3Config(fused_decoder=True)`) is triton with the MLP's tail
  fused: `silu(gate) * up` writes down_proj's input in the block-residue layout, down_proj's
  GEMMs read it, and its input gradient turns into d(gate_up) in its epilogue, so the
  activation's backward has no launch (`ops/mlp_tail.py`); each RMSNorm writes its IO block's
  input (`ops/norm_head.py`): in the layout where it adds no padding, else in channel order
  and its de-interleaved copy (at these widths: G*R = 280 for s = 256 would be more matrix
  work than the pass it saves); the attention's residual add runs in gate_up_proj's norm
  head, whose backward sums the branch point's gradients in its pass, and the MLP's in
  down_proj's epilogue. Its norms and adds are the launches it records.
- Attention is causal flash attention with FA2's accounting: forward `2*B*H*T^2*D` FLOPs
  (`4*B*H*T^2*D` halved by the mask), reading q, k, v and writing o and the fp32 logsumexp;
  backward 2.5x the forward's FLOPs in three launches (preprocess, main kernel with an fp32 dq
  accumulator, dq conversion). Decode attention is one read of the KV cache (`4*b*H*S*D`
  FLOPs) plus the cache update. The compute ceiling is the GEMM peak, which flash attention
  does not reach in practice.
- The rest (two RMSNorms, RoPE of q and k, `silu(gate) * up`, two residual adds) is costed by
  explicit formulas: one fused launch each that reads and writes every tensor once, 0 FLOPs
  (the fused path: RoPE and the layer input's branch-point add).
  Dropout (0) and the RoPE table (built once per model) cost nothing.
- Ratios are a path's time over dense's or reference's (below 1: predicted faster).
"""


def markdown(data: Dict[str, Any]) -> str:
    from .report import markdown_table

    train = data["train"][0] if data["train"] else {"tokens": "-", "batch": "-", "seq": "-",
                                                    "dtype": "-"}
    m = data["model"]
    parts = ["## Model-level ledger (predicted)", "",
             "<!-- generated by python -m kphi3_bench.model_ledger --markdown; do not edit by "
             "hand -->", "",
             MARKDOWN_INTRO.format(tflops=m["peak_tflops"], gbps=m["peak_gbps"],
                                   overhead=m["launch_overhead_us"], tokens=train["tokens"],
                                   batch=train["batch"], seq=train["seq"], dtype=train["dtype"],
                                   io=m["io_forward"]),
             "### Configurations", ""]
    heads = ["family", "hidden", "intermediate", "heads", "kv heads", "head_dim", "vocab", "min"]
    parts += [markdown_table(heads, [[c["family"], str(c["hidden"]), str(c["intermediate"]),
                                      str(c["heads"]), str(c["kv_heads"]), str(c["head_dim"]),
                                      str(c["vocab"]), str(c["min_channels_per_group"])]
                                     for c in data["configs"]], right=range(1, len(heads))), ""]
    parts += [f"- {c['family']}: {c['source']}" for c in data["configs"]] + [""]
    parts += ["### One decoder layer", "", markdown_table(TABLE_HEADERS, table_body(data),
                                                          right=range(2, len(TABLE_HEADERS))), ""]
    parts += [f"{line}\n" for line in summary_lines(data) + outside_lines(data)]
    return "\n".join(parts)


def dump_json(data: Dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str = "python -m kphi3_bench.model_ledger") -> argparse.ArgumentParser:
    """The model ledger's options: ``cli.build_model_ledger_parser``."""
    from .cli import build_model_ledger_parser

    return build_model_ledger_parser(prog)


def check_args(args: argparse.Namespace) -> List[int]:
    """The decode batches; a UsageError for anything that cannot be costed."""
    from .cli import UsageError, check_choices, positive_ints

    check_choices(_csv(args.families) or [""], tuple(CONFIGS), "family")
    batches = positive_ints(args.decode_batches, "--decode-batches")
    if args.tokens <= 0 or args.batch <= 0 or args.cache <= 0 or args.tokens % args.batch:
        raise UsageError("--M (tokens), --batch and --cache must be positive, and the tokens a "
                         "multiple of the batch")
    return batches


def main(argv: Optional[Sequence[str]] = None,
         prog: str = "python -m kphi3_bench.model_ledger") -> int:
    from .cli import UsageError, usage_error

    parser = build_parser(prog)
    args = parser.parse_args(argv)  # --help and argparse's own errors exit here, as always
    try:
        batches = check_args(args)
    except UsageError as err:
        return usage_error(parser, err)
    families = _csv(args.families)
    base = h200_model(args.launch_overhead_us)
    model = CostModel(args.peak_tflops or base.peak_tflops, args.peak_gbps or base.peak_gbps,
                      args.launch_overhead_us)
    data = build(families, args.tokens, args.batch, batches, args.cache, args.dtype, model,
                 args.io_forward)
    if not args.quiet:
        from .report import wrap_lines

        print(f"cost model: max(FLOPs / {model.peak_tflops:g} TFLOP/s, bytes / "
              f"{model.peak_gbps:g} GB/s) + {model.overhead_us:g} us per launch "
              "(a prediction, not a measurement)")
        print("\n".join(wrap_lines(summary_lines(data) + outside_lines(data))))
        print()
        print(format_table(data))
    if args.json:
        with open(args.json, "w") as f:
            f.write(dump_json(data))
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(data))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
