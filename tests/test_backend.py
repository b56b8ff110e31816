"""The backend flag: set/get/use_backend, KPHI3_BACKEND, resolve_backend / explain_backend, the
precedence of the four ways to choose, the one-time fallback warning, and dispatch."""
import threading

import pytest
import torch

import kphi3_kernels
from kphi3_kernels import backend as B
from kphi3_kernels import get_backend, resolve_backend, set_backend, use_backend

from _utils import spy_impls

CPU = torch.zeros(2, 3)


def test_backends_tuple():
    assert kphi3_kernels.BACKENDS == ("auto", "triton", "torch")


@pytest.mark.parametrize("name,expected", [("auto", "auto"), ("triton", "triton"),
                                           ("torch", "torch"), (" Torch ", "torch"),
                                           ("TRITON", "triton")])
def test_set_get_backend(name, expected):
    set_backend(name)
    assert get_backend() == expected


@pytest.mark.parametrize("bad", ["cuda", "", "tritonn", None, 1])
def test_unknown_backend_names_raise_listing_valid_names(bad):
    set_backend("torch")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        set_backend(bad)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        with use_backend(bad):
            pass  # pragma: no cover
    if bad is not None:  # resolve_backend's override None means "follow the flag"
        with pytest.raises(ValueError, match="auto, triton, torch"):
            resolve_backend(CPU, bad)
    assert get_backend() == "torch"  # a rejected name changes nothing


def test_use_backend_restores_on_exit_and_nests():
    set_backend("torch")
    with use_backend("triton") as name:
        assert name == "triton" and get_backend() == "triton"
        with use_backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "triton"
    assert get_backend() == "torch"


def test_use_backend_restores_on_exception():
    set_backend("triton")
    with pytest.raises(RuntimeError, match="boom"):
        with use_backend("torch"):
            assert get_backend() == "torch"
            raise RuntimeError("boom")
    assert get_backend() == "triton"


def test_env_var_is_the_default(monkeypatch):
    monkeypatch.setattr(B._state, "name", None)  # no explicit choice in this thread
    monkeypatch.delenv("KPHI3_BACKEND", raising=False)
    assert get_backend() == "auto"
    monkeypatch.setenv("KPHI3_BACKEND", "torch")
    assert get_backend() == "torch"
    monkeypatch.setenv("KPHI3_BACKEND", " Triton")
    assert get_backend() == "triton"
    set_backend("auto")  # an explicit choice wins over the environment
    assert get_backend() == "auto"


def test_use_backend_restores_env_default(monkeypatch):
    monkeypatch.setattr(B._state, "name", None)
    monkeypatch.setenv("KPHI3_BACKEND", "torch")
    with use_backend("triton"):
        assert get_backend() == "triton"
    assert get_backend() == "torch"
    monkeypatch.setenv("KPHI3_BACKEND", "triton")  # still read from the environment afterwards
    assert get_backend() == "triton"


def test_bad_env_var_names_the_variable(monkeypatch):
    monkeypatch.setattr(B._state, "name", None)
    monkeypatch.setenv("KPHI3_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KPHI3_BACKEND") as info:
        get_backend()
    assert "auto, triton, torch" in str(info.value)


def test_env_var_drives_dispatch(monkeypatch):
    monkeypatch.setattr(B._state, "name", None)
    monkeypatch.setenv("KPHI3_BACKEND", "triton")
    if not torch.cuda.is_available() and not B.triton_interpreting():
        pytest.skip("needs a GPU or the interpreter")  # pragma: no cover
    calls = spy_impls(monkeypatch)
    x = torch.randn(3, 6, device="cuda" if torch.cuda.is_available() else "cpu")
    kphi3_kernels.interleave(x, 2)
    assert {b for b, _ in calls} == {"triton"}


def test_flag_is_per_thread(monkeypatch):
    monkeypatch.setenv("KPHI3_BACKEND", "auto")
    set_backend("torch")
    seen = []
    t = threading.Thread(target=lambda: seen.append(get_backend()))
    t.start()
    t.join()
    assert seen == ["auto"]  # the other thread starts from the environment
    assert get_backend() == "torch"


# --------------------------------------------------------------------------------------------
# resolve_backend
# --------------------------------------------------------------------------------------------


def test_resolve_auto_is_torch_on_cpu():
    set_backend("auto")
    assert resolve_backend(CPU) == "torch"
    assert resolve_backend(CPU, "auto") == "torch"


def test_resolve_torch_always_torch():
    with use_backend("triton"):
        assert resolve_backend(CPU, "torch") == "torch"
    set_backend("torch")
    assert resolve_backend(CPU) == "torch"


def test_resolve_triton_on_cpu_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU, "triton") == "triton"
    with use_backend("triton"):
        assert resolve_backend(CPU) == "triton"


