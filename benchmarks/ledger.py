"""The ledger: the predicted H200 time of every launch, op by op (the launch ledger) and for one
decoder layer (``--model``, dense Phi-3 against KPhi-3), with its budget, tables, JSON, markdown
and command line.

    python -m kphi3_bench.ledger                                  # the summary: per op, per layer
    python -m kphi3_bench.ledger --detail                         # ... then every row and launch
    python -m kphi3_bench.ledger --shapes kphi3 --M 8192 --dtype bf16
    python -m kphi3_bench.ledger --out ledger.json --markdown ledger.md
    python -m kphi3_bench.ledger --check-budget benchmarks/results/ledger-budget.json
    python -m kphi3_bench.ledger --triton-only --write-budget benchmarks/results/ledger-budget.json
    python -m kphi3_bench.ledger --model                          # kphi3 and phi3-mini, 8192 tokens
    python -m kphi3_bench.ledger --model --families kphi3 --M 4096 --batch 2 --out layer.json

``kphi3-bench ledger [--model]`` runs the same; so does ``python -m kphi3_bench.model_ledger``, the
former name of ``--model``.

Nothing is timed and nothing runs on a GPU: every number is arithmetic on what each launch reads,
writes and computes (``kphi3_bench.ledger_costs`` says what is counted and how; every name of it
is importable from here), **a prediction from FLOP and byte counts, not a measurement**. Each
launch has two costs: speed of light, ``max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s) + 2 us``
(``h200_model``), and realistic (``CostModel.realistic_us``: GEMM waves on 132 SMs, per-tile
overhead, gathered bytes at a derated bandwidth, flash attention at its published TFLOP/s); a
path costs the sum of its launches in each. Every output carries both; the JSON files record the
command that wrote them.

A row of the launch ledger (``LedgerRow``, ``build_ledger``) is one op, shape, M, mode and dtype
with its four paths (triton, reference, dense, floor). The model-level ledger (``build_model``)
is one decoder layer's training step and decode step per family, for the paths dense, reference,
triton and fused.

The budget (``--write-budget`` / ``--check-budget``, and ``tests/test_ledger.py``) holds the
Triton path's launches and bytes per row: a change that adds a launch or moves more bytes than
the committed budget fails until the budget is rewritten on purpose.

Python API: the costs (``triton_launches``, ``reference_launches``, ``dense_launches``,
``floor``, ``triton_launch_cost``, ``AtenRecorder``, ``train_layer``, ``decode_layer``,
``fused_launches``...), ``build_ledger``, ``budget_from_rows``, ``check_budget``,
``format_table``, ``markdown``, ``build_model``, ``format_layer_table``, ``layer_markdown``,
``measured_over_predicted``, ``main``; the realistic column's ``PROFILES``, ``cost_model`` and
factors (``TILE_OVERHEAD_STEPS``, ``GATHER_BANDWIDTH_FRACTION``, ``CUBLAS_BLOCK_K``,
``ATTENTION_TFLOPS``...).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .cli import LEDGER_DEFAULT_DTYPES as DEFAULT_DTYPES, LEDGER_DEFAULT_M as DEFAULT_M
from .cli import LEDGER_DEFAULT_SHAPES as DEFAULT_SHAPES, LEDGER_MODES, LEDGER_OPS as OPS
from .cli import MODEL_LEDGER_BATCH, MODEL_LEDGER_CACHE, MODEL_LEDGER_DECODE_BATCHES
from .cli import MODEL_LEDGER_FAMILIES, MODEL_LEDGER_TOKENS
from .ledger_costs import (  # noqa: F401  (re-exported: the ledger's one import for its callers)
    ATTENTION_TFLOPS, COMPONENTS, CONFIGS, CUBLAS_BLOCK_K, ELEMENT_SIZE,
    GATHER_BANDWIDTH_FRACTION, MAX_CTAS_PER_SM, PATHS, PROFILES, PROJECTIONS, REST,
    TILE_OVERHEAD_STEPS, CostModel, DeviceProfile, LaunchCost, LayerConfig, PathCost, Problem,
    activation, attention_tflops, aten_op_cost, cache_update, cost_model, decode_attention,
    profile_for,
    decode_layer, dense_launches, distinct_bytes, family_shapes, flash_attention, floor,
    fused_launches, h200_model, norm_heads_delta_us, outside_layer, path_costs, projection_launches,
    projections, record_aten, record_costs, reference_launches, residual_add, rest_of_layer,
    rms_norm, rope, train_layer, triton_launch_cost, triton_launches)

SCHEMA = "kphi3_bench.ledger/1"
MODEL_SCHEMA = "kphi3_bench.model_ledger/1"
BUDGET_SCHEMA = "kphi3_bench.ledger-budget/1"
DEFAULT_BUDGET = "benchmarks/results/ledger-budget.json"


def __getattr__(name: str):
    if name == "AtenRecorder":  # defined on first use: importing the ledger imports no torch
        from . import ledger_costs

        return ledger_costs.AtenRecorder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# The ledger
# ----------------------------------------------------------------------------------------------


@dataclass
class LedgerRow:
    op: str
    shape: Any   # shapes.Shape
    m: int
    mode: str
    dtype: str
    triton: PathCost
    floor: LaunchCost
    reference: Optional[PathCost] = None
    dense: Optional[PathCost] = None

    @property
    def key(self) -> str:
        return row_key(self.op, self.shape.name, self.m, self.mode, self.dtype)

    def times(self, model: CostModel) -> Dict[str, Optional[float]]:
        return {
            "triton": self.triton.time_us(model),
            "reference": self.reference.time_us(model) if self.reference else None,
            "dense": self.dense.time_us(model) if self.dense else None,
            "floor": model.time_us(self.floor.flops, self.floor.bytes),
        }

    def realistic_times(self, model: CostModel) -> Dict[str, Optional[float]]:
        """The realistic column of each path (the floor's is its speed of light: one ideal
        launch)."""
        return {
            "triton": self.triton.realistic_us(model),
            "reference": self.reference.realistic_us(model) if self.reference else None,
            "dense": self.dense.realistic_us(model) if self.dense else None,
            "floor": model.realistic_us(self.floor),
        }

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        t = self.times(model)
        real = self.realistic_times(model)

        def ratio(other, times=t):
            return None if times[other] is None else round(times["triton"] / times[other], 4)

        sh = self.shape
        return {
            "op": self.op, "shape": sh.name, "family": sh.family, "in": sh.in_features,
            "out": sh.out_features, "groups": sh.groups, "M": self.m, "mode": self.mode,
            "dtype": self.dtype,
            "triton": self.triton.to_dict(model),
            "reference": self.reference.to_dict(model) if self.reference else None,
            "dense": self.dense.to_dict(model) if self.dense else None,
            "floor": self.floor.to_dict(model),
            "triton_over_reference": ratio("reference"), "triton_over_dense": ratio("dense"),
            "triton_over_floor": ratio("floor"),
            "realistic_triton_over_reference": ratio("reference", real),
            "realistic_triton_over_dense": ratio("dense", real),
        }


def row_key(op: str, shape: str, m: int, mode: str, dtype: str) -> str:
    return f"{op} {shape} M={m} {mode} {dtype}"


def build_ledger(shapes: Sequence[Any], ms: Sequence[int], modes: Sequence[str] = LEDGER_MODES,
                 dtypes: Sequence[str] = DEFAULT_DTYPES, ops: Sequence[str] = OPS,
                 io_forward: str = "auto", baselines: bool = True,
                 on_row: Optional[Callable[[List["LedgerRow"]], None]] = None) -> List[LedgerRow]:
    """Every (op, shape, M, mode, dtype) row; ``baselines=False`` skips reference and dense.
    ``on_row`` is called with the rows so far after each one (``--out`` is rewritten)."""
    rows = []
    for op in ops:
        for sh in shapes:
            for m in ms:
                for mode in modes:
                    for dtype in dtypes:
                        p = Problem(op, sh, m, dtype)
                        rows.append(LedgerRow(
                            op, sh, m, mode, dtype, triton_launches(p, mode, io_forward),
                            floor(p, mode),
                            reference_launches(p, mode) if baselines else None,
                            dense_launches(p, mode) if baselines else None))
                        if on_row is not None:
                            on_row(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# The model-level ledger: one decoder layer per family
# ----------------------------------------------------------------------------------------------


def build_model(families: Sequence[str] = MODEL_LEDGER_FAMILIES, tokens: int = MODEL_LEDGER_TOKENS,
                batch: int = MODEL_LEDGER_BATCH,
                decode_batches: Sequence[int] = MODEL_LEDGER_DECODE_BATCHES,
                cache: int = MODEL_LEDGER_CACHE, dtype: str = "bf16",
                model: Optional[CostModel] = None, io_forward: str = "auto") -> Dict[str, Any]:
    """Everything ``--model`` prints and writes, as one JSON-ready dict."""
    model = model or h200_model()
    cfgs = [CONFIGS[f] for f in families]
    return {
        "schema": MODEL_SCHEMA, "tool": "python -m kphi3_bench.model_ledger",
        "model": model_dict(model, io_forward, "layer"),
        "configs": [c.to_dict() for c in cfgs],
        "train": [train_layer(c, tokens, batch, dtype, model, io_forward) for c in cfgs],
        "decode": [decode_layer(c, b, cache, dtype, model, io_forward)
                   for c in cfgs for b in decode_batches],
        "outside_layer": [outside_layer(c, tokens, dtype, model) for c in cfgs],
    }


# ----------------------------------------------------------------------------------------------
# Output: JSON, tables and markdown of both ledgers
# ----------------------------------------------------------------------------------------------

_TIME = ("speed of light (time_us): sum over launches of max(flops / peak_tflops, bytes / "
         "peak_gbps) + overhead; realistic (realistic_us): see realistic")
# What a ledger's JSON says its numbers are, per level (the op ledger's "op", --model's "layer").
_COUNTED = {
    "op": {
        "triton_flops": "first-choice config (configs[0]), tile padding included",
        "bytes": ("distinct tensors a launch reads or writes, each once; an accumulated output "
                  "(KernelLaunch.restore, the operand of an in-place aten op such as add_) read "
                  "and written; copy_ / fill_ / out= destinations written only"),
    },
    "layer": {
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
    },
}


def model_dict(model: CostModel, io_forward: str, level: str = "op") -> Dict[str, Any]:
    """The cost model and what is counted, as the ``model`` entry of a ledger's JSON."""
    return {"peak_tflops": model.peak_tflops, "peak_gbps": model.peak_gbps,
            "launch_overhead_us": model.overhead_us, "time": _TIME, **_COUNTED[level],
            "realistic": model.describe_realistic(), "io_forward": io_forward,
            "note": "a prediction from FLOP and byte counts, not a measurement"}


