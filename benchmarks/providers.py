"""The providers a sweep compares, by name.

- ``triton``: the fused Triton kernels, ``kphi3_kernels.gpc_io(..., backend="triton")``; CUDA only
  (on a CPU it is shown as "needs a GPU", never timed through the interpreter);
- ``torch``: the PyTorch backend of the package, ``kphi3_kernels.gpc_io(..., backend="torch")``;
- ``reference``: ``kphi3_kernels.reference.gpc_io``, the plain einsum semantics (the oracle);
- ``torch.compile``: ``torch.compile(reference.gpc_io, dynamic=True)``: one compiled graph serves
  every M and shape (a sweep over M would turn dynamic after its first recompile anyway, and
  compiling each point anew costs minutes); compile time is spent in the warm-up, not timed;
  donated buffers are off so that the backward can be timed alone (see ``_configure_compile``);
- ``grouped_mm``: what a user would write with PyTorch's own grouped GEMM
  (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` on a torch that has only that):
  the IO block as one grouped GEMM of K = 2s per group, see ``GroupedMMProvider``; where torch
  refuses the device or dtype (it documents bf16 on CUDA) it is shown as unavailable, and why;
- ``nn.Linear``: a dense ``nn.Linear(in, out, bias=False)``, what a user would run instead. It is
  a different function, so it has no parity to check.

All grouped providers take the same weights (``w1``, ``w2`` ``[G, in/G, out/G]``); ``bind``
returns the one-argument callable that is checked and timed.
"""
from __future__ import annotations

import functools
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import kphi3_kernels
from kphi3_kernels import reference

from .shapes import Shape, dtype_name

Fn = Callable[[torch.Tensor], torch.Tensor]
NEEDS_GPU = "needs a GPU"


