"""What every launch of the ledger costs, op by op and for a whole decoder layer: the cost model,
the launches of each path and the formulas. ``kphi3_bench.ledger`` (which re-exports every name
here) builds its rows, budget, tables and command line from them.

Nothing is timed and nothing runs on a GPU: every number is arithmetic on what each launch reads,
writes and computes, so the ledger is the same on any machine.

**An op** (``grouped_linear``, ``gpc_io``, ``gpc_block``, ``interleave``) at a shape, M, mode and
dtype (``Problem``) has four costs:

* **triton**: the launches of ``kphi3_kernels.ops.triton_impl``. The launchers are called on
  ``meta`` tensors (shapes and strides, no memory) with ``ops.launch.RECORDER`` set, so each
  ``KernelLaunch`` is seen and none is run. A launch's FLOPs are those its first-choice config
  (``configs[0]``) issues, tile padding included: ``2 * programs * BLOCK_P * BLOCK_Q * BLOCK_K *
  (cdiv(K, BLOCK_K) + cdiv(K2, BLOCK_K))`` for the grouped GEMM, 0 for the interleave (a pure
  data-movement kernel). Its bytes are the sizes of the distinct tensors among its arguments
  (a tensor passed twice, e.g. as an unused bias placeholder, counts once; an output the kernel
  accumulates into, named in ``KernelLaunch.restore``, counts twice: read and write).
* **reference**: ``kphi3_kernels.reference`` (the original's einsum chain), recorded as an aten
  graph on ``meta`` tensors with a ``TorchDispatchMode``. Every aten op that moves data is a
  launch (copies, clones, ``bmm``, ``add``...); views and other metadata-only ops (``view``,
  ``permute``, ``t``, ``_unsafe_view``...) and bare allocations are skipped. FLOPs come from
  ``torch.utils.flop_counter``'s formulas, bytes are the op's distinct tensor inputs plus its
  outputs (the operand of an in-place op such as ``add_`` is read and written; the destination
  of ``copy_``, ``fill_`` or an ``out=`` variant is written only).
* **dense**: ``F.linear(x, W)`` of the same in/out (what a user would run instead), recorded the
  same way. The interleave has no dense counterpart.
* **floor**: one launch that does the op's true FLOPs (``2 * M * in * out / G`` per grouped
  GEMM, twice that backward) and moves the least bytes: forward reads x and the weights and
  writes y; backward reads dy, x and the weights and writes dx and the weight gradients.

``bwd`` is the backward alone, given the upstream gradient: every input gradient and every weight
gradient (no bias). Each launch costs ``max(FLOPs / peak FLOP/s, bytes / peak bytes/s) +
overhead``; an op costs the sum of its launches. The defaults are the H200 ceilings of
``kphi3_bench.roofline`` (790 TFLOP/s bf16, 4.3 TB/s copy; fp16 assumed the same) and 2 us per
launch. These are predictions, not measurements: a kernel can only be slower than its ledger line
(it ignores L2 re-reads, load widths, occupancy and tails), so the ledger says what a design can
at best achieve and where its bytes go, not how fast it runs.

**The realistic column** (``CostModel.realistic_us``) sits beside that speed-of-light one, on the
same ceilings and a ``DeviceProfile`` (``PROFILES``: H100 80GB SXM and H200, 132 SMs each; a GPU
run's measured ceilings replace the profile's defaults). Per launch, ``max(compute, memory) +
overhead`` with:

* **waves**: a Triton GEMM's programs (its grid with ``configs[0]``) run in waves of ``SMs x
  ctas_per_sm`` (2 where two pipelines fit 227 KiB of shared memory, else 1); a program takes
  its K loop plus ``TILE_OVERHEAD_STEPS`` K-steps, at ``peak / SMs`` per SM
  (``CostModel.realistic_compute_s`` gives the formula);
* **gathers**: the bytes a launch reads by a gather (``_gathered_args``: the dx launches' ``dxi``,
  the fused IO forward's strided ``x``, the activation's and the norm heads' gathered reads) at
  ``GATHER_BANDWIDTH_FRACTION`` of the copy bandwidth;
* **cuBLAS** (the dense and reference paths' aten matmuls): no wave loss, the same per-tile
  overhead on ``ceil(K / CUBLAS_BLOCK_K)`` steps;
* **attention**: causal flash attention at the published TFLOP/s for its head dim
  (``ATTENTION_TFLOPS``: FlashAttention-2, or ``attention="fa3"``).

Data passes (interleave, norms, RoPE, activation, adds, the split-K sum) and the aten copies run
at the copy bandwidth, their gathered bytes derated. docs/performance.md gives each factor's
source.

**A decoder layer** (``LayerConfig``, ``CONFIGS``): its training step (forward, then the backward
alone given the upstream gradient: every input and weight gradient) at ``tokens = batch * seq``
tokens (``train_layer``), and its decode step (``decode_layer``), for four paths that differ
only in their four projections (qkv, o, gate_up, down) and, for ``fused``, the activation, the
norms and the residual adds:

* **dense**: Phi-3, the same widths as ``F.linear`` (``dense_launches``, an aten recording).
* **reference**: KPhi-3 with ``kphi3_kernels.reference.gpc_io`` (``reference_launches``,
  the einsum chain recorded as aten ops on meta tensors).
* **triton**: KPhi-3 with today's op-level Triton kernels (``triton_launches``: the
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
  Key/value heads are read once (no repeat_kv copy). The speed-of-light compute ceiling is the
  GEMMs' 790 TFLOP/s, which flash attention does not reach in practice; the realistic column
  charges ``ATTENTION_TFLOPS``.

Dropout is 0 in the released config and costs nothing; the RoPE table (cos, sin) is built once
per model, not per layer. The embedding and ``lm_head`` (an ``F.linear(h, vocab)``, the same for
every path) are listed apart, not in the layer; the final norm and the loss are not counted.

**Decode**: one new token for each of ``b`` sequences (``--decode-batches``, 1 and 16) against a
static KV cache of ``S`` positions (``--cache``, 2048): the forward alone at ``M = b``; the
projections at ``M = b``, the norms, RoPE, activation and residuals at ``N = b``, the cache
update (writes the new k and v rows) and attention as one read of the cache: reads q
``[b, H, D]`` and the cache's k and v ``[b, Hkv, S, D]``, writes o, ``4 * b * H * S * D`` FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .cli import LAUNCH_OVERHEAD_US

ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4


# ----------------------------------------------------------------------------------------------
# The cost model: speed of light, and the realistic column's device profiles and factors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """What the realistic column knows of a GPU. ``default_tflops`` / ``default_gbps`` are the
    profile's ceilings until a GPU run measures them: ``gpu_check`` writes this GPU's bf16
    matmul TFLOP/s and copy GB/s to ``ceilings.json``, and a ``CostModel`` built from those
    replaces them (the SMs, L2 and shared memory stay the profile's)."""

    name: str
    sms: int
    l2_mb: float
    smem_per_block: int          # bytes one CTA may use (227 KiB on Hopper)
    default_tflops: float
    default_gbps: float
    source: str


# Shared memory one CTA may use on Hopper: 227 KiB (grouped_gemm.SMEM_LIMIT_BYTES).
HOPPER_SMEM_PER_BLOCK = 232448
PROFILES: Dict[str, DeviceProfile] = {
    "h100": DeviceProfile(
        "H100 80GB SXM", 132, 50.0, HOPPER_SMEM_PER_BLOCK, 798.0, 3000.0,
        "132 SMs, 50 MB L2 (the datasheet); ~798 TFLOP/s bf16 dense GEMM and ~3.0 TB/s device "
        "copy are typical measured figures on this part (the datasheet's 989 TFLOP/s and "
        "3.35 TB/s are not reached), not measured by this project"),
    "h200": DeviceProfile(
        "H200", 132, 60.0, HOPPER_SMEM_PER_BLOCK, 790.0, 4300.0,
        "132 SMs, 60 MB L2; ~790 TFLOP/s bf16 dense GEMM and ~4.3 TB/s device copy measured on "
        "an H200 (kphi3_bench.roofline)"),
}

# Every factor of the realistic column; docs/performance.md ("The realistic column") gives each
# one's source.
#: A tile's prologue (the pipeline fill: num_stages - 1 loads before the first MMA) and epilogue
#: (fp32 accumulator to the output dtype, the store), in K-steps of the tile's own loop.
TILE_OVERHEAD_STEPS = 2.5
#: A launch's GEMM tiles run 2 CTAs per SM where two configs' pipelines fit the 227 KiB of
#: shared memory (registers and the epilogue's shared memory are not counted), else 1.
MAX_CTAS_PER_SM = 2
#: Bytes read by a gather (scalar or short-run loads at computed addresses) move at this
#: fraction of the copy bandwidth.
GATHER_BANDWIDTH_FRACTION = 0.55
#: Dense GEMMs (cuBLAS, for the dense and reference paths): no wave loss (cuBLAS picks its tile
#: and splits K itself), the same per-tile overhead on a K loop of this block.
CUBLAS_BLOCK_K = 64
#: Causal flash attention, forward and backward TFLOP/s by head dim, H100 SXM (the H200 has
#: the same SMs and clocks; at 8192 tokens attention is compute-bound). A head dim without a
#: published figure takes the largest one below it (throughput grows with head dim).
ATTENTION_TFLOPS: Dict[str, Dict[int, tuple]] = {
    "fa2": {64: (262.0, 264.0)},
    "fa3": {64: (371.0, 422.0)},
}
ATTENTION_SOURCES = {
    "fa2": "FlashAttention-2, causal, head dim 64, H100 SXM: 262 fwd / 264 bwd TFLOP/s "
           "(published benchmark figures)",
    "fa3": "FlashAttention-3, causal, head dim 64, H100 SXM: 371 fwd / 422 bwd TFLOP/s "
           "(published benchmark figures)",
}


def attention_tflops(kind: str, head_dim: int, mode: str) -> float:
    """The published causal attention TFLOP/s of ``kind`` (``fa2`` / ``fa3``) for ``head_dim``
    (the largest published head dim not above it, else the smallest), ``fwd`` or ``bwd``."""
    table = ATTENTION_TFLOPS[kind]
    dims = sorted(table)
    below = [d for d in dims if d <= head_dim]
    fwd, bwd = table[below[-1] if below else dims[0]]
    return fwd if mode == "fwd" else bwd


@dataclass(frozen=True)
class CostModel:
    """Two columns per launch.

    * speed of light (``time_us``): ``max(flops / peak_flops, bytes / peak_bytes_per_s) +
      overhead_s``.
    * realistic (``realistic_us``): the same ceilings with the profile's SMs and the factors
      above (``realistic_compute_s``, ``realistic_memory_s``); attention at ``attention``'s
      published figures."""

    peak_tflops: float
    peak_gbps: float
    overhead_us: float = LAUNCH_OVERHEAD_US
    profile: DeviceProfile = PROFILES["h200"]
    attention: str = "fa2"

    def time_us(self, flops: float, nbytes: float) -> float:
        return (max(flops / (self.peak_tflops * 1e12), nbytes / (self.peak_gbps * 1e9)) * 1e6
                + self.overhead_us)

    def bound(self, flops: float, nbytes: float) -> str:
        compute = flops / (self.peak_tflops * 1e12)
        memory = nbytes / (self.peak_gbps * 1e9)
        return "compute" if compute >= memory else "memory"

    # --- the realistic column ---------------------------------------------------------------

    def realistic_memory_s(self, launch: "LaunchCost") -> float:
        """Bytes at the copy bandwidth, the gathered ones at ``GATHER_BANDWIDTH_FRACTION`` of it."""
        bw = self.peak_gbps * 1e9
        plain = launch.bytes - launch.gathered_bytes
        return plain / bw + launch.gathered_bytes / (bw * GATHER_BANDWIDTH_FRACTION)

    def realistic_compute_s(self, launch: "LaunchCost") -> float:
        """The launch's matrix work, by kind:

        * ``tile`` (a Triton GEMM): waves of ``SMs * ctas_per_sm`` programs. One program's
          K-step takes ``2 * BLOCK_P * BLOCK_Q * BLOCK_K / (peak / SMs)``; a full wave takes
          ``ctas_per_sm * steps + TILE_OVERHEAD_STEPS`` K-steps (co-resident programs share
          the SM and hide each other's prologue and epilogue but one), the last, partial wave
          ``ceil(rest / SMs) * steps + TILE_OVERHEAD_STEPS``. With one CTA per SM that is
          ``ceil(programs / SMs) * (steps + TILE_OVERHEAD_STEPS)`` K-steps.
        * ``cublas`` (an aten matmul): no wave loss, ``flops / peak * (steps +
          TILE_OVERHEAD_STEPS) / steps`` with ``steps = ceil(K / CUBLAS_BLOCK_K)``.
        * ``attention_fwd`` / ``attention_bwd``: ``flops`` at ``attention_tflops``.
        * anything else: ``flops / peak`` (0 for the data passes)."""
        peak = self.peak_tflops * 1e12
        if launch.kind == "tile" and launch.programs and launch.steps:
            bp, bq, bk = launch.tile
            step_s = 2 * bp * bq * bk * self.profile.sms / peak
            per_wave = self.profile.sms * launch.ctas_per_sm
            full, rest = divmod(launch.programs, per_wave)
            steps = full * (launch.ctas_per_sm * launch.steps + TILE_OVERHEAD_STEPS)
            if rest:
                steps += _cdiv(rest, self.profile.sms) * launch.steps + TILE_OVERHEAD_STEPS
            return steps * step_s
        if launch.kind == "cublas" and launch.steps:
            return launch.flops / peak * (launch.steps + TILE_OVERHEAD_STEPS) / launch.steps
        if launch.kind in ("attention_fwd", "attention_bwd"):
            mode = launch.kind.split("_")[1]
            return launch.flops / (attention_tflops(self.attention, launch.head_dim, mode) * 1e12)
        return launch.flops / peak

    def realistic_us(self, launch: "LaunchCost") -> float:
        return (max(self.realistic_compute_s(launch), self.realistic_memory_s(launch)) * 1e6
                + self.overhead_us)

    def describe_realistic(self) -> Dict[str, Any]:
        """The realistic column's profile and factors, for a ledger's JSON."""
        return {
            "profile": self.profile.name, "sms": self.profile.sms, "l2_mb": self.profile.l2_mb,
            "smem_per_block": self.profile.smem_per_block,
            "profile_source": self.profile.source,
            "tile_overhead_steps": TILE_OVERHEAD_STEPS, "max_ctas_per_sm": MAX_CTAS_PER_SM,
            "gather_bandwidth_fraction": GATHER_BANDWIDTH_FRACTION,
            "cublas_block_k": CUBLAS_BLOCK_K, "attention": self.attention,
            "attention_source": ATTENTION_SOURCES[self.attention],
            "time": ("per launch max(compute, memory) + overhead: Triton GEMM tiles in waves of "
                     "SMs * ctas_per_sm programs, each K loop plus tile_overhead_steps; "
                     "cuBLAS GEMMs without wave loss, the same overhead on K / cublas_block_k "
                     "steps; gathered bytes at gather_bandwidth_fraction of the copy bandwidth; "
                     "flash attention at the published figures"),
        }


def cost_model(profile: str = "h200", overhead_us: float = LAUNCH_OVERHEAD_US,
               attention: str = "fa2") -> CostModel:
    """The cost model of a device profile (``h100``, ``h200``) at its default ceilings."""
    p = PROFILES[profile]
    return CostModel(p.default_tflops, p.default_gbps, overhead_us, p, attention)


def profile_for(device_name: str) -> DeviceProfile:
    """The profile of a GPU by its name (``torch.cuda.get_device_name``): H100's for a name
    with "H100", else H200's (the ledger's default)."""
    return PROFILES["h100" if "H100" in (device_name or "").upper() else "h200"]


def h200_model(overhead_us: float = LAUNCH_OVERHEAD_US) -> CostModel:
    """The H200 ceilings of ``kphi3_bench.roofline`` (bf16; fp16 assumed the same)."""
    from .roofline import H200_BF16_TFLOPS, H200_COPY_GBPS

    return CostModel(H200_BF16_TFLOPS, H200_COPY_GBPS, overhead_us, PROFILES["h200"])


@dataclass
class LaunchCost:
    """One launch: what it is, what it computes and what it moves, and what the realistic
    column needs to know of it: its ``kind`` (``tile``: a Triton GEMM; ``cublas``: an aten
    matmul; ``attention_fwd`` / ``attention_bwd``; empty: a data pass), a tile launch's
    ``programs``, ``tile`` (BLOCK_P, BLOCK_Q, BLOCK_K), K-``steps`` per program and
    ``ctas_per_sm``, a matmul's K-steps, the bytes it reads by a gather, an attention's head
    dim."""

    name: str
    flops: int
    bytes: int
    config: str = ""
    kind: str = ""
    programs: int = 0
    tile: tuple = ()
    steps: int = 0
    ctas_per_sm: int = 1
    gathered_bytes: int = 0
    head_dim: int = 0

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        out = {"name": self.name, "flops": self.flops, "bytes": self.bytes,
               "time_us": round(model.time_us(self.flops, self.bytes), 4),
               "bound": model.bound(self.flops, self.bytes),
               "realistic_us": round(model.realistic_us(self), 4)}
        if self.kind == "tile":
            out.update(programs=self.programs, ctas_per_sm=self.ctas_per_sm,
                       waves=round(self.programs / (model.profile.sms * self.ctas_per_sm), 3))
        if self.gathered_bytes:
            out["gathered_bytes"] = self.gathered_bytes
        if self.config:
            out["config"] = self.config
        return out


@dataclass
class PathCost:
    """The launches of one way to compute one op call."""

    launches: List[LaunchCost] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)

    @property
    def flops(self) -> int:
        return sum(l.flops for l in self.launches)

    @property
    def bytes(self) -> int:
        return sum(l.bytes for l in self.launches)

    def time_us(self, model: CostModel) -> float:
        return sum(model.time_us(l.flops, l.bytes) for l in self.launches)

    def realistic_us(self, model: CostModel) -> float:
        return sum(model.realistic_us(l) for l in self.launches)

    def summary(self, model: CostModel) -> Dict[str, Any]:
        return {"launches": self.count, "flops": self.flops, "bytes": self.bytes,
                "time_us": round(self.time_us(model), 4),
                "realistic_us": round(self.realistic_us(model), 4)}

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        return dict(self.summary(model), kernels=[l.to_dict(model) for l in self.launches])