def to_json(rows: Sequence[LedgerRow], model: CostModel, io_forward: str) -> Dict[str, Any]:
    import torch
    import triton

    return {"schema": SCHEMA, "tool": "python -m kphi3_bench.ledger",
            "model": model_dict(model, io_forward),
            "versions": {"torch": torch.__version__, "triton": triton.__version__},
            "rows": [r.to_dict(model) for r in rows]}


def dump_json(data: Dict[str, Any]) -> str:
    """Indented JSON; a launch ledger's rows one to a line (small files, one diff line per row)."""
    if "rows" not in data:
        return json.dumps(data, indent=1) + "\n"
    head = {k: v for k, v in data.items() if k != "rows"}
    text = json.dumps(head, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in data["rows"])
    return text + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def _us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _ratio(a: float, b: Optional[float]) -> str:
    return "-" if not b else f"{a / b:.2f}"


def _text_table(headers: Sequence[str], body: List[List[str]], first_number: int) -> str:
    """A fixed-width text table: the columns before ``first_number`` left-aligned."""
    from .report import render

    return render(headers, body, right=range(first_number, len(headers)))


def _markdown_head(title: str, tool: str, intro: str) -> List[str]:
    return [f"## {title} (predicted)", "",
            f"<!-- generated by python -m {tool} --markdown; do not edit by hand -->", "", intro]