class Provider:
    """A way to compute the IO block (or the dense layer a user would run instead)."""

    name = "?"
    description = ""
    dense = False  # True: nn.Linear, a different function with its own weights and no parity

    def unavailable(self, device: torch.device, dtype: Optional[torch.dtype] = None
                    ) -> Optional[str]:
        """Why this provider cannot run on ``device`` in ``dtype`` (shown in its rows), or None."""
        return None

    def make_params(self, shape: Shape, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> List[torch.Tensor]:
        """Fresh leaf weights (requiring grad) for one input set."""
        return grouped_params(shape, dtype, device, generator)

    def bind(self, shape: Shape, params: Sequence[torch.Tensor]) -> Fn:
        raise NotImplementedError


def _randn(shape, dtype, device, generator, scale: float) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def grouped_params(shape: Shape, dtype: torch.dtype, device: torch.device,
                   generator: torch.Generator) -> List[torch.Tensor]:
    """``w1``, ``w2`` ``[G, s, og]``, scaled so that the output has unit variance (K = 2s)."""
    dims = (shape.groups, shape.in_per_group, shape.out_per_group)
    scale = (2 * shape.in_per_group) ** -0.5
    return [_randn(dims, dtype, device, generator, scale).requires_grad_() for _ in range(2)]


class TritonProvider(Provider):
    name = "triton"
    description = "fused Triton kernels: kphi3_kernels.gpc_io(backend='triton')"

    def unavailable(self, device, dtype=None):
        if device.type != "cuda":
            return NEEDS_GPU
        from kphi3_kernels.backend import triton_available

        return None if triton_available() else "unavailable: triton does not import"

    def bind(self, shape, params):
        w1, w2 = params
        return lambda x: kphi3_kernels.gpc_io(x, w1, w2, backend="triton")


class TorchBackendProvider(Provider):
    name = "torch"
    description = "the package's PyTorch backend: kphi3_kernels.gpc_io(backend='torch')"

    def bind(self, shape, params):
        w1, w2 = params
        return lambda x: kphi3_kernels.gpc_io(x, w1, w2, backend="torch")


class ReferenceProvider(Provider):
    name = "reference"
    description = "plain einsum semantics: kphi3_kernels.reference.gpc_io"

    def bind(self, shape, params):
        w1, w2 = params
        return lambda x: reference.gpc_io(x, w1, w2)


def _configure_compile(limit: int = 64) -> None:
    """Three process-wide settings the sweep needs from torch.compile.

    - Every (shape, M, grad mode) may cost dynamo a recompile; past its limit (8) it would fall
      back to eager silently, and a row would time eager code under torch.compile's name.
    - Donated buffers (the backward reusing saved activations' memory) forbid
      ``backward(retain_graph=True)``, which timing the backward alone needs; they save memory,
      not time, so they are switched off.
    - Inductor compiles in-process (``compile_threads = 1``): its default pool of worker
      processes starts in the background at the first compile and each worker imports torch,
      seconds of CPU that, on a 2-core machine, slowed the rows timed meanwhile by 10-40x.
    """
    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, key) and getattr(config, key) < limit:
            setattr(config, key, limit)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # a torch without the option has no donated buffers either
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def import_inductor_cpu_quietly() -> None:
    """Import ``torch.utils.mkldnn`` with its own deprecation warnings silenced, once.

    Inductor on a CPU imports ``torch.fx.experimental.optimization``, which imports
    ``torch.utils.mkldnn``, whose 14 ``@torch.jit.script_method`` decorators each warn that
    ``torch.jit.script_method`` is deprecated: torch's code, not ours, and nothing we can change
    by calling torch.compile differently. Importing the module here under a filter that matches
    only that message leaves every other warning alone; later imports find it cached."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is",
                                category=DeprecationWarning)
        import torch.utils.mkldnn  # noqa: F401


class CompileProvider(Provider):
    name = "torch.compile"
    description = "torch.compile(kphi3_kernels.reference.gpc_io, dynamic=True)"

    def __init__(self):
        self._compiled = None

    def unavailable(self, device, dtype=None):
        if device.type == "cuda":
            from kphi3_kernels.backend import triton_available

            return None if triton_available() else "unavailable: inductor needs triton on CUDA"
        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "unavailable: inductor needs a C++ compiler on CPU"
        return None

    def compiled(self):
        if self._compiled is None:
            _configure_compile()
            import_inductor_cpu_quietly()
            self._compiled = torch.compile(reference.gpc_io, dynamic=True)
        return self._compiled

    def bind(self, shape, params):
        w1, w2 = params
        fn = self.compiled()
        return lambda x: fn(x, w1, w2)


def grouped_mm_function() -> Tuple[Optional[Callable], str]:
    """PyTorch's grouped GEMM and its name: ``torch.nn.functional.grouped_mm`` (torch >= 2.10),
    else ``torch._grouped_mm`` (the private op it wraps), else ``(None, "")``."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return fn, "torch.nn.functional.grouped_mm"
    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        return fn, "torch._grouped_mm"
    return None, ""


def gpc_io_grouped_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      grouped_mm: Optional[Callable] = None) -> torch.Tensor:
    """The IO block written with PyTorch's grouped GEMM: ``y_g = [x_g, xi_g] @ [w1_g; w2_g]``.

    ``x_g`` is group g's slice of ``x`` (channels ``g*s .. g*s+s-1``), ``xi_g`` the same slice of
    the interleaved copy (``xi[m, g, j] = x[m, j*G + g]``), so each group is one GEMM of
    K = 2s: ``grouped_mm([G, M, 2s], [G, 2s, og]) -> [G, M, og]``, then back to ``[M, G*og]``.
    Costs beyond the GEMM: the concatenated operand (one copy of ``2x``), the concatenated
    weights (one copy of ``w1`` and ``w2``, per call, so that autograd reaches both) and the
    group-major output's transpose.
    """
    if grouped_mm is None:
        grouped_mm = grouped_mm_function()[0]
    groups, s, og = w1.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, groups * s)
    M = x2.shape[0]
    operand = torch.cat([x2.view(M, groups, s).transpose(0, 1),        # x_g:  [G, M, s]
                         x2.view(M, s, groups).permute(2, 0, 1)], dim=-1)  # xi_g: [G, M, s]
    weight = torch.cat([w1, w2], dim=1)  # [G, 2s, og]
    y = grouped_mm(operand, weight)  # operand: [G, M, 2s], contiguous; y: [G, M, og]
    return y.transpose(0, 1).reshape(*lead, groups * og)


