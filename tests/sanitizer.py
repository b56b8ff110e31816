"""A race and bounds sanitizer for Triton kernels run through Triton's CPU interpreter.

The interpreter runs the programs of a launch one after another; a GPU runs them at once. A kernel
whose programs read what another program of the same launch writes, write the same bytes, or touch
bytes outside their tensors passes every interpreter test and fails now and then on a GPU. While
the sanitizer is installed, every interpreted launch is checked:

* the bytes each program (grid index) loads, stores and updates atomically are recorded;
* (a) two programs storing the same byte, (b) a program loading a byte that another program
  stores, and (c) an access outside every tensor argument fail the launch (atomics may meet
  atomics of other programs: that is what they are for);
* the launch is run a second time with its programs in a shuffled (seeded) order, from the same
  inputs, and every tensor argument must come out bitwise identical.

It hooks Triton's interpreter itself (``InterpreterBuilder`` and ``GridExecutor``, the same on
Triton 3.6 and 3.9), so it sees every interpreted launch, this package's and a test's own. A
violation raises ``SanitizerError`` (an ``AssertionError``) naming the kernel, the programs, the
tensor argument and the byte offset.

Use ``install()``/``uninstall()`` (the test suite's ``--sanitize`` option) or
``with sanitizing():``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

ENV_VAR = "KPHI3_SANITIZE"
SEED_ENV_VAR = "KPHI3_SANITIZE_SEED"


class SanitizerError(AssertionError):
    """A launch whose programs race, overrun their tensors or depend on their order."""


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


# ----------------------------------------------------------------------------------------------
# What one launch did
# ----------------------------------------------------------------------------------------------

LOAD, STORE, ATOMIC = "load", "store", "atomic"


@dataclass
class Accesses:
    """Element accesses of one kind, flattened: start address, size in bytes, program."""

    starts: np.ndarray
    sizes: np.ndarray
    pids: np.ndarray

    @property
    def ends(self) -> np.ndarray:
        return self.starts + self.sizes

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class TensorArg:
    """A tensor argument as the kernel sees it: its name and the bytes it may address."""

    name: str
    data_ptr: int
    lo: int      # first byte its sizes and strides can address
    hi: int      # one past the last


@dataclass
class LaunchLog:
    """Everything recorded about one launch while its programs run in natural order."""

    kernel: str
    chunks: Dict[str, List[Tuple[np.ndarray, int, int]]] = field(
        default_factory=lambda: {LOAD: [], STORE: [], ATOMIC: []})
    host_args: Optional[List[TensorArg]] = None
    grid: Tuple[int, int, int] = (1, 1, 1)
    programs: int = 0

    def add(self, kind: str, addrs: np.ndarray, pid: int, size: int) -> None:
        self.chunks[kind].append((addrs, pid, size))

    def accesses(self, kind: str) -> Accesses:
        chunks = self.chunks[kind]
        if not chunks:
            empty = np.zeros(0, dtype=np.uint64)
            return Accesses(empty, empty, np.zeros(0, dtype=np.int64))
        counts = [len(c[0]) for c in chunks]
        return Accesses(
            starts=np.concatenate([c[0] for c in chunks]).astype(np.uint64, copy=False),
            sizes=np.repeat(np.array([c[2] for c in chunks], dtype=np.uint64), counts),
            pids=np.repeat(np.array([c[1] for c in chunks], dtype=np.int64), counts))

    def program(self, pid: int) -> Tuple[int, int, int]:
        _, ny, nz = self.grid
        return (int(pid) // (ny * nz), (int(pid) // nz) % ny, int(pid) % nz)


# ----------------------------------------------------------------------------------------------
# Tensor arguments and their extents
# ----------------------------------------------------------------------------------------------

def tensor_args(names: Sequence[str], args: Sequence[Any], kwargs: Dict[str, Any]
                ) -> List[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor among a launch's arguments (in tuples and descriptors
    too)."""
    found: List[Tuple[str, torch.Tensor]] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                visit(f"{name}[{i}]", item)
        elif hasattr(value, "base") and hasattr(value, "block_shape"):   # TensorDescriptor
            visit(f"{name}.base", value.base)
        elif isinstance(value, torch.Tensor):
            found.append((name, value))
        elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):
            found.append((name, value.base))                              # TensorWrapper

    for i, value in enumerate(args):
        visit(names[i] if i < len(names) else f"arg{i}", value)
    for name, value in kwargs.items():
        visit(name, value)
    return found


def byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """``(lo, hi)`` relative to ``t.data_ptr()``: the bytes its sizes and strides can address."""
    if t.numel() == 0:
        return 0, 0
    below = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    above = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return below * t.element_size(), (above + 1) * t.element_size()


def describe_args(pairs: Sequence[Tuple[str, torch.Tensor]]) -> List[TensorArg]:
    out = []
    for name, t in pairs:
        lo, hi = byte_span(t)
        if hi > lo:
            out.append(TensorArg(name, t.data_ptr(), t.data_ptr() + lo, t.data_ptr() + hi))
    return out


def locate(addr: int, args: Sequence[TensorArg]) -> str:
    """Where an address lies, in terms of the launch's tensor arguments."""
    inside = [a for a in args if a.lo <= addr < a.hi]
    if inside:
        names = "/".join(f"'{a.name}'" for a in inside)
        return f"byte offset {addr - inside[0].data_ptr} of {names}"
    if not args:
        return f"address {addr:#x} (the launch has no tensor arguments)"
    nearest = min(args, key=lambda a: min(abs(addr - a.lo), abs(addr - (a.hi - 1))))
    return (f"byte offset {addr - nearest.data_ptr} of '{nearest.name}', outside it "
            f"(it spans bytes {nearest.lo - nearest.data_ptr} to {nearest.hi - nearest.data_ptr})")


# ----------------------------------------------------------------------------------------------
# The checks (numpy: sorted byte tables and searchsorted, no per-element Python)
# ----------------------------------------------------------------------------------------------

