"""The backend flag: set/get/use_backend, KPHI3_BACKEND, resolve_backend, and dispatch."""
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