# ----------------------------------------------------------------------------------------------
# Bytes of a set of tensors
# ----------------------------------------------------------------------------------------------


def _storage_key(t) -> int:
    # The StorageImpl's address: equal for every view of one storage (meta tensors included,
    # whose data pointers are all 0).
    return t.untyped_storage()._cdata


def _view_bytes(t) -> int:
    """Bytes a tensor (view) spans: its elements, or fewer where strides overlap (``expand``)."""
    n = t.numel()
    if n == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(n, span) * t.element_size()


def distinct_bytes(tensors: Iterable[Any]) -> int:
    """The bytes of the distinct tensors among ``tensors``.

    One tensor passed twice counts once; distinct views of one storage add up, but never to more
    than the storage holds.
    """
    import torch

    views: Dict[Any, Dict[tuple, int]] = {}
    caps: Dict[Any, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = _storage_key(t)
        caps[key] = t.untyped_storage().nbytes()
        views.setdefault(key, {})[(t.storage_offset(), tuple(t.shape), tuple(t.stride()))] = \
            _view_bytes(t)
    return sum(min(caps[key], sum(v.values())) for key, v in views.items())


# ----------------------------------------------------------------------------------------------
# The Triton path: KernelLaunch records
# ----------------------------------------------------------------------------------------------

# The block-size names of the kernels' configs (kphi3_kernels/ops/grouped_gemm.py, interleave.py).
_GEMM_BLOCKS = ("BLOCK_P", "BLOCK_Q", "BLOCK_K")
_MOVE_BLOCKS = {"BLOCK_M", "BLOCK_A", "BLOCK_B"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _config_text(config) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw}, num_warps={config.num_warps}, num_stages={config.num_stages}"


# A pass over rows x columns with no matmul (the fused activation of ``ops/rowwise.py``), or
# over a flat range (the split-K sum of ``ops/grouped_gemm.py``).
_ELEMENTWISE_BLOCKS = {"BLOCK_M", "BLOCK_C"}
_FLAT_BLOCKS = {"BLOCK_N"}


def _k_steps(spec, bk: int) -> int:
    """K-loop steps of one program of the grouped GEMM: ``K`` (+ ``K2``), or one split's share
    of ``K`` where the launch splits it (the grid then counts every split's programs; the last
    split's shorter range is charged as a full one, as its program occupies an SM as long)."""
    a = spec.args
    if "K" not in a:
        raise ValueError(f"launch {spec.name!r}: no reduction length known; teach the ledger")
    from kphi3_kernels.ops.grouped_gemm import VIEW_D, view_d_parts

    if a.get("VIEW") == VIEW_D:
        # K steps for each product a program sums: the block's and one per residue its tile
        # meets (their mean over the column tiles).
        bq = spec.configs[0].kwargs["BLOCK_Q"]
        return _cdiv(a["K"], bk) * view_d_parts(bq, a["GROUPS"], a["RUN"])
    if a.get("SPLIT_K", 1) > 1:
        return _cdiv(a["k_per_split"], bk)
    steps = _cdiv(a["K"], bk) + _cdiv(a.get("K2", 0), bk)
    # An activation-layout launch's program computes a gate tile and the up tile after it.
    return 2 * steps if a.get("ACT_LAYOUT") else steps


def _ctas_per_sm(config, itemsize: int, smem_per_block: int) -> int:
    """GEMM programs one SM holds: ``MAX_CTAS_PER_SM`` where that many pipelines
    (``num_stages`` buffers of an A and a B tile) fit ``smem_per_block``, else 1."""
    kw = config.kwargs
    smem = config.num_stages * (kw["BLOCK_P"] + kw["BLOCK_Q"]) * kw["BLOCK_K"] * itemsize
    return MAX_CTAS_PER_SM if MAX_CTAS_PER_SM * smem <= smem_per_block else 1


def _gathered_args(args: Dict[str, Any]) -> List[str]:
    """The arguments a launch reads by a gather (scalar or short-run loads at computed
    addresses), from the flags its launcher passes:

    * a grouped GEMM with ``RESIDUAL_GATHER`` (``gpc_io_bwd_dx``, ``norm_io_bwd_dxn``): the
      interleaved addend ``dxi`` (``r_ptr``);
    * a D-view GEMM (``mlp_tail_bwd_dgate_up``): ``gate_up`` read and its gradient written at
      the channels of a tile's slots (``act_ptr``, ``c_ptr``);
    * a GEMM with ``ACT_LAYOUT`` (gate_up_proj's head writing ``up * silu(gate)``): the layout
      ``t`` written at the slots of a tile's channels (``t_ptr``);
    * a grouped GEMM whose second operand has its own strides (``gpc_io_fwd_fused``: ``x``
      read in place with K stride G): ``a2_ptr``;
    * the activation into the layout (``silu_mul_layout``): ``gate_up``, read at each slot's
      channel; its backward (``silu_mul_layout_bwd``): the layout's gradient ``dt``;
    * a norm writing the de-interleaved copy or the layout (``rms_norm_split``,
      ``rms_norm_layout``, ``add_`` before either): its input row(s), re-read gathered.
    """
    from kphi3_kernels.ops.grouped_gemm import VIEW_D

    if args.get("RESIDUAL_GATHER"):
        return ["r_ptr"]
    if args.get("VIEW") == VIEW_D:
        return ["act_ptr", "c_ptr"]
    if args.get("ACT_LAYOUT"):
        return ["t_ptr"]
    if args.get("HAS_SECOND") and not args.get("SHARED_STRIDES", True):
        return ["a2_ptr"]
    if "gu_ptr" in args:
        return ["dt_ptr"] if "dt_ptr" in args else ["gu_ptr"]
    if args.get("XI_GROUPS") or args.get("LAYOUT_GROUPS"):
        return ["x_ptr"] + (["r_ptr"] if args.get("HAS_RESIDUAL") else [])
    return []


def triton_launch_cost(spec, smem_per_block: int = HOPPER_SMEM_PER_BLOCK) -> LaunchCost:
    """FLOPs (first-choice config, tile padding included) and bytes of one ``KernelLaunch``,
    with what the realistic column needs (programs, K-steps, CTAs per SM, gathered bytes)."""
    import torch

    config = spec.configs[0]
    kw = dict(config.kwargs)
    extra: Dict[str, Any] = {}
    if all(k in kw for k in _GEMM_BLOCKS):
        bp, bq, bk = (kw[k] for k in _GEMM_BLOCKS)
        programs = 1
        for n in spec.grid(dict(spec.args, **kw)):
            programs *= n
        steps = _k_steps(spec, bk)
        flops = 2 * programs * bp * bq * bk * steps
        itemsize = spec.args["a_ptr"].element_size() if "a_ptr" in spec.args else 2
        extra = dict(kind="tile", programs=programs, tile=(bp, bq, bk), steps=steps,
                     ctas_per_sm=_ctas_per_sm(config, itemsize, smem_per_block))
    elif set(kw) in (_MOVE_BLOCKS, _ELEMENTWISE_BLOCKS, _FLAT_BLOCKS):
        flops = 0
    else:
        raise ValueError(
            f"launch {spec.name!r}: config {sorted(kw)} is neither a GEMM's {_GEMM_BLOCKS} "
            f"nor a data pass's {sorted(_MOVE_BLOCKS)} / {sorted(_ELEMENTWISE_BLOCKS)}; teach the ledger "
            "what this kernel computes")
    tensors = [v for v in spec.args.values() if isinstance(v, torch.Tensor)]
    nbytes = distinct_bytes(tensors)
    # An output the kernel accumulates into is read and written.
    nbytes += distinct_bytes(spec.args[name] for name in spec.restore)
    gathered = distinct_bytes(spec.args[name] for name in _gathered_args(spec.args))
    return LaunchCost(spec.name, int(flops), int(nbytes), _config_text(config),
                      gathered_bytes=int(gathered), **extra)


@dataclass(frozen=True)
class Problem:
    """One op call: the op, a shape of ``kphi3_bench.shapes``, M tokens and a dtype name."""

    op: str
    shape: Any   # shapes.Shape
    m: int
    dtype: str

    @property
    def has_second(self) -> bool:
        """gpc_block has its second GEMM only when in >= out."""
        return self.shape.in_features >= self.shape.out_features

    def torch_dtype(self):
        from .shapes import DTYPES

        return DTYPES[self.dtype]


def _meta(*size, dtype, requires_grad=False):
    import torch

    return torch.empty(*size, dtype=dtype, device="meta", requires_grad=requires_grad)


def _operands(p: Problem, requires_grad: bool = False) -> Dict[str, Any]:
    """x, the weights and dy of ``p`` on the meta device (``[M, C]``, weights ``[G, s, og]``)."""
    sh, dt = p.shape, p.torch_dtype()
    G, s, og = sh.groups, sh.in_per_group, sh.out_per_group
    out = {"x": _meta(p.m, sh.in_features, dtype=dt, requires_grad=requires_grad)}
    if p.op in ("grouped_linear", "gpc_io", "gpc_block"):
        out["w1"] = _meta(G, s, og, dtype=dt, requires_grad=requires_grad)
    if p.op == "gpc_io":
        out["w2"] = _meta(G, s, og, dtype=dt, requires_grad=requires_grad)
    if p.op == "gpc_block" and p.has_second:
        out["w2"] = _meta(G, og, og, dtype=dt, requires_grad=requires_grad)
    width = sh.in_features if p.op == "interleave" else sh.out_features
    out["dy"] = _meta(p.m, width, dtype=dt)
    return out


def _triton_call(p: Problem, mode: str) -> Callable[[], Any]:
    from kphi3_kernels.ops import triton_impl as T

    t = _operands(p)
    x, dy, w1, w2 = t["x"], t["dy"], t.get("w1"), t.get("w2")
    s = p.shape.in_per_group
    calls = {
        ("grouped_linear", "fwd"): lambda: T.grouped_linear_fwd(x, w1),
        ("grouped_linear", "bwd"): lambda: T.grouped_linear_bwd(dy, x, w1),
        ("gpc_io", "fwd"): lambda: T.gpc_io_fwd(x, w1, w2),
        # xi (x de-interleaved) is saved by a forward whose backward needs dW2, as here.
        ("gpc_io", "bwd"): lambda: T.gpc_io_bwd(dy, x, _meta(*x.shape, dtype=x.dtype), w1, w2),
        ("gpc_block", "fwd"): lambda: T.gpc_block_fwd(x, w1, w2),
        # h (first(x) interleaved, saved by the forward) is read only by the second GEMM's dW2.
        ("gpc_block", "bwd"): lambda: T.gpc_block_bwd(
            dy, x, _meta(p.m, p.shape.out_features, dtype=p.torch_dtype()) if w2 is not None
            else None, w1, w2),
        ("interleave", "fwd"): lambda: T.interleave_fwd(x, s),
        # The interleave's backward is the interleave with the inverse step C / s (= G).
        ("interleave", "bwd"): lambda: T.interleave_fwd(dy, p.shape.in_features // s),
    }
    return calls[(p.op, mode)]


def triton_launches(p: Problem, mode: str, io_forward: str = "auto") -> PathCost:
    """The Triton path's launches for ``p`` in ``mode``: recorded, not run."""
    from kphi3_kernels.ops import triton_impl as T

    previous_io = T.IO_FORWARD
    try:
        T.IO_FORWARD = io_forward
        return PathCost(record_costs(_triton_call(p, mode)))
    finally:
        T.IO_FORWARD = previous_io


def record_costs(call: Callable[[], Any]) -> List[LaunchCost]:
    """The cost of each launch ``call`` makes, recorded through ``ops/launch.py``, none run."""
    from kphi3_kernels.ops import launch as launch_mod

    seen: List[Any] = []
    previous = launch_mod.RECORDER
    try:
        launch_mod.RECORDER = seen.append
        call()
        # Counted while the launches' tensors are alive (storage identity decides duplicates).
        return [triton_launch_cost(spec) for spec in seen]
    finally:
        launch_mod.RECORDER = previous


# ----------------------------------------------------------------------------------------------
# The reference and dense paths: aten graphs
# ----------------------------------------------------------------------------------------------

# Ops that the schema does not mark as views but that move no bytes: aliases without an alias
# annotation, allocations without a fill, and queries.
_NO_BYTES = {
    "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resize_", "set_",
}
# In-place ops that overwrite their destination without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_",
               "exponential_"}


def _tensor_leaves(tree) -> List[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def aten_op_cost(func, args, kwargs, out) -> Optional[LaunchCost]:
    """One aten op as a launch (None for views, metadata-only ops and bare allocations)."""
    from torch.utils.flop_counter import flop_registry

    name = func._overloadpacket.__name__
    outputs = _tensor_leaves(out)
    if not outputs or getattr(func, "is_view", False) or name in _NO_BYTES:
        return None
    inputs = _tensor_leaves((args, kwargs))
    if func._overloadname.startswith("out") or name in _WRITE_ONLY:
        # ``out=`` tensors and the destination of copy_ / fill_ are written, not read.
        written = {_storage_key(t) for t in outputs}
        inputs = [t for t in inputs if _storage_key(t) not in written]
    formula = flop_registry.get(func._overloadpacket)
    flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
    # Inputs once each, outputs once each: an in-place op's operand (add_) is read and written.
    nbytes = distinct_bytes(inputs) + distinct_bytes(outputs)
    extra: Dict[str, Any] = {}
    if name in _MATMUL_K_ARG and flops:
        k = args[_MATMUL_K_ARG[name]].shape[-1]
        extra = dict(kind="cublas", steps=_cdiv(k, CUBLAS_BLOCK_K))
    return LaunchCost(f"aten.{name}.{func._overloadname}", flops, int(nbytes), **extra)


# The aten matmuls (cuBLAS) and the argument whose last dimension is their K.
_MATMUL_K_ARG = {"mm": 0, "bmm": 0, "addmm": 1, "baddbmm": 1, "addbmm": 1}


_RECORDER_CLASS = None


def _aten_recorder_class():
    """``AtenRecorder``, defined on first use so that importing this module does not import torch."""
    global _RECORDER_CLASS
    if _RECORDER_CLASS is None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class AtenRecorder(TorchDispatchMode):
            """A ``TorchDispatchMode`` that keeps every data-moving aten op run while it is
            active as a ``LaunchCost``: ``with AtenRecorder() as rec: ...``, then
            ``rec.launches``."""

            def __init__(self):
                super().__init__()
                self.launches: List[LaunchCost] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                cost = aten_op_cost(func, args, kwargs, out)
                if cost is not None:
                    self.launches.append(cost)
                return out

        AtenRecorder.__module__ = __name__
        _RECORDER_CLASS = AtenRecorder
    return _RECORDER_CLASS


def __getattr__(name: str):
    if name == "AtenRecorder":
        return _aten_recorder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_aten(forward: Callable[..., Any], inputs: Sequence[Any], mode: str,
                dy: Any) -> PathCost:
    """The aten launches of ``forward(*inputs)`` (``fwd``) or of its backward alone (``bwd``:
    ``torch.autograd.grad`` of the output with respect to every input, given ``dy``)."""
    import torch

    if mode == "fwd":
        with torch.no_grad(), _aten_recorder_class()() as rec:
            forward(*inputs)
        return PathCost(rec.launches)
    y = forward(*inputs)
    with _aten_recorder_class()() as rec:
        torch.autograd.grad(y, list(inputs), dy)
    return PathCost(rec.launches)


def reference_launches(p: Problem, mode: str) -> PathCost:
    """``kphi3_kernels.reference``'s aten graph for ``p`` (forward, or backward alone)."""
    from kphi3_kernels import reference as R

    t = _operands(p, requires_grad=(mode == "bwd"))
    x, w1, w2, dy = t["x"], t.get("w1"), t.get("w2"), t["dy"]
    s = p.shape.in_per_group
    if p.op == "grouped_linear":
        return record_aten(R.grouped_linear, [x, w1], mode, dy)
    if p.op == "gpc_io":
        return record_aten(R.gpc_io, [x, w1, w2], mode, dy)
    if p.op == "gpc_block":
        if w2 is None:
            return record_aten(lambda a, b: R.gpc_block(a, b), [x, w1], mode, dy)
        return record_aten(R.gpc_block, [x, w1, w2], mode, dy)
    return record_aten(lambda a: R.interleave(a, s), [x], mode, dy)


def dense_launches(p: Problem, mode: str) -> Optional[PathCost]:
    """``F.linear(x, W)`` with ``W`` ``[out, in]`` (None for the interleave: no dense form)."""
    import torch.nn.functional as F

    if p.op == "interleave":
        return None
    sh, dt = p.shape, p.torch_dtype()
    grad = mode == "bwd"
    x = _meta(p.m, sh.in_features, dtype=dt, requires_grad=grad)
    w = _meta(sh.out_features, sh.in_features, dtype=dt, requires_grad=grad)
    return record_aten(F.linear, [x, w], mode, _meta(p.m, sh.out_features, dtype=dt))


# ----------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------


def floor(p: Problem, mode: str) -> LaunchCost:
    """One launch with the op's true FLOPs and the least bytes (each operand once).

    Forward: read x and the weights, write y. Backward: read dy, x and the weights, write dx and
    the weight gradients (twice the forward's FLOPs). gpc_block's dW2 needs ``h``, a function of
    x and W1: the floor counts neither reading it nor recomputing it, so it is a lower bound of
    both designs.
    """
    sh = p.shape
    G, s, og = sh.groups, sh.in_per_group, sh.out_per_group
    elem = ELEMENT_SIZE[p.dtype]
    M, cin, cout = p.m, sh.in_features, sh.out_features
    if p.op == "interleave":
        gemm_flops, weights = 0, 0
        cout = cin
    elif p.op == "grouped_linear":
        gemm_flops, weights = 2 * M * cin * cout // G, G * s * og
    elif p.op == "gpc_io":
        gemm_flops, weights = 4 * M * cin * cout // G, 2 * G * s * og
    else:  # gpc_block
        gemm_flops, weights = 2 * M * cin * cout // G, G * s * og
        if p.has_second:
            gemm_flops += 2 * M * cout * cout // G
            weights += G * og * og
    if mode == "fwd":
        flops, count = gemm_flops, M * cin + weights + M * cout
    elif p.op == "interleave":
        flops, count = 0, 2 * M * cin
    else:
        flops, count = 2 * gemm_flops, M * cout + M * cin + weights + M * cin + weights
    return LaunchCost("floor", flops, count * elem)


# ----------------------------------------------------------------------------------------------
# A decoder layer
# ----------------------------------------------------------------------------------------------

PATHS = ("dense", "reference", "triton", "fused")
PROJECTIONS = ("qkv", "o", "gate_up", "down")
REST = ("norms", "rope", "activation", "residuals")
COMPONENTS = ("projections", "attention") + REST


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
                                    (q + 2 * kv + o) * e + rows * FP32, kind="attention_fwd",
                                    head_dim=D)])
    return PathCost([
        LaunchCost("flash_attn_bwd_preprocess", 0, 2 * o * e + rows * FP32),
        LaunchCost("flash_attn_bwd", forward_flops * 5 // 2,
                   (q + 2 * kv + o) * e + 2 * rows * FP32 + 2 * kv * e + q * FP32,
                   kind="attention_bwd", head_dim=D),
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
    p = Problem("gpc_io", shape, m, dtype)
    if path == "dense":
        return dense_launches(p, mode)
    if path == "reference":
        return reference_launches(p, mode)
    if path == "triton":
        return triton_launches(p, mode, io_forward)
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
    tensors like ``triton_launches`` (none run): ``norms``, ``residuals``, ``qkv``,
    ``gate_up``, ``activation`` and ``down``.

    * ``ops/triton_fused.py`` for each RMSNorm and the IO block after it (qkv_proj, gate_up_proj):
      forward, the norm writing the block-residue layout where it adds no channel
      (``kphi3_kernels.fused.layout_padding``), else channel order and its de-interleaved copy
      (not at the released widths: the split head), then the block reading it; backward, the
      block's input gradient in channel order, its weight gradients from the saved operands,
      the norm's backward.
    * The residual stream: gate_up_proj's norm head takes the attention's residual add (it
      reads both addends and writes ``h``), and its backward adds the stream's gradient to the
      norm's in its pass, so that branch point has no add of its own; the layer input's branch
      point keeps its add (``residual_add`` formula).
    * ``ops/triton_fused.py`` for ``silu(gate) * up`` and down_proj: forward, the activation
      written into the layout by gate_up_proj's launch (``activation`` is empty: no pass of
      its own), down_proj reading it and adding the residual stream in its epilogue; backward,
      down_proj's two launches, the activation's backward inside its input-gradient epilogue
      (no launch of its own).

    Every norm backward is followed by the sum of the norm weight's per-program partial
    gradients (a torch reduction, counted as one launch reading the partials).
    """
    import torch

    from kphi3_kernels.fused import layout_padding
    from kphi3_kernels.layout import residue_run_length
    from kphi3_kernels.ops import triton_fused

    from .shapes import DTYPES

    torch_dtype = DTYPES[dtype]
    e = ELEMENT_SIZE[dtype]

    def meta(*size, dtype=torch_dtype):
        return torch.empty(*size, dtype=dtype, device="meta")

    def dweight_sum(channels: int) -> LaunchCost:
        programs = -(-m // 16)  # rowwise's 16-row RMSNorm programs: one fp32 partial each
        return LaunchCost("rms_norm_dweight_sum", 0, programs * channels * FP32 + channels * e)

    rstd, norm_weight = meta(m, dtype=torch.float32), meta(cfg.hidden)
    out: Dict[str, PathCost] = {"norms": PathCost(), "residuals": PathCost()}
    # gate_up_proj's head writes silu(gate) * up in down_proj's layout (the model asks it to
    # wherever the tail is fused); the tail then starts from it.
    down = next(sh for sh in family_shapes(cfg) if sh.op == "down")
    act = (down.groups, residue_run_length(down.groups * down.in_per_group, down.groups, 8))
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
            head_act = act if sh.op == "gate_up" else None
            # "auto": what the model runs; "layout" / "split": either head everywhere, to
            # price the choice (norm_heads_delta_us).
            layout_head = (layout_padding(G, s) == 0 if norm_heads == "auto"
                           else norm_heads == "layout")
            if layout_head:
                costs = record_costs(
                    (lambda: triton_fused.norm_io_fwd(x, norm_weight, 1e-5, w1, w2, run=run,
                                                   residual=residual, act=head_act))
                    if mode == "fwd" else
                    (lambda: triton_fused.norm_io_bwd(dy, x, norm_weight, rstd, t, w1, w2, dh=dh)))
            else:
                n, xi = meta(m, G * s), meta(m, G * s)
                costs = record_costs(
                    (lambda: triton_fused.norm_io_split_fwd(x, norm_weight, 1e-5, w1, w2,
                                                         residual=residual, act=head_act))
                    if mode == "fwd" else
                    (lambda: triton_fused.norm_io_split_bwd(dy, x, norm_weight, rstd, n, xi, w1, w2,
                                                         dh=dh)))
            if mode == "bwd":
                costs.append(dweight_sum(G * s))
            norm = [c for c in costs if "rms_norm" in c.name]
            out["norms"].launches.extend(norm)
            out[sh.op] = PathCost([c for c in costs if c not in norm])
        elif sh.op == "down":
            gu = meta(m, 2 * G * s)
            costs = record_costs((lambda: triton_fused.mlp_tail_fwd(gu, w1, w2, run=run,
                                                                    residual=dy, t=t))
                                 if mode == "fwd" else
                                 (lambda: triton_fused.mlp_tail_bwd(dy, gu, t, w1, w2)))
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


def _layer_dict(components: Dict[str, Dict[str, PathCost]],
                proj: Dict[str, Dict[str, PathCost]], tokens: int,
                model: CostModel) -> Dict[str, Any]:
    """Totals, tokens/s and the per-component (and per-projection) costs of one path, in both
    columns: speed of light (``time_us``) and realistic (``realistic_us``; ``realistic_fa3_us``
    with attention at FlashAttention-3's figures instead of FlashAttention-2's)."""
    from dataclasses import replace

    fa3 = replace(model, attention="fa3")
    out_components = {}
    for name in COMPONENTS:
        by_mode = components[name]
        entry = {mode: c.summary(model) for mode, c in by_mode.items()}
        entry["time_us"] = round(sum(c.time_us(model) for c in by_mode.values()), 4)
        entry["realistic_us"] = round(sum(c.realistic_us(model) for c in by_mode.values()), 4)
        out_components[name] = entry
    every = [c for by_mode in components.values() for c in by_mode.values()]
    total = sum(c.time_us(model) for c in every)
    realistic = sum(c.realistic_us(model) for c in every)
    realistic_fa3 = sum(c.realistic_us(fa3) for c in every)
    rest = sum(c.time_us(model) for name in REST for c in components[name].values())
    launches = sum(c.count for c in every)
    return {
        "time_us": round(total, 4),
        "tokens_per_s": round(tokens / (total * 1e-6), 1),
        "realistic_us": round(realistic, 4),
        "realistic_tokens_per_s": round(tokens / (realistic * 1e-6), 1),
        "realistic_fa3_us": round(realistic_fa3, 4),
        "launches": launches,
        "rest_us": round(rest, 4),
        "components": out_components,
        "projections": {op: {mode: c.summary(model) for mode, c in by_mode.items()}
                        for op, by_mode in proj.items()},
    }


def _ratios(paths: Dict[str, Dict[str, Any]], column: str = "time_us") -> Dict[str, float]:
    t = {name: p[column] for name, p in paths.items()}
    return {"triton_over_dense": round(t["triton"] / t["dense"], 4),
            "triton_over_reference": round(t["triton"] / t["reference"], 4),
            "reference_over_dense": round(t["reference"] / t["dense"], 4),
            "fused_over_dense": round(t["fused"] / t["dense"], 4),
            "fused_over_reference": round(t["fused"] / t["reference"], 4),
            "fused_over_triton": round(t["fused"] / t["triton"], 4)}


def _all_ratios(paths: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``ratios`` (speed of light), ``realistic_ratios`` and ``realistic_fa3_ratios``."""
    return {"ratios": _ratios(paths), "realistic_ratios": _ratios(paths, "realistic_us"),
            "realistic_fa3_ratios": _ratios(paths, "realistic_fa3_us")}


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
            "dtype": dtype, "paths": paths, **_all_ratios(paths),
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
            "cache": cache, "dtype": dtype, "paths": paths, **_all_ratios(paths)}