def cost_lines(model: CostModel) -> List[str]:
    """What both ledgers print first: the cost model, and that it predicts."""
    return [f"Cost model, speed of light: max(FLOPs / {model.peak_tflops:g} TFLOP/s, bytes / "
            f"{model.peak_gbps:g} GB/s) + {model.overhead_us:g} us per launch;",
            f"realistic ({model.profile.name}, {model.profile.sms} SMs): GEMM waves, "
            f"{TILE_OVERHEAD_STEPS:g} K-steps per tile, gathers at "
            f"{GATHER_BANDWIDTH_FRACTION:.0%}, {model.attention.upper()} attention:",
            "a prediction, not a measurement."]


# --- the launch ledger ------------------------------------------------------------------------

TABLE_HEADERS = ("op", "shape", "G", "M", "mode", "dtype", "triton launches", "triton MB",
                 "triton us", "reference launches", "reference us", "dense us", "floor us",
                 "triton/reference", "triton/dense", "triton/floor", "triton real us",
                 "reference real us", "dense real us", "real triton/dense")


def table_body(rows: Sequence[LedgerRow], model: CostModel) -> List[List[str]]:
    body = []
    for r in rows:
        t, real = r.times(model), r.realistic_times(model)
        body.append([
            r.op, r.shape.name, str(r.shape.groups), str(r.m), r.mode, r.dtype,
            str(r.triton.count), f"{r.triton.bytes / 1e6:.2f}", _us(t["triton"]),
            str(r.reference.count) if r.reference else "-", _us(t["reference"]), _us(t["dense"]),
            _us(t["floor"]), _ratio(t["triton"], t["reference"]), _ratio(t["triton"], t["dense"]),
            _ratio(t["triton"], t["floor"]), _us(real["triton"]), _us(real["reference"]),
            _us(real["dense"]), _ratio(real["triton"], real["dense"]),
        ])
    return body


