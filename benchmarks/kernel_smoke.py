"""One small launch of every Triton kernel of the package on a CUDA GPU, each with its first-choice
config: what ``gpu_check`` runs under ``compute-sanitizer --tool racecheck`` and ``--tool memcheck``.

    python -m kphi3_bench.kernel_smoke                      # on a CUDA GPU
    compute-sanitizer --tool memcheck python -m kphi3_bench.kernel_smoke

The launches are those the compile report records (``compile_report.record_launches``: every
launcher of ``triton_impl``, the fused decoder's and the norms', called on CPU tensors with
``launch.RECORDER`` set, nothing run), at one released shape and a small, odd token count (masked
tiles); each distinct (kernel, launch name) is kept once. Its tensors are rebuilt on the GPU with
the same sizes, strides and offsets, and tensors that share a storage on the CPU share one on the
GPU (a view stays a view). Under memcheck, run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (gpu_check
does) so that every tensor is its own allocation and an overrun is not hidden inside a cached
block. Exit status 0 when every launch returned, 1 otherwise; a line per launch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

SHAPE, M, DTYPE = "kphi3-qkv", 37, "bf16"


def _kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(fn).__name__)


# The weight gradients split K only at thousands of tokens; these launches are recorded again at
# SPLIT_M tokens with SPLIT_K forced, so the split GEMM and its sum pass are checked too.
SPLIT_M, SPLIT_K, SPLIT_OPS = 301, 2, ("grouped_linear_bwd", "gpc_io_bwd", "gpc_io_layout_bwd")
# gate_up_proj's heads writing the MLP tail's activation run at gate_up_proj's shape only.
ACTIVATION_SHAPE = "kphi3-gate_up"
ACTIVATION_OPS = ("norm_io_split_fwd(activation)", "norm_io_fwd(activation)")


def smoke_launches(shape: str = SHAPE, m: int = M, dtype: str = DTYPE) -> List[Any]:
    """``RecordedLaunch`` objects, one per distinct (kernel, launch name, split count), in
    recording order."""
    from kphi3_kernels.ops import grouped_gemm

    from . import compile_report

    recorded = list(compile_report.record_launches(shape, m, dtype))
    previous = grouped_gemm.FORCE_SPLITS
    grouped_gemm.FORCE_SPLITS = SPLIT_K
    try:
        recorded += compile_report.record_launches(shape, SPLIT_M, dtype, ops=SPLIT_OPS)
    finally:
        grouped_gemm.FORCE_SPLITS = previous
    recorded += compile_report.record_launches(ACTIVATION_SHAPE, m, dtype, ops=ACTIVATION_OPS)
    seen, out = set(), []
    for rec in recorded:
        key = (_kernel_name(rec.launch.kernel), rec.launch.name, rec.launch.args.get("SPLIT_K"))
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def package_kernels() -> List[str]:
    """Names of the ``@triton.jit`` functions named ``*_kernel`` in ``kphi3_kernels.ops``."""
    import importlib
    import pkgutil

    import kphi3_kernels.ops as ops
    from triton.runtime.jit import JITFunction

    names = set()
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return sorted(names)


def on_device(args: Dict[str, Any], device) -> Dict[str, Any]:
    """The launch's arguments with every CPU tensor rebuilt on ``device`` (random normal values
    for floating tensors, zeros otherwise), storages shared as on the CPU."""
    import torch

    bases: Dict[Tuple[int, int], torch.Tensor] = {}
    out = {}
    for name, value in args.items():
        if not torch.is_tensor(value):
            out[name] = value
            continue
        storage = value.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        base = bases.get(key)
        if base is None:
            base = torch.zeros(max(storage.nbytes(), 1), dtype=torch.uint8, device=device)
            if value.dtype.is_floating_point and storage.nbytes() >= value.element_size():
                usable = storage.nbytes() // value.element_size() * value.element_size()
                base[:usable].view(value.dtype).normal_()
            bases[key] = base
        usable = base.numel() // value.element_size() * value.element_size()
        typed = base[:usable].view(value.dtype)
        out[name] = torch.as_strided(typed, value.size(), value.stride(), value.storage_offset())
    return out


def run(device=None, shape: str = SHAPE, m: int = M, dtype: str = DTYPE,
        echo=print) -> Tuple[List[dict], List[str]]:
    """Launch each kernel once; (one dict per launch, package kernels never launched)."""
    import torch

    from kphi3_kernels.ops.launch import config_kwargs

    device = device or torch.device("cuda")
    results = []
    launched = set()
    for rec in smoke_launches(shape, m, dtype):
        spec = rec.launch
        kernel = _kernel_name(spec.kernel)
        config = spec.configs[0]
        entry = {"kernel": kernel, "launch": spec.name, "op": rec.op, "shape": shape, "m": m,
                 "dtype": dtype, "config": str(config)}
        try:
            args = on_device(spec.args, device)
            with torch.cuda.device(device):
                spec.kernel[spec.grid](**args, **config_kwargs(config))
                torch.cuda.synchronize(device)
            entry["ok"] = True
            launched.add(kernel)
        except Exception as err:
            entry.update(ok=False, error=f"{type(err).__name__}: {err}")
        echo(f"{'ok ' if entry['ok'] else 'BAD'} {kernel}[{spec.name}] ({rec.op}) "
             f"{entry.get('error', '')}".rstrip())
        results.append(entry)
    missing = [k for k in package_kernels() if k not in launched]
    return results, missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kphi3_bench.kernel_smoke",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=SHAPE, help="a shape name (default %(default)s)")
    p.add_argument("--M", dest="m", type=int, default=M, help="tokens (default %(default)s)")
    p.add_argument("--dtype", default=DTYPE, choices=("bf16", "fp16", "fp32"),
                   help="(default %(default)s)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernel_smoke: needs a CUDA GPU", file=sys.stderr)
        return 2
    results, missing = run(torch.device("cuda"), args.shape, args.m, args.dtype)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results)} launches, {len(bad)} failed; kernels of the package not launched: "
          f"{', '.join(missing) if missing else 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