def outside_layer(cfg: LayerConfig, tokens: int, dtype: str, model: CostModel) -> Dict[str, Any]:
    """The embedding and ``lm_head`` at ``tokens`` (fwd and bwd), aten recordings on meta
    tensors; the same for every path, not part of the layer."""
    import torch
    import torch.nn.functional as F

    from .shapes import DTYPES, Shape

    dt = DTYPES[dtype]
    out: Dict[str, Any] = {}
    ids = torch.empty(tokens, dtype=torch.long, device="meta")
    for mode in ("fwd", "bwd"):
        w = torch.empty(cfg.vocab, cfg.hidden, dtype=dt, device="meta",
                        requires_grad=(mode == "bwd"))
        dy = torch.empty(tokens, cfg.hidden, dtype=dt, device="meta")
        out.setdefault("embedding", {})[mode] = record_aten(
            lambda weight: F.embedding(ids, weight), [w], mode, dy).summary(model)
    head = Shape(f"{cfg.family}-lm_head", cfg.family, "lm_head", cfg.hidden, cfg.vocab,
                 cfg.min_channels_per_group)
    for mode in ("fwd", "bwd"):
        out.setdefault("lm_head", {})[mode] = dense_launches(
            Problem("gpc_io", head, tokens, dtype), mode).summary(model)
    for entry in out.values():
        entry["time_us"] = round(entry["fwd"]["time_us"] + entry["bwd"]["time_us"], 4)
    return {"family": cfg.family, "tokens": tokens, "dtype": dtype, **out}