def format_table(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """One line per row: op .. dtype left-aligned, numbers right."""
    return _text_table(TABLE_HEADERS, table_body(rows, model), 6)


MARKDOWN_INTRO = """\
Predicted with `python -m kphi3_bench.ledger` on an H200 cost model: **a prediction from FLOP and
byte counts, not a measurement.** Two columns per launch; a path costs the sum of its launches.

- **speed of light** (`us`): `max(FLOPs / {tflops:g} TFLOP/s, bytes / {gbps:g} GB/s) +
  {overhead:g} us`.
- **realistic** (`real us`, profile {profile}, {sms} SMs): the same ceilings, with a Triton
  GEMM's programs (first-choice config) in waves of `SMs x CTAs per SM` (2 where two
  pipelines fit 227 KiB of shared memory, else 1), each tile's K loop plus {tile:g} K-steps of
  prologue and epilogue; cuBLAS GEMMs (reference, dense) with no wave loss and the same
  per-tile overhead on K / {cublas_k}; bytes read by a gather at {gather:.0%} of the copy
  bandwidth. docs/performance.md gives each factor's source.

- **triton**: the launches of `kphi3_kernels.ops.triton_impl` (IO forward design `{io}`),
  recorded through `ops.launch.RECORDER` on meta tensors, never run. FLOPs are those of the
  first-choice tile config, padding included; bytes are the distinct tensors each launch reads
  or writes.
- **reference**: `kphi3_kernels.reference` (the original's einsum chain) as an aten graph on meta
  tensors: every data-moving aten op is a launch, views are free.
- **dense**: `F.linear(x, W)` of the same in/out, recorded the same way (none for the interleave).
- **floor**: one launch with the op's true FLOPs that reads every input and writes every output
  once.
- **bwd** is the backward alone (every input and weight gradient, given dy). Ratios are
  triton time over the other path's time (below 1: the Triton path is predicted faster).

A kernel can only be slower than its speed-of-light line: that model ignores L2 re-reads, load
widths, occupancy and wave tails. The realistic line adds the wave tails, the tile overheads and
the gathers, not L2 or load widths; a GPU run's measured / predicted calibrates both.
"""


def _summary(rows: Sequence[LedgerRow], model: CostModel, dtype: str) -> Optional[str]:
    """gpc_io (the block the model runs) at the largest M: forward and backward side by side."""
    from .report import markdown_table

    io = [r for r in rows if r.op == "gpc_io" and r.dtype == dtype]
    if not io:
        return None
    m = max(r.m for r in io)
    by = {(r.shape.name, r.mode): r for r in io if r.m == m}
    body = []
    for name in dict.fromkeys(r.shape.name for r in io):
        cells = [name, ""]
        for mode in LEDGER_MODES:
            r = by.get((name, mode))
            if r is None:
                cells += ["-"] * 6
                continue
            cells[1] = str(r.shape.groups)
            t, real = r.times(model), r.realistic_times(model)
            cells += [_us(t["triton"]), _us(t["reference"]), _us(t["dense"]), _us(t["floor"]),
                      _us(real["triton"]), _us(real["dense"])]
        body.append(cells)
    headers = ["shape", "G"] + [f"{mode} {path}" for mode in LEDGER_MODES
                                for path in ("triton us", "reference us", "dense us", "floor us",
                                             "triton real us", "dense real us")]
    return (f"### gpc_io at M = {m} ({dtype})\n\n"
            + markdown_table(headers, body, right=range(1, len(headers))) + "\n"
            + "".join(f"\n{line}\n" for line in layer_totals(io, model, m)))


def layer_totals(rows: Sequence[LedgerRow], model: CostModel, m: int) -> List[str]:
    """Per family, its projections' fwd + bwd summed (one decoder layer's grouped layers) for
    each path, and the Triton path's ratio to the others: one line each."""
    lines = []
    for family in dict.fromkeys(r.shape.family for r in rows):
        chosen = [r for r in rows if r.shape.family == family and r.m == m]
        if {r.mode for r in chosen} != set(LEDGER_MODES):
            continue
        sums = {path: sum(r.times(model)[path] or 0.0 for r in chosen)
                for path in ("triton", "reference", "dense", "floor")}
        real = {path: sum(r.realistic_times(model)[path] or 0.0 for r in chosen)
                for path in ("triton", "reference", "dense")}
        lines.append(
            f"{family}, its {len(chosen) // len(LEDGER_MODES)} projections' fwd + bwd: triton "
            f"{_us(sums['triton'])} us, reference {_us(sums['reference'])} us "
            f"({_ratio(sums['triton'], sums['reference'])}x), dense {_us(sums['dense'])} us "
            f"({_ratio(sums['triton'], sums['dense'])}x), floor {_us(sums['floor'])} us; "
            f"realistic: triton {_us(real['triton'])} us, reference {_us(real['reference'])} us "
            f"({_ratio(real['triton'], real['reference'])}x), dense {_us(real['dense'])} us "
            f"({_ratio(real['triton'], real['dense'])}x).")
    return lines


def markdown(rows: Sequence[LedgerRow], model: CostModel, io_forward: str,
             dtypes: Sequence[str] = ("bf16",), command: Optional[str] = None) -> str:
    """The generated section: the model in a few lines, a gpc_io summary at the largest M, then
    one table per op (rows of ``dtypes``)."""
    from .report import markdown_table

    parts = _markdown_head("Launch ledger", "kphi3_bench.ledger", MARKDOWN_INTRO.format(
        tflops=model.peak_tflops, gbps=model.peak_gbps, overhead=model.overhead_us, io=io_forward,
        profile=model.profile.name, sms=model.profile.sms, tile=TILE_OVERHEAD_STEPS,
        cublas_k=CUBLAS_BLOCK_K, gather=GATHER_BANDWIDTH_FRACTION))
    if command:
        parts += ["", f"Command: `{command}`", ""]
    for dtype in dtypes:
        summary = _summary(rows, model, dtype)
        if summary:
            parts.append(summary)
    # One table per op: its name is the heading, the dtype too.
    keep = [1, 2, 3, 4] + list(range(6, len(TABLE_HEADERS)))
    headers = [TABLE_HEADERS[i] for i in keep]
    right = [1, 2] + list(range(4, len(headers)))
    for op in OPS:
        chosen = [r for r in rows if r.op == op and r.dtype in dtypes]
        if not chosen:
            continue
        body = [[b[i] for i in keep] for b in table_body(chosen, model)]
        parts += [f"### {op} ({', '.join(dtypes)})", "", markdown_table(headers, body, right), ""]
    return "\n".join(parts)


# --- the model-level ledger -------------------------------------------------------------------

LAYER_TABLE_HEADERS = ("family", "task", "tokens", "path", "launches", "total us", "tokens/s",
                       "projections us", "attention us", "norms us", "rope us", "activation us",
                       "residuals us", "/dense", "/reference", "real us", "real tokens/s",
                       "real projections us", "real attention us", "real /dense",
                       "real FA3 us", "real FA3 /dense")


def layer_table_body(data: Dict[str, Any]) -> List[List[str]]:
    body = []
    for row in data["train"] + data["decode"]:
        task = ("train fwd+bwd" if row["task"] == "train"
                else f"decode b={row['batch']} S={row['cache']}")
        t = {name: p["time_us"] for name, p in row["paths"].items()}
        real = {name: p["realistic_us"] for name, p in row["paths"].items()}
        fa3 = {name: p["realistic_fa3_us"] for name, p in row["paths"].items()}
        for path in PATHS:
            p = row["paths"][path]
            c = p["components"]
            body.append([row["family"], task, str(row["tokens"]), path, str(p["launches"]),
                         _us(p["time_us"]), f"{p['tokens_per_s']:,.0f}"]
                        + [_us(c[name]["time_us"]) for name in COMPONENTS]
                        + [_ratio(p["time_us"], t["dense"]), _ratio(p["time_us"], t["reference"]),
                           _us(p["realistic_us"]), f"{p['realistic_tokens_per_s']:,.0f}",
                           _us(c["projections"]["realistic_us"]),
                           _us(c["attention"]["realistic_us"]),
                           _ratio(p["realistic_us"], real["dense"]),
                           _us(p["realistic_fa3_us"]), _ratio(p["realistic_fa3_us"], fa3["dense"])])
    return body


def format_layer_table(data: Dict[str, Any]) -> str:
    return _text_table(LAYER_TABLE_HEADERS, layer_table_body(data), 2)


def layer_summary_lines(data: Dict[str, Any]) -> List[str]:
    """Per family: the layer's training step on every path, then what lies outside the layer."""
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
            f"{r['fused_over_reference']:.2f} ({1 / r['fused_over_reference']:.2f}x) (predicted, "
            "speed of light).")
        for key, what in (("realistic", "realistic, FA2 attention"),
                          ("realistic_fa3", "realistic, FA3 attention")):
            q = row[f"{key}_ratios"]
            lines.append(
                f"{row['family']}, the same step, {what}: dense "
                f"{_us(p['dense'][f'{key}_us'])} us, triton {_us(p['triton'][f'{key}_us'])} us "
                f"({1 / q['triton_over_dense']:.2f}x dense's tokens/s), fused "
                f"{_us(p['fused'][f'{key}_us'])} us ({1 / q['fused_over_dense']:.2f}x), "
                f"reference {_us(p['reference'][f'{key}_us'])} us (predicted).")
        delta = row.get("layout_norm_heads_delta_us")
        if delta is not None:
            lines.append(
                f"{row['family']}, fused path: norm heads on the block-residue layout instead of "
                f"split heads would {'add' if delta >= 0 else 'save'} {_us(abs(delta))} us per "
                f"layer at {row['tokens']} tokens (predicted).")
    for o in data["outside_layer"]:
        lines.append(f"{o['family']} at {o['tokens']} tokens, outside the layer (every path): "
                     f"embedding fwd+bwd {_us(o['embedding']['time_us'])} us, lm_head fwd+bwd "
                     f"{_us(o['lm_head']['time_us'])} us.")
    return lines


