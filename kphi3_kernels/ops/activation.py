"""The MLP activation ``up * silu(gate)`` and its gradients, as Triton helpers shared by the
activation producer (``rowwise.py``) and the grouped GEMM's activation-gradient epilogue.

Each is computed in the order torch computes the unfused ``up * F.silu(gate)`` and its autograd
formulas (``silu(x) = x / (1 + exp(-x))``, ``silu'(x) = s (1 + x (1 - s))`` with
``s = sigmoid(x)``), so that no intermediate overflows where torch's do not: ``up * gate`` first
would overflow for a large ``up`` and a very negative ``gate`` (``-88 * 1e37`` in fp32) where
``up * silu(gate)`` is finite, and ``up * gate * sigmoid(gate)`` gives NaN (``inf * 0``) where
torch gives ``-0``.
"""
import triton
import triton.language as tl


@triton.jit
def silu(x):
    """``x / (1 + exp(-x))``, as torch's SiLU: -0 (not NaN) far left, ``x`` far right."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def silu_mul(gate, up):
    """``up * silu(gate)``: the activation rounded once, by the caller."""
    return up * silu(gate)


@triton.jit
def silu_mul_grads(dh, gate, up):
    """``(d gate, d up)`` of ``h = up * silu(gate)`` for the gradient ``dh`` of ``h``, in
    autograd's order: ``d up = dh * silu(gate)``, ``d gate = (dh * up) * silu'(gate)``."""
    sig = 1.0 / (1.0 + tl.exp(-gate))
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    return dgate, dh * silu(gate)