def test_resolve_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend(CPU, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend(CPU)
    # ... and the error surfaces from the ops before anything runs
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kphi3_kernels.interleave(torch.randn(2, 4), 2, backend="triton")


def test_resolve_triton_when_triton_missing(monkeypatch):
    monkeypatch.setattr(B, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="not importable"):
        resolve_backend(CPU, "triton")
    assert resolve_backend(CPU, "auto") == "torch"


def test_resolve_meta_tensor_triton_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="meta"):
        resolve_backend(torch.empty(2, 3, device="meta"), "triton")
    assert resolve_backend(torch.empty(2, 3, device="meta"), "auto") == "torch"


@pytest.mark.gpu
def test_resolve_auto_is_triton_on_cuda(monkeypatch):
    x = torch.zeros(2, 3, device="cuda")
    assert resolve_backend(x, "auto") == "triton"
    assert resolve_backend(x, "triton") == "triton"
    assert resolve_backend(x, "torch") == "torch"
    monkeypatch.setattr(B, "triton_available", lambda: False)
    assert resolve_backend(x, "auto") == "torch"


# --------------------------------------------------------------------------------------------
# Dispatch follows the flag
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,expected", [("torch", "torch"), ("triton", "triton"),
                                           ("auto", "cuda-dependent")])
def test_ops_dispatch_on_global_flag(flag, expected, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cuda-dependent":
        expected = "triton" if device == "cuda" else "torch"
    calls = spy_impls(monkeypatch)
    x = torch.randn(3, 6, device=device, requires_grad=True)
    w = torch.randn(2, 3, 2, device=device, requires_grad=True)
    with use_backend(flag):
        ys = [kphi3_kernels.grouped_linear(x, w), kphi3_kernels.gpc_io(x, w, w),
              kphi3_kernels.gpc_block(x, w), kphi3_kernels.interleave(x, 3)]
        sum(y.sum() for y in ys).backward()
    assert {b for b, _ in calls} == {expected}
    names = {n for _, n in calls}
    assert {"grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd",
            "gpc_block_fwd", "gpc_block_bwd", "interleave_fwd"} <= names


def test_explicit_backend_argument_beats_flag(monkeypatch):
    calls = spy_impls(monkeypatch)
    x = torch.randn(3, 6)
    with use_backend("triton"):
        kphi3_kernels.interleave(x, 2, backend="torch")
    assert calls == [("torch", "interleave_fwd")]


# --------------------------------------------------------------------------------------------
# Precedence: module attribute / backend= > use_backend > set_backend > KPHI3_BACKEND > "auto"
# --------------------------------------------------------------------------------------------


def _fresh_thread_state(monkeypatch):
    """No set_backend choice and no open use_backend block in this thread (conftest sets one)."""
    monkeypatch.setattr(B._state, "name", None)
    monkeypatch.setattr(B._state, "context", [])


def test_precedence_of_the_four_ways(monkeypatch):
    _fresh_thread_state(monkeypatch)
    monkeypatch.delenv("KPHI3_BACKEND", raising=False)
    assert B._requested() == ("auto", "the default")
    monkeypatch.setenv("KPHI3_BACKEND", "torch")
    assert B._requested() == ("torch", "the KPHI3_BACKEND environment variable")
    set_backend("triton")  # beats the environment
    assert B._requested() == ("triton", "set_backend(...)")
    with use_backend("auto"):  # beats set_backend
        assert B._requested() == ("auto", "use_backend(...)")
        set_backend("torch")  # takes effect when the block exits, not inside it
        assert get_backend() == "auto"
        with use_backend("torch"):  # the innermost block wins
            assert B._requested() == ("torch", "use_backend(...)")
            # a per-call / per-module override beats everything
            name, source = B._requested("triton")
            assert name == "triton" and "backend= argument" in source
        assert get_backend() == "auto"
    assert B._requested() == ("torch", "set_backend(...)")


def test_precedence_in_dispatch(monkeypatch):
    """The same order, seen in which launchers run (Triton on CPU needs the interpreter)."""
    if not B.triton_interpreting() or torch.cuda.is_available():
        pytest.skip("needs Triton's CPU interpreter")  # pragma: no cover
    _fresh_thread_state(monkeypatch)
    calls = spy_impls(monkeypatch)
    block = kphi3_kernels.InterleaveChannelsFast(2, last_dim=2)
    x = torch.randn(1, 2, 4)

    def ran():
        calls.clear()
        block(x)
        (backend,) = {b for b, _ in calls}
        return backend

    monkeypatch.setenv("KPHI3_BACKEND", "triton")
    assert ran() == "triton"
    set_backend("torch")
    assert ran() == "torch"
    with use_backend("triton"):
        assert ran() == "triton"
        block.backend = "torch"  # the module attribute beats the context
        assert ran() == "torch"
        assert kphi3_kernels.interleave(x, 2, backend="triton") is not None
        assert calls[-1][0] == "triton"  # ... and so does backend= on a functional call


def test_model_style_module_attribute_ignores_context():
    """A module built with backend=... (as the model's layers are) keeps it under use_backend."""
    block = kphi3_kernels.GroupedPointwiseConvolutionBlockIO(8, 8, 2, backend="torch")
    assert block.first_pointwise_conv.backend == "torch"
    with use_backend("triton"):
        assert kphi3_kernels.explain_backend(CPU, block.backend)[0] == "torch"
    block.backend = None  # back to following the flag
    assert block.backend is None and block.second_pointwise_conv.backend is None


# --------------------------------------------------------------------------------------------
# explain_backend / resolve_backend(with_reason=True)
# --------------------------------------------------------------------------------------------


def test_explain_backend_says_why(monkeypatch):
    _fresh_thread_state(monkeypatch)
    monkeypatch.delenv("KPHI3_BACKEND", raising=False)
    backend, reason = kphi3_kernels.explain_backend(CPU)
    assert backend == "torch"
    assert "'auto' (from the default)" in reason and "cpu tensor" in reason
    backend, reason = kphi3_kernels.explain_backend(CPU, "torch")
    assert backend == "torch" and "backend= argument" in reason
    monkeypatch.setenv("KPHI3_BACKEND", "torch")
    assert "KPHI3_BACKEND" in kphi3_kernels.explain_backend(CPU)[1]
    with use_backend("auto"):
        assert "use_backend" in kphi3_kernels.explain_backend("cpu")[1]  # a device works too
    assert resolve_backend(CPU, with_reason=True) == kphi3_kernels.explain_backend(CPU)
    assert resolve_backend(CPU) == "torch"


def test_explain_backend_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_backend("triton")
    backend, reason = kphi3_kernels.explain_backend(CPU)
    assert backend == "triton" and "set_backend" in reason and "interpreter" in reason


def test_explain_backend_raises_like_the_op(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kphi3_kernels.explain_backend(CPU, "triton")


def test_explain_backend_on_cuda_without_triton(monkeypatch):
    """A CUDA device needs no GPU to be described: the choice depends only on the device type."""
    monkeypatch.setattr(B, "triton_available", lambda: False)
    monkeypatch.setattr(B, "_triton_import_error", "ImportError: no module named 'triton'")
    backend, reason = kphi3_kernels.explain_backend(torch.device("cuda"), "auto")
    assert backend == "torch" and "not importable" in reason and "no module named" in reason
    monkeypatch.setattr(B, "triton_available", lambda: True)
    assert kphi3_kernels.explain_backend("cuda", "auto")[0] == "triton"
    assert kphi3_kernels.explain_backend("cuda", "triton")[0] == "triton"
    assert kphi3_kernels.explain_backend("cuda", "torch")[0] == "torch"


class _FakeCudaTensor:
    """Enough of a CUDA tensor for resolve_backend on a machine without a GPU."""
    is_cuda = True
    device = torch.device("cuda")


def test_auto_fallback_on_cuda_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(B, "triton_available", lambda: False)
    monkeypatch.setattr(B, "_warned_fallback", False)
    with caplog.at_level("WARNING", logger="kphi3_kernels"):
        assert resolve_backend(_FakeCudaTensor(), "auto") == "torch"
        assert resolve_backend(_FakeCudaTensor(), "auto") == "torch"
        assert resolve_backend(_FakeCudaTensor(), "torch") == "torch"  # asked for: no warning
    records = [r for r in caplog.records if r.name == "kphi3_kernels"]
    assert len(records) == 1 and "not importable" in records[0].getMessage()
    assert "once" in records[0].getMessage()


def test_no_warning_on_cpu_or_explicit_torch(monkeypatch, caplog):
    monkeypatch.setattr(B, "triton_available", lambda: False)
    monkeypatch.setattr(B, "_warned_fallback", False)
    with caplog.at_level("WARNING", logger="kphi3_kernels"):
        resolve_backend(CPU, "auto")
        resolve_backend(_FakeCudaTensor(), "torch")
    assert not [r for r in caplog.records if r.name == "kphi3_kernels"]


# --------------------------------------------------------------------------------------------
# KPHI3_BACKEND is checked at import
# --------------------------------------------------------------------------------------------


def _import_with_env(value):
    import os
    import subprocess
    import sys
    env = dict(os.environ, KPHI3_BACKEND=value)
    return subprocess.run([sys.executable, "-c", "import kphi3_kernels"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_bad_env_var_fails_at_import():
    proc = _import_with_env("gpu")
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "KPHI3_BACKEND" in proc.stderr
    assert "auto, triton, torch" in proc.stderr


def test_env_var_is_normalised(monkeypatch):
    _fresh_thread_state(monkeypatch)
    monkeypatch.setenv("KPHI3_BACKEND", " Torch ")
    assert B._env_backend() == "torch" and get_backend() == "torch"


def test_empty_env_var_means_unset(monkeypatch):
    _fresh_thread_state(monkeypatch)
    monkeypatch.setenv("KPHI3_BACKEND", "")
    assert B._requested() == ("auto", "the default")