LAYER_MARKDOWN_INTRO = """\
Predicted with `python -m kphi3_bench.model_ledger` on the H200 cost model of
`kphi3_bench.ledger`: **a prediction from FLOP and byte counts, not a measurement.** Two columns;
a layer costs the sum of its launches in each:

- **speed of light** (`total us`): each launch `max(FLOPs / {tflops:g} TFLOP/s, bytes /
  {gbps:g} GB/s) + {overhead:g} us`.
- **realistic** (`real us`, profile {profile}, {sms} SMs): Triton GEMMs in waves of their
  first-choice config's programs, {tile:g} K-steps of prologue and epilogue per tile, cuBLAS
  GEMMs (dense, reference) with no wave loss and the same per-tile overhead, gathered bytes at
  {gather:.0%} of the copy bandwidth, causal flash attention at FlashAttention-2's published
  TFLOP/s for its head dim (`real FA3`: FlashAttention-3's), for every path alike.
  docs/performance.md gives each factor's source.

- One decoder layer, training step = forward + backward (every input and weight gradient), at
  {tokens} tokens (batch {batch} x {seq}), {dtype}. Decode: the forward of one new token per
  sequence against a static KV cache.
- **dense** (Phi-3: the four projections as `F.linear`), **reference** (KPhi-3 with
  `kphi3_kernels.reference.gpc_io`, an aten recording), **triton** (KPhi-3 with the op-level
  Triton kernels, `ledger.triton_launches`, IO forward design `{io}`) differ only in the
  projections. **fused** (`KPhi3Config(fused_decoder=True)`) is triton with the MLP's tail
  fused: `silu(gate) * up` writes down_proj's input in the block-residue layout, down_proj's
  GEMMs read it, and its input gradient turns into d(gate_up) in its epilogue, so the
  activation's backward has no launch (`ops/triton_fused.py`); each RMSNorm writes its IO block's
  input (`ops/triton_fused.py`): in the layout where it adds no padding, else in channel order
  and its de-interleaved copy (at these widths: G*R = 280 for s = 256 would be more matrix
  work than the pass it saves); the attention's residual add runs in gate_up_proj's norm
  head, whose backward sums the branch point's gradients in its pass, and the MLP's in
  down_proj's epilogue. Its norms and adds are the launches it records.
- Attention is causal flash attention with FA2's accounting: forward `2*B*H*T^2*D` FLOPs
  (`4*B*H*T^2*D` halved by the mask), reading q, k, v and writing o and the fp32 logsumexp;
  backward 2.5x the forward's FLOPs in three launches (preprocess, main kernel with an fp32 dq
  accumulator, dq conversion). Decode attention is one read of the KV cache (`4*b*H*S*D`
  FLOPs) plus the cache update. The speed-of-light ceiling is the GEMM peak, which flash
  attention does not reach in practice; the realistic column charges the published figures.
- The rest (two RMSNorms, RoPE of q and k, `silu(gate) * up`, two residual adds) is costed by
  explicit formulas: one fused launch each that reads and writes every tensor once, 0 FLOPs
  (the fused path: RoPE and the layer input's branch-point add).
  Dropout (0) and the RoPE table (built once per model) cost nothing.
- Ratios are a path's time over dense's or reference's (below 1: predicted faster).
"""


def layer_markdown(data: Dict[str, Any]) -> str:
    from .report import markdown_table

    train = data["train"][0] if data["train"] else {"tokens": "-", "batch": "-", "seq": "-",
                                                    "dtype": "-"}
    m = data["model"]
    parts = _markdown_head("Model-level ledger", "kphi3_bench.model_ledger",
                           LAYER_MARKDOWN_INTRO.format(
                               profile=m["realistic"]["profile"], sms=m["realistic"]["sms"],
                               tile=m["realistic"]["tile_overhead_steps"],
                               gather=m["realistic"]["gather_bandwidth_fraction"],
                               tflops=m["peak_tflops"], gbps=m["peak_gbps"],
                               overhead=m["launch_overhead_us"], tokens=train["tokens"],
                               batch=train["batch"], seq=train["seq"], dtype=train["dtype"],
                               io=m["io_forward"]))
    if data.get("command"):
        parts += ["", f"Command: `{data['command']}`", ""]
    parts += ["### Configurations", ""]
    heads = ["family", "hidden", "intermediate", "heads", "kv heads", "head_dim", "vocab", "min"]
    parts += [markdown_table(heads, [[c["family"], str(c["hidden"]), str(c["intermediate"]),
                                      str(c["heads"]), str(c["kv_heads"]), str(c["head_dim"]),
                                      str(c["vocab"]), str(c["min_channels_per_group"])]
                                     for c in data["configs"]], right=range(1, len(heads))), ""]
    parts += [f"- {c['family']}: {c['source']}" for c in data["configs"]] + [""]
    parts += ["### One decoder layer", "",
              markdown_table(LAYER_TABLE_HEADERS, layer_table_body(data),
                             right=range(2, len(LAYER_TABLE_HEADERS))), ""]
    parts += [f"{line}\n" for line in layer_summary_lines(data)]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------------------------