@dataclass
class ByteTable:
    """Every byte an access set touches, sorted by (byte, program), one row per pair."""

    bytes: np.ndarray
    pids: np.ndarray
    _next_change: Optional[np.ndarray] = None

    @classmethod
    def of(cls, acc: Accesses) -> "ByteTable":
        parts_b, parts_p = [], []
        for size in np.unique(acc.sizes):
            sel = acc.sizes == size
            offsets = np.arange(int(size), dtype=np.uint64)
            parts_b.append((acc.starts[sel][:, None] + offsets).ravel())
            parts_p.append(np.repeat(acc.pids[sel], int(size)))
        if not parts_b:
            return cls(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))
        b, p = np.concatenate(parts_b), np.concatenate(parts_p)
        order = np.lexsort((p, b))
        b, p = b[order], p[order]
        keep = np.ones(len(b), dtype=bool)
        keep[1:] = (b[1:] != b[:-1]) | (p[1:] != p[:-1])
        return cls(b[keep], p[keep])

    def shared_bytes(self) -> np.ndarray:
        """Rows i whose byte row i+1 has too, from another program."""
        return np.nonzero(self.bytes[1:] == self.bytes[:-1])[0]

    def foreign_hits(self, starts: np.ndarray, ends: np.ndarray, pids: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """For intervals ``[starts, ends)`` of programs ``pids``: the intervals that contain a
        byte of this table owned by another program, and that byte's row."""
        if len(self.bytes) == 0 or len(starts) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        lo = np.searchsorted(self.bytes, starts, side="left")
        hi = np.searchsorted(self.bytes, ends, side="left")
        cand = np.nonzero(hi > lo)[0]
        lo, hi = lo[cand], hi[cand]
        first_other = lo.copy()
        same = self.pids[lo] == pids[cand]
        # A row run owned by the query's own program: the first row after it is another's.
        first_other[same] = self.next_change()[lo[same]]
        hit = first_other < hi
        return cand[hit], first_other[hit]

    def next_change(self) -> np.ndarray:
        """Row i -> the first row after i owned by another program (len if none)."""
        if self._next_change is None:
            changes = np.nonzero(self.pids[1:] != self.pids[:-1])[0] + 1
            changes = np.append(changes, len(self.pids))
            rows = np.arange(len(self.pids))
            self._next_change = changes[np.searchsorted(changes, rows, side="right")]
        return self._next_change


def merged_extents(args: Sequence[TensorArg]) -> Tuple[np.ndarray, np.ndarray]:
    """The union of the arguments' extents as sorted, disjoint ``[lo, hi)`` intervals."""
    spans = sorted((a.lo, a.hi) for a in args)
    merged: List[List[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    arr = np.array(merged, dtype=np.uint64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def out_of_bounds(acc: Accesses, args: Sequence[TensorArg]) -> np.ndarray:
    """Indices of the accesses not inside any tensor argument's extent."""
    if len(acc) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = merged_extents(args)
    if len(lo) == 0:
        return np.arange(len(acc))
    idx = np.searchsorted(lo, acc.starts, side="right") - 1
    inside = idx >= 0
    inside[inside] &= acc.ends[inside] <= hi[idx[inside]]
    return np.nonzero(~inside)[0]


def check_launch(log: LaunchLog, where: str) -> Tuple[List[str], ByteTable]:
    """The violations of one launch (a message each), and its plain stores' byte table."""
    args = log.host_args or []
    loads, stores, atomics = log.accesses(LOAD), log.accesses(STORE), log.accesses(ATOMIC)
    problems: List[str] = []

    for kind, acc in ((STORE, stores), (LOAD, loads), (ATOMIC, atomics)):
        bad = out_of_bounds(acc, args)
        if len(bad):
            i = bad[0]
            problems.append(
                f"{where}: out-of-bounds {kind} by program {log.program(acc.pids[i])} of "
                f"{int(acc.sizes[i])} bytes at {locate(int(acc.starts[i]), args)}"
                f"{_more(len(bad), 'out-of-bounds ' + kind + 's')}")

    written = ByteTable.of(stores)
    shared = written.shared_bytes()
    if len(shared):
        i = shared[0]
        problems.append(
            f"{where}: programs {log.program(written.pids[i])} and "
            f"{log.program(written.pids[i + 1])} both store {locate(int(written.bytes[i]), args)}"
            f"{_more(len(shared), 'bytes stored by two programs')}")

    updated = ByteTable.of(atomics) if len(atomics) else None
    for reader, reader_kind, table, table_kind in (
            (stores, "stores", updated, "updates atomically"),
            (loads, "loads", written, "stores"),
            (loads, "loads", updated, "updates atomically")):
        if table is None or len(reader) == 0:
            continue
        hits, rows = table.foreign_hits(reader.starts, reader.ends, reader.pids)
        if len(hits):
            q, r = hits[0], rows[0]
            problems.append(
                f"{where}: program {log.program(reader.pids[q])} {reader_kind} "
                f"{locate(int(table.bytes[r]), args)}, which program "
                f"{log.program(table.pids[r])} {table_kind}{_more(len(hits), 'such accesses')}")
    return problems, written


def _more(count: int, what: str) -> str:
    return f" ({count - 1} more {what})" if count > 1 else ""


# ----------------------------------------------------------------------------------------------
# Statistics for the summary
# ----------------------------------------------------------------------------------------------

@dataclass
class KernelStats:
    kernel: str
    launches: int = 0
    programs: int = 0
    bytes_checked: int = 0
    shuffled: int = 0
    violations: int = 0


# ----------------------------------------------------------------------------------------------
# The interpreter hooks
# ----------------------------------------------------------------------------------------------

class Sanitizer:
    """Hooks into Triton's interpreter; one instance, installed with a reference count."""

    def __init__(self) -> None:
        self.stats: Dict[str, KernelStats] = {}
        self.violations: List[str] = []
        self.seed = int(os.environ.get(SEED_ENV_VAR, "0"))
        self._installs = 0
        self._saved: List[Tuple[Any, str, Any]] = []
        # Per-launch state, read by the hooks.
        self._log: Optional[LaunchLog] = None
        self._pid = 0
        self._atomic_depth = 0
        self._order: Optional[np.ndarray] = None
        self._order_seed = 0
        self._calls = 0
        self._busy = False

    # -- installing -----------------------------------------------------------------------------

    def install(self) -> None:
        self._installs += 1
        if self._installs > 1:
            return
        from triton.runtime import interpreter as itp

        builder, executor = itp.InterpreterBuilder, itp.GridExecutor
        self._patch(builder, "set_grid_idx", self._hook_set_grid_idx)
        self._patch(builder, "create_masked_load", self._hook_masked(LOAD, mask_at=1))
        self._patch(builder, "create_masked_store", self._hook_masked(STORE, mask_at=2))
        self._patch(builder, "create_atomic_rmw", self._hook_atomic(ptr_at=1, mask_at=3))
        self._patch(builder, "create_atomic_cas", self._hook_atomic(ptr_at=0, mask_at=None))
        # Triton 3.9's atomic load and store reach the masked load and store: mark them atomic.
        for name in ("create_atomic_load", "create_atomic_store"):
            if hasattr(builder, name):
                self._patch(builder, name, self._hook_as_atomic)
        self._patch(executor, "_init_args_hst", self._hook_init_args_hst)
        self._patch(executor, "__call__", self._hook_launch)

    def uninstall(self) -> None:
        self._installs -= 1
        if self._installs > 0:
            return
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    @property
    def installed(self) -> bool:
        return self._installs > 0

    def _patch(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = owner.__dict__[name]
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    # -- recording ------------------------------------------------------------------------------

    def _hook_set_grid_idx(self, original):
        san = self

        def set_grid_idx(builder, x, y, z):
            if san._order is not None:          # shuffled run: the k-th program is order[k]
                nx, ny, nz = builder.grid_dim
                if san._calls == 0:
                    san._order = shuffled_order(nx * ny * nz, san._order_seed)
                linear = int(san._order[san._calls])
                x, y, z = linear // (ny * nz), (linear // nz) % ny, linear % nz
            san._calls += 1
            original(builder, x, y, z)
            _, ny, nz = builder.grid_dim
            san._pid = (x * ny + y) * nz + z
        return set_grid_idx

    def _record(self, kind: str, ptrs, mask) -> None:
        log = self._log
        if log is None:
            return
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
            addrs = addrs[lanes]                     # only the unmasked lanes touch memory
        else:
            addrs = addrs.ravel().copy()
        if addrs.size == 0:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)   # int1 is stored as a byte
        log.add(ATOMIC if self._atomic_depth else kind, addrs, self._pid, size)

    def _hook_masked(self, kind: str, mask_at: int):
        san = self

        def make(original):
            def masked(builder, *args, **kwargs):
                mask = args[mask_at] if len(args) > mask_at else kwargs.get("mask")
                san._record(kind, args[0], mask)
                return original(builder, *args, **kwargs)
            return masked
        return make

    def _hook_atomic(self, ptr_at: int, mask_at: Optional[int]):
        san = self

        def make(original):
            def atomic(builder, *args, **kwargs):
                mask = None
                if mask_at is not None:
                    mask = args[mask_at] if len(args) > mask_at else kwargs.get("mask")
                san._record(ATOMIC, args[ptr_at] if len(args) > ptr_at else kwargs["ptr"], mask)
                return original(builder, *args, **kwargs)
            return atomic
        return make

    def _hook_as_atomic(self, original):
        san = self

        def atomic(builder, *args, **kwargs):
            san._atomic_depth += 1
            try:
                return original(builder, *args, **kwargs)
            finally:
                san._atomic_depth -= 1
        return atomic

    def _hook_init_args_hst(self, original):
        san = self

        def init_args_hst(executor, args_dev, kwargs):
            args_hst, kwargs_hst = original(executor, args_dev, kwargs)
            if san._log is not None:
                # The kernel addresses these (host copies of device tensors; the same memory for
                # CPU tensors): their extents are the ones that count.
                san._log.host_args = describe_args(
                    tensor_args(executor.arg_names, args_hst, kwargs_hst))
            return args_hst, kwargs_hst
        return init_args_hst

    # -- one launch -----------------------------------------------------------------------------

    def _hook_launch(self, original):
        san = self

        def call(executor, *args, **kwargs):
            if san._busy:
                return original(executor, *args, **kwargs)
            san._busy = True
            try:
                san._sanitized_launch(original, executor, args, kwargs)
            finally:
                san._busy = False
                san._log, san._order = None, None
        return call

    def _sanitized_launch(self, original, executor, args, kwargs) -> None:
        kernel = getattr(executor.fn, "__name__", "kernel")
        label = launch_label(kernel)
        where = f"kernel {kernel}" + (f" (launch '{label}')" if label != kernel else "")
        stats = self.stats.setdefault(label, KernelStats(kernel))
        tensors = tensor_args(executor.arg_names, args, kwargs)
        before = ByteSnapshot.of(tensors)

        log = LaunchLog(kernel)
        self._log, self._calls, self._order = log, 0, None
        original(executor, *args, **kwargs)
        self._log = None
        log.programs = self._calls
        from triton.runtime.interpreter import interpreter_builder
        log.grid = tuple(interpreter_builder.grid_dim)
        if log.host_args is None:
            log.host_args = describe_args(tensors)

        stats.launches += 1
        stats.programs += log.programs
        stats.bytes_checked += sum(int(a.size) * size for chunks in log.chunks.values()
                                   for a, _, size in chunks)
        problems, written = check_launch(log, where)
        if not problems and log.programs > 1:
            problems += self._shuffled_rerun(original, executor, args, kwargs, before, log,
                                             written, where, label)
            stats.shuffled += 1
        if problems:
            stats.violations += len(problems)
            self.violations += problems
            raise SanitizerError("\n".join(problems))

    def _shuffled_rerun(self, original, executor, args, kwargs, before: "ByteSnapshot",
                        log: LaunchLog, written: ByteTable, where: str, label: str) -> List[str]:
        """Run the launch again from the same inputs with its programs shuffled; compare."""
        natural = before.current()
        before.restore()
        self._calls, self._order = 0, np.zeros(0, dtype=np.int64)
        self._order_seed = zlib.crc32(f"{label}{log.grid}".encode()) ^ self.seed
        original(executor, *args, **kwargs)
        self._order = None
        addr = before.first_difference(natural)
        if addr is None:
            return []
        args_ = log.host_args or []
        row = np.searchsorted(written.bytes, np.uint64(addr))
        writer = ""
        if row < len(written.bytes) and int(written.bytes[row]) == addr:
            writer = f", stored by program {log.program(written.pids[row])}"
        return [f"{where}: the result depends on the order of the programs: "
                f"{locate(addr, args_)}{writer} differs between the natural order and a shuffled "
                f"order (seed {self._order_seed})"]


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` that is never the identity (for n > 1)."""
    order = np.random.default_rng(seed).permutation(n)
    if n > 1 and np.array_equal(order, np.arange(n)):
        order = order[::-1].copy()
    return order


def launch_label(kernel: str) -> str:
    """The name of this package's launch (``KernelLaunch.name``) running now, else the kernel's.

    Every launch of the package passes through ``kphi3_kernels.ops.launch.launch(spec)``: its
    frame, up the stack, holds the spec."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "launch" and code.co_filename.endswith(os.path.join("ops", "launch.py")):
            name = getattr(frame.f_locals.get("spec"), "name", None)
            return f"{kernel}[{name}]" if name else kernel
        frame = frame.f_back
    return kernel


class ByteSnapshot:
    """The bytes of a launch's tensor arguments (over each one's extent), as raw uint8 views, so
    that NaN poison compares equal to itself. CPU bytes go through numpy: single-threaded, it
    stays fast on a loaded machine where torch's small parallel copies stall."""

    def __init__(self, views: List[Any]) -> None:
        self.views = views
        self.saved = self.current()

    @classmethod
    def of(cls, tensors: Sequence[Tuple[str, torch.Tensor]]) -> "ByteSnapshot":
        views, seen = [], set()
        for _, t in tensors:
            lo, hi = byte_span(t)
            if hi <= lo:
                continue
            storage = t.untyped_storage()
            start = t.storage_offset() * t.element_size() + lo
            key = (storage.data_ptr(), start, hi - lo)
            if key in seen:
                continue
            seen.add(key)
            view = torch.empty(0, dtype=torch.uint8, device=t.device)
            view.set_(storage, start, (hi - lo,), (1,))
            views.append(view.numpy() if view.device.type == "cpu" else view)
        return cls(views)

    def current(self) -> List[Any]:
        return [v.copy() if isinstance(v, np.ndarray) else v.clone() for v in self.views]

    def restore(self) -> None:
        for view, saved in zip(self.views, self.saved):
            if isinstance(view, np.ndarray):
                np.copyto(view, saved)
            else:
                view.copy_(saved)

    def first_difference(self, other: List[Any]) -> Optional[int]:
        """The address of the first byte that differs from ``other``, None if all are equal."""
        for view, theirs in zip(self.views, other):
            if isinstance(view, np.ndarray):
                if not np.array_equal(view, theirs):
                    return view.ctypes.data + int(np.flatnonzero(view != theirs)[0])
            elif not torch.equal(view, theirs):
                return view.data_ptr() + int(torch.nonzero(view != theirs)[0, 0])
        return None


SANITIZER = Sanitizer()


def install() -> Sanitizer:
    SANITIZER.install()
    return SANITIZER


def uninstall() -> None:
    SANITIZER.uninstall()


@contextlib.contextmanager
def sanitizing() -> Iterator[Sanitizer]:
    """Check every interpreted launch inside the block."""
    SANITIZER.install()
    try:
        yield SANITIZER
    finally:
        SANITIZER.uninstall()


# The tests marked ``sanitize`` (by conftest), which CI runs under ``--sanitize``: every GPU config
# of the GEMM kernels and of the norm head forced through the interpreter (the tilings a GPU may
# autotune to), and small tests that together reach every launch of the package, in its variants
# (bias, residual, frozen weights, strided and expanded gradients, empty and one-row batches,
# NaN-poisoned inputs, autocast). By test function: every parametrization of each runs.
SANITIZE_SUBSET: Dict[str, Tuple[str, ...]] = {
    "test_ops_parity.py": (
        "test_every_gpu_config_interpreted",
        "test_expanded_and_strided_upstream_grads",
        "test_partial_requires_grad",
        "test_one_dimensional_input",
        "test_empty_batch",
        "test_nan_inf_propagate_like_reference",
        "test_interleave_parity",
        "test_non_contiguous_bias",
        "test_inference_mode",
        "test_gpc_io_inference_forward_is_one_launch_at_decode_sizes",
        "test_gpc_io_with_frozen_weight2",
        "test_triton_float64_matches_oracle",
        "test_gpc_io_fused_variant_parity",
        "test_gpc_io_dx_meets_its_rounding_bound_when_dxi_dominates",
    ),
    "test_fused_decoder.py": (
        "test_every_gpu_config_of_the_layout_gemms_interpreted",
        "test_every_gpu_config_of_the_norm_head_interpreted",
        "test_norm_head_with_the_residual_add_matches_the_float64_oracle",
        "test_fused_model_under_autocast_matches_the_op_level_model",
        "test_active_residual_dropout_keeps_the_adds_apart",
        "test_layout_padding_is_written_as_zeros_and_never_read",
        "test_weight_gradients_alone_and_frozen_weights",
        "test_fused_norm_under_autocast_keeps_the_norm_in_fp32",
        "test_the_stream_fuses_around_projections_that_are_no_grouped_blocks",
    ),
    "test_residual_norm.py": (
        "test_every_gpu_config_of_the_residual_epilogue_interpreted",
        "test_rms_norm_matches_the_float64_oracle",
        "test_add_rms_norm_matches_the_float64_oracle",
        "test_add_rms_norm_gradient_subsets",
        "test_poisoned_outputs_leak_no_nan",
        "test_nan_and_inf_propagate_like_the_oracle",
        "test_a_float64_residual_is_added_in_float64",
        "test_mlp_tail_residual_alone_and_frozen_block",
        "test_rms_norm_of_fp16_input_with_an_fp32_weight",
    ),
    "test_activation_layout.py": (
        "test_every_gpu_config_of_the_activation_layout_interpreted",
        "test_the_epilogue_runs_where_the_tile_fits",
    ),
    "test_split_k.py": (
        "test_every_gpu_config_with_split_k_interpreted",
        "test_split_weight_gradients_are_bitwise_equal_run_to_run",
    ),
}


def mark_subset(items, marker) -> List[str]:
    """Mark the items of ``SANITIZE_SUBSET``; return the listed tests missing from a collected
    file (a renamed test would otherwise drop out of the subset unnoticed)."""
    collected: Dict[str, set] = {}
    for item in items:
        file = os.path.basename(str(item.path))
        name = getattr(item, "originalname", item.name)
        collected.setdefault(file, set()).add(name)
        if name in SANITIZE_SUBSET.get(file, ()):
            item.add_marker(marker)
    return [f"{file}::{name}" for file, names in SANITIZE_SUBSET.items() if file in collected
            for name in names if name not in collected[file]]


def package_kernels(package: str = "kphi3_kernels.ops") -> List[str]:
    """The names of the launchable kernels of a package: its modules' ``@triton.jit`` functions
    named ``*_kernel`` (the device helpers they call are not launched on their own)."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    names = set()
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and type(value).__name__ in ("InterpretedFunction",
                                                                      "JITFunction"):
                names.add(name)
    return sorted(names)


def kernels_not_launched(san: "Sanitizer", package: str = "kphi3_kernels.ops") -> List[str]:
    seen = {s.kernel for s in san.stats.values()}
    return [k for k in package_kernels(package) if k not in seen]


def summary_lines(san: Sanitizer = SANITIZER) -> List[str]:
    """The terminal summary: kernels, launches, programs, bytes checked, violations."""
    stats = sorted(san.stats.items())
    launches = sum(s.launches for _, s in stats)
    programs = sum(s.programs for _, s in stats)
    checked = sum(s.bytes_checked for _, s in stats)
    kernels = len({s.kernel for _, s in stats})
    lines = [f"{launches} launches of {kernels} kernel(s) ({len(stats)} launch names), {programs} "
             f"programs, {_bytes(checked)} of accesses checked, {len(san.violations)} violations"]
    width = max([len(k) for k, _ in stats] + [6])
    lines.append(f"{'launch':<{width}}  {'launches':>8}  {'shuffled':>8}  {'programs':>9}  "
                 f"{'checked':>10}  violations")
    for name, s in stats:
        lines.append(f"{name:<{width}}  {s.launches:>8}  {s.shuffled:>8}  {s.programs:>9}  "
                     f"{_bytes(s.bytes_checked):>10}  {s.violations}")
    lines += san.violations[:20]
    return lines


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