@functools.lru_cache(maxsize=None)
def _grouped_mm_refusal(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """None when grouped_mm runs the IO block's forward and backward on a tiny input here, else
    why not (torch's own words)."""
    fn, name = grouped_mm_function()
    if fn is None:
        return f"unavailable: torch {torch.__version__} has no grouped_mm"
    try:
        device = torch.device(device_type)
        x = torch.randn(4, 64, device=device).to(dtype).requires_grad_()
        w1, w2 = (torch.randn(4, 16, 32, device=device).to(dtype).requires_grad_()
                  for _ in range(2))
        gpc_io_grouped_mm(x, w1, w2, fn).backward(torch.ones(4, 128, device=device, dtype=dtype))
    except Exception as err:  # the op's dtype/device checks say why
        words = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"unavailable: {name} refuses {dtype_name(dtype)} on {device_type} ({words[:120]})"
    return None


class GroupedMMProvider(Provider):
    """PyTorch's own grouped GEMM, as a user would write the IO block with it.

    Of the two natural formulations, two grouped GEMMs (``x_g @ w1_g`` and ``xi_g @ w2_g``)
    summed, or one of K = 2s on the concatenated operand ``[x_g, xi_g]`` and weights
    ``[w1_g; w2_g]``, this is the second (``gpc_io_grouped_mm``): one launch instead of two and
    no extra pass over the output to add the halves, at the price of copying ``x`` twice and the
    (G/2 times smaller) weights once. On CUDA, torch documents bf16 (SM >= 80) for its kernels;
    on a CPU its fallback runs fp32, bf16 and fp16. Whether it runs is asked of torch itself (a
    tiny forward and backward, once per device type and dtype); where it refuses, the rows say
    why instead of being timed.
    """

    name = "grouped_mm"
    description = ("torch's grouped GEMM (nn.functional.grouped_mm): one GEMM of K = 2s per "
                   "group on [x_g, interleaved x_g]")

    def unavailable(self, device, dtype=None):
        return _grouped_mm_refusal(device.type, dtype or torch.float32)

    def bind(self, shape, params):
        w1, w2 = params
        fn = grouped_mm_function()[0]
        return lambda x: gpc_io_grouped_mm(x, w1, w2, fn)


class LinearProvider(Provider):
    name = "nn.Linear"
    description = "dense nn.Linear(in, out, bias=False): what a user would run instead"
    dense = True

    def make_params(self, shape, dtype, device, generator):
        weight = _randn((shape.out_features, shape.in_features), dtype, device, generator,
                        shape.in_features ** -0.5)
        return [torch.nn.Parameter(weight)]

    def bind(self, shape, params):
        (weight,) = params
        layer = torch.nn.Linear(shape.in_features, shape.out_features, bias=False, device="meta")
        layer.weight = weight
        return layer


def default_providers() -> Dict[str, Provider]:
    """Fresh providers by name, in the order the table shows them (nn.Linear first)."""
    providers = (LinearProvider(), ReferenceProvider(), TorchBackendProvider(), CompileProvider(),
                 GroupedMMProvider(), TritonProvider())
    return {p.name: p for p in providers}


PROVIDER_NAMES = tuple(default_providers())


def resolve_providers(names: Sequence[str], available: Optional[Dict[str, Provider]] = None
                      ) -> List[Provider]:
    """Providers by name (case-insensitive), in the order given; a ValueError lists the known ones."""
    available = available if available is not None else default_providers()
    by_lower = {k.lower(): v for k, v in available.items()}
    chosen: List[Provider] = []
    for raw in names:
        provider = by_lower.get(raw.strip().lower())
        if provider is None:
            raise ValueError(f"unknown provider {raw.strip()!r}; known providers: "
                             f"{', '.join(available)}")
        if provider not in chosen:
            chosen.append(provider)
    return chosen