def budget_command(grid: Dict[str, Any], path: str, io_forward: str = "auto") -> str:
    """The command that rewrites a budget file of ``grid`` (the grid spelled out)."""
    parts = ["python -m kphi3_bench.ledger --triton-only"]
    for flag, key in (("--shapes", "shapes"), ("--ops", "ops"), ("--m", "m"),
                      ("--modes", "modes"), ("--dtypes", "dtypes")):
        parts.append(f"{flag} {','.join(map(str, grid[key]))}")
    if io_forward != "auto":
        parts.append(f"--io-forward {io_forward}")
    parts.append(f"--write-budget {path}")
    return " ".join(parts)


def _grid_of(rows: Sequence[LedgerRow]) -> Dict[str, List[Any]]:
    return {
        "shapes": list(dict.fromkeys(r.shape.name for r in rows)),
        "ops": sorted({r.op for r in rows}, key=OPS.index),
        "m": sorted({r.m for r in rows}),
        "modes": sorted({r.mode for r in rows}, key=LEDGER_MODES.index),
        "dtypes": list(dict.fromkeys(r.dtype for r in rows)),
    }


def budget_from_rows(rows: Sequence[LedgerRow], io_forward: str,
                     path: str = DEFAULT_BUDGET) -> Dict[str, Any]:
    """The Triton path's launches and bytes of every row, as a budget file's content."""
    grid = _grid_of(rows)
    return {
        "schema": BUDGET_SCHEMA,
        "note": ("the Triton path's launches and bytes per row, counted by "
                 "python -m kphi3_bench.ledger (nothing run); tests/test_ledger.py fails when a "
                 "row makes more launches or moves more bytes. Rewrite it on purpose with the "
                 "command below."),
        "command": budget_command(grid, path, io_forward),
        "io_forward": io_forward,
        "grid": grid,
        "rows": {r.key: {"launches": r.triton.count, "bytes": r.triton.bytes} for r in rows},
    }


def check_budget(rows: Sequence[LedgerRow], budget: Dict[str, Any],
                 budget_path: str = DEFAULT_BUDGET) -> List[str]:
    """What is over budget (or has no budget), one message per problem; empty when all is in."""
    grid = budget.get("grid") or _grid_of(rows)
    fix = ("if this is intended, rewrite the budget: "
           + budget_command(grid, budget_path, budget.get("io_forward", "auto")))
    limits = budget.get("rows", {})
    problems = []
    for r in rows:
        limit = limits.get(r.key)
        if limit is None:
            problems.append(f"{r.key}: no budget in {budget_path} (counted {r.triton.count} "
                            f"launches, {r.triton.bytes:,} bytes); {fix}")
            continue
        if r.triton.count > limit["launches"]:
            names = ", ".join(l.name for l in r.triton.launches)
            problems.append(f"{r.key}: the Triton path makes {r.triton.count} launches ({names}), "
                            f"over its budget of {limit['launches']} in {budget_path}; {fix}")
        if r.triton.bytes > limit["bytes"]:
            problems.append(f"{r.key}: the Triton path moves {r.triton.bytes:,} bytes, over its "
                            f"budget of {limit['bytes']:,} bytes in {budget_path}; {fix}")
    return problems


def budget_grid(budget: Dict[str, Any]):
    """The (shapes, M, modes, dtypes, ops) a budget file covers, as ``build_ledger`` arguments."""
    from .shapes import resolve_shapes

    g = budget["grid"]
    return dict(shapes=resolve_shapes(g["shapes"]), ms=g["m"], modes=g["modes"],
                dtypes=g["dtypes"], ops=g["ops"])


# ----------------------------------------------------------------------------------------------
# What is printed: a summary first (per op and for the layer), every row and launch on request
# ----------------------------------------------------------------------------------------------


def _signature(row: LedgerRow, model: CostModel) -> tuple:
    """What a row predicts: equal signatures print once (bf16 and fp16 are the same numbers)."""
    t = row.times(model)
    return (row.triton.count, row.triton.bytes, tuple(round(v or 0.0, 6) for v in t.values()))


def dedupe(rows: Sequence[LedgerRow], model: CostModel) -> List[tuple]:
    """(dtype label, row) once per op, shape, M and mode whose dtypes predict the same: the label
    joins those dtypes (``bf16/fp16``)."""
    groups: Dict[tuple, List[LedgerRow]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape.name, r.m, r.mode), []).append(r)
    out = []
    for same_point in groups.values():
        by_signature: Dict[tuple, List[LedgerRow]] = {}
        for r in same_point:
            by_signature.setdefault(_signature(r, model), []).append(r)
        for equal in by_signature.values():
            out.append(("/".join(r.dtype for r in equal), equal[0]))
    return out


# "real": the Triton path's realistic column; "real/dense": over dense's realistic column.
SUMMARY_HEADERS = ("family", "M", "op", "dtype", "triton", "reference", "dense", "floor", "/dense",
                   "/floor", "real", "real/dense")


def summary_body(rows: Sequence[LedgerRow], model: CostModel) -> List[List[str]]:
    """Per family, M, op and dtype: the family's projections summed, forward + backward (what
    one decoder layer's grouped layers cost), for each path and the floor (speed of light), then
    the Triton path's realistic column and its ratio to dense's."""
    sums: Dict[tuple, Dict[str, float]] = {}
    for label, r in dedupe(rows, model):
        key = (r.shape.family, r.m, r.op, label)
        total = sums.setdefault(key, {"triton": 0.0, "reference": 0.0, "dense": 0.0,
                                      "floor": 0.0, "triton real": 0.0, "dense real": 0.0})
        real = r.realistic_times(model)
        values = dict(r.times(model), **{"triton real": real["triton"],
                                         "dense real": real["dense"]})
        for path, value in values.items():
            total[path] = None if value is None or total[path] is None else total[path] + value
    body = []
    for (family, m, op, label), t in sums.items():
        body.append([family, str(m), op, label, _us(t["triton"]), _us(t["reference"] or None),
                     _us(t["dense"] or None), _us(t["floor"]),
                     _ratio(t["triton"], t["dense"]), _ratio(t["triton"], t["floor"]),
                     _us(t["triton real"]), _ratio(t["triton real"], t["dense real"])])
    return body


