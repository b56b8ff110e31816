"""kphi3_kernels: fused Triton kernels for KPhi-3's grouped layers, with a PyTorch fallback.

Read in this order to follow one forward call: ``modules.py`` (drop-in layers) ->
``functional.py`` (checks, autocast, backend choice) -> ``ops/custom_ops.py`` (the
``torch.ops.kphi3`` operators and their autograd formulas) -> ``ops/triton_impl.py`` /
``ops/torch_impl.py`` (launchers) -> ``ops/grouped_gemm.py`` (the kernel) via ``ops/launch.py``.
"""
from .backend import (
    BACKENDS,
    explain_backend,
    get_backend,
    resolve_backend,
    set_backend,
    use_backend,
)
from .functional import gpc_block, gpc_io, grouped_linear, interleave
from .modules import (
    GroupedLinear,
    GroupedLinearFast,
    GroupedPointwiseConvolutionBlock,
    GroupedPointwiseConvolutionBlockIO,
    InterleaveChannels,
    InterleaveChannelsFast,
    SignedSquareRoot1,
)
from .reference import get_max_acceptable_common_divisor, group_count
from . import fused, layout  # noqa: E402  (the fused decoder's functions; the block-residue layout)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "resolve_backend", "explain_backend",
    "grouped_linear", "gpc_io", "gpc_block", "interleave",
    "GroupedLinear", "GroupedLinearFast", "GroupedPointwiseConvolutionBlock",
    "GroupedPointwiseConvolutionBlockIO", "InterleaveChannels", "InterleaveChannelsFast",
    "SignedSquareRoot1",
    "group_count", "get_max_acceptable_common_divisor",
    "fused", "layout",
]