def summary_text(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """The summary printed first: every op per family and M, then the layer's lines."""
    from .report import render, wrap_lines

    body = sorted(summary_body(rows, model), key=lambda b: (b[0], int(b[1]), OPS.index(b[2])))
    headers = list(SUMMARY_HEADERS)
    labels = {b[3] for b in body}
    one_label = len(labels) == 1
    if one_label:  # every dtype predicts the same: say so once, not on every line
        body = [b[:3] + b[4:] for b in body]
        del headers[3]
    lines = wrap_lines([
        "Predicted H200 time in us per family, M and op, the family's four projections summed, "
        "forward + backward: speed of light per path, the Triton path's over dense's and the "
        "floor's, then its realistic column ('real') and that over dense's realistic"
        + (f" ({labels.pop()}: the same prediction)" if one_label
           else " (dtypes that predict the same share a line)") + ":"])
    lines.append(render(headers, body, right=range(3 if one_label else 4, len(headers))))
    io = [r for label, r in dedupe(rows, model) if r.op == "gpc_io"]
    layer = layer_totals(io, model, max(r.m for r in io)) if io else []
    if layer:  # it needs both modes
        lines += ["", "One decoder layer (gpc_io, the block the model runs) at the largest M:"]
        lines += wrap_lines(layer)
    return "\n".join(lines)


def detail_text(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """Every row (equal dtypes once), then every launch of each row's Triton path."""
    from .report import render

    shown = dedupe(rows, model)
    body = table_body([r for _, r in shown], model)
    for cells, (label, _) in zip(body, shown):
        cells[5] = label
    lines = ["Every row:", render(TABLE_HEADERS, body, right=range(6, len(TABLE_HEADERS))), "",
             "Every launch of the Triton path (MB moved, predicted us: speed of light / "
             "realistic; a GEMM's programs with its first-choice config):"]
    for label, r in shown:
        lines.append(row_key(r.op, r.shape.name, r.m, r.mode, label))
        for launch in r.triton.launches:
            config = f" [{launch.config}]" if launch.config else ""
            programs = (f", {launch.programs} programs ({launch.ctas_per_sm} per SM)"
                        if launch.kind == "tile" else "")
            gathered = (f", {launch.gathered_bytes / 1e6:.2f} MB gathered"
                        if launch.gathered_bytes else "")
            lines.append(f"  {launch.name}: {launch.bytes / 1e6:.2f} MB{gathered}, "
                         f"{_us(model.time_us(launch.flops, launch.bytes))} / "
                         f"{_us(model.realistic_us(launch))} us{programs}{config}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (``kphi3-bench ledger [--model]``; the parsers are cli.py's)
# ----------------------------------------------------------------------------------------------

WRITE_INTERVAL_S = 1.0  # the --out file is rewritten at most this often while rows are counted


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class ThrottledWriter:
    """Rewrites ``path`` with the rows so far at most once a second (and always at the end), so
    that an interrupted run keeps what it counted without rewriting the file per row."""

    def __init__(self, path: str, model: CostModel, io_forward: str,
                 interval_s: Optional[float] = None, command: Optional[str] = None):
        self.path, self.model, self.io_forward, self.command = path, model, io_forward, command
        self.interval_s = WRITE_INTERVAL_S if interval_s is None else interval_s
        self.last = 0.0

    def text(self, rows: Sequence[LedgerRow], complete: bool) -> str:
        data = to_json(rows, self.model, self.io_forward)
        if self.command:
            data["command"] = self.command
        data["complete"] = complete
        return dump_json(data)

    def __call__(self, rows: Sequence[LedgerRow], force: bool = False) -> None:
        import time

        from .report import write_text

        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            write_text(self.path, self.text(rows, force))
            self.last = now


def _write_outputs(args: argparse.Namespace, json_text: Callable[[], str],
                   markdown_text: Callable[[], str]) -> None:
    from .report import write_text

    for path, text in ((args.json, json_text), (args.markdown, markdown_text)):
        if path:
            write_text(path, text())
            print(f"wrote {path}")


def build_parser(prog: str = "python -m kphi3_bench.ledger",
                 model: bool = False) -> argparse.ArgumentParser:
    """The options of the launch ledger, or of the model-level ledger with ``model``."""
    from .cli import build_ledger_parser, build_model_ledger_parser

    return (build_model_ledger_parser if model else build_ledger_parser)(prog)


def _cost_model(args: argparse.Namespace) -> CostModel:
    base = h200_model(args.launch_overhead_us)
    return CostModel(args.peak_tflops or base.peak_tflops, args.peak_gbps or base.peak_gbps,
                     args.launch_overhead_us)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m kphi3_bench.ledger",
         model: bool = False) -> int:
    """Both ledgers' command line: the launch ledger, or with ``--model`` (or ``model=True``) the
    model-level ledger. 0 when done, 1 when over budget, 2 for bad arguments, 130 interrupted."""
    from .cli import UsageError, check_ledger_args, check_model_ledger_args, usage_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:
        argv.remove("--model")
        model, prog = True, f"{prog} --model"
    parser = build_parser(prog, model)
    args = parser.parse_args(argv)  # --help and argparse's own errors exit here, as always
    try:  # every check before torch and the kernels are imported
        if model:
            batches = check_model_ledger_args(args)
        else:
            ms = check_ledger_args(args)
            from . import shapes as shape_table

            chosen = shape_table.resolve_shapes(_csv(args.shapes))
    except (UsageError, ValueError) as err:
        return usage_error(parser, err)
    costs = _cost_model(args)
    command = " ".join([prog] + argv)
    if model:
        data = build_model(_csv(args.families), args.tokens, args.batch, batches, args.cache,
                           args.dtype, costs, args.io_forward)
        data["command"] = command
        if not args.quiet:
            from .report import wrap_lines

            print("\n".join(cost_lines(costs) + wrap_lines(layer_summary_lines(data))))
            print()
            print(format_layer_table(data))
        _write_outputs(args, lambda: dump_json(data), lambda: layer_markdown(data))
        return 0

    status = 0
    if args.check_budget:
        with open(args.check_budget) as f:
            budget = json.load(f)
        rows = build_ledger(**budget_grid(budget), io_forward=budget.get("io_forward", "auto"),
                            baselines=False)
        problems = check_budget(rows, budget, args.check_budget)
        for msg in problems:
            print(f"over budget: {msg}", file=sys.stderr)
        print(f"budget {args.check_budget}: {len(rows)} rows, {len(problems)} over budget")
        status = 1 if problems else 0
        if not (args.json or args.markdown or args.write_budget):
            return status

    writer = ThrottledWriter(args.json, costs, args.io_forward, command=command) \
        if args.json else None
    try:
        rows = build_ledger(chosen, ms, _csv(args.modes), _csv(args.dtypes), _csv(args.ops),
                            args.io_forward, baselines=not args.triton_only, on_row=writer)
    except KeyboardInterrupt:
        kept = f"; the rows counted so far are in {args.json}" if writer else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    dtypes = _csv(args.dtypes)
    if not args.quiet:
        *head, predicts = cost_lines(costs)
        print("\n".join(head))
        print(f"{predicts} {len(rows)} rows ({', '.join(dtypes)}); --detail prints each, "
              "launch by launch.")
        print(summary_text(rows, costs))
        if args.detail:
            print()
            print(detail_text(rows, costs))
    shown = ["bf16"] if "bf16" in dtypes else dtypes[:1]
    _write_outputs(args, lambda: writer.text(rows, True),
                   lambda: markdown(rows, costs, args.io_forward, shown, command))
    if args.write_budget:
        from .report import write_text

        budget = budget_from_rows(rows, args.io_forward, args.write_budget)
        write_text(args.write_budget, json.dumps(budget, indent=1, sort_keys=False) + "\n")
        print(f"wrote {args.write_budget} ({len(rows)} rows)")
    return status


# ----------------------------------------------------------------------------------------------
# Measured against predicted (gpu_check)
# ----------------------------------------------------------------------------------------------

# The sweep's providers that the ledger models, and the ledger's path for each.
PROVIDER_PATHS = {"triton": "triton", "reference": "reference", "nn.Linear": "dense"}


def measured_over_predicted(rows: Sequence[Any], model: Optional[CostModel] = None
                            ) -> List[Dict[str, Any]]:
    """Each timed sweep row (``report.Row``) of a provider the ledger models, its measured median
    beside the ledger's prediction for the same op, shape, M, mode and dtype (``fwd+bwd`` is the
    sum of the two), in both columns: ``predicted_us`` / ``measured_over_predicted`` (speed of
    light) and ``realistic_us`` / ``measured_over_realistic``. The ratios are what a GPU run
    calibrates the model with."""
    from . import shapes as shape_table

    model = model or h200_model()
    cache: Dict[tuple, tuple] = {}
    out = []
    for r in rows:
        path = PROVIDER_PATHS.get(r.provider)
        if path is None or r.median_ms is None:
            continue
        # The sweep times the IO block (its ``op`` names the projection); a shape outside the
        # table (gpu_check's dry-run shapes) is rebuilt from the row, min = in / G giving G.
        shape = shape_table.SHAPES.get(r.shape) or shape_table.Shape(
            r.shape, r.family, r.op, r.in_features, r.out_features, r.in_features // r.groups)
        predicted, realistic = 0.0, 0.0
        for mode in (LEDGER_MODES if r.mode == "fwd+bwd" else (r.mode,)):
            key = (r.shape, r.M, mode, r.dtype)
            if key not in cache:
                (row,) = build_ledger([shape], [r.M], [mode], [r.dtype], ["gpc_io"])
                cache[key] = (row.times(model), row.realistic_times(model))
            t, real = cache[key][0][path], cache[key][1][path]
            predicted = None if t is None or predicted is None else predicted + t
            realistic = None if real is None or realistic is None else realistic + real
        if predicted is None or realistic is None:
            continue
        measured_us = r.median_ms * 1e3
        out.append({"provider": r.provider, "op": "gpc_io", "shape": r.shape, "M": r.M,
                    "mode": r.mode, "dtype": r.dtype, "measured_us": round(measured_us, 3),
                    "predicted_us": round(predicted, 3),
                    "measured_over_predicted": round(measured_us / predicted, 3),
                    "realistic_us": round(realistic, 3),
                    "measured_over_realistic": round(measured_us / realistic, 3)})
    return out


def format_measured(pairs: Sequence[Dict[str, Any]]) -> str:
    from .report import render

    head = ["provider", "shape", "M", "mode", "dtype", "measured us", "predicted us",
            "measured/predicted", "realistic us", "measured/realistic"]
    body = [[p["provider"], p["shape"], str(p["M"]), p["mode"], p["dtype"],
             _us(p["measured_us"]), _us(p["predicted_us"]),
             f"{p['measured_over_predicted']:.2f}", _us(p.get("realistic_us")),
             f"{p['measured_over_realistic']:.2f}" if "measured_over_realistic" in p else "-"]
            for p in pairs]
    return render(head, body, right=range(5, len(head)))


if __name__ == "__main__":
    sys.exit(main())
