"""Shared test setup. TRITON_INTERPRET is read when kernels are decorated (at import), so it is
set here, before anything imports kphi3_kernels: on a machine without a GPU the Triton tests run
the real kernels through Triton's CPU interpreter."""
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("KPHI3_BACKEND", None)  # tests choose backends explicitly

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--sanitize", action="store_true", default=False,
                     help="check every interpreted Triton launch for races between programs, "
                          "out-of-bounds accesses and program-order dependence "
                          "(docs/sanitizer.md); also KPHI3_SANITIZE=1")


def _sanitize_requested(config) -> bool:
    import sanitizer   # tests/sanitizer.py: importing it installs nothing

    return config.getoption("--sanitize") or sanitizer.enabled_by_env()


def pytest_configure(config):
    config.addinivalue_line("markers", "sanitize: the subset run under --sanitize in CI, which "
                                       "launches every kernel of the package (docs/sanitizer.md)")
    # Off (the default), nothing is hooked: the interpreter runs untouched.
    if _sanitize_requested(config):
        import sanitizer
        sanitizer.install()
        config._kphi3_sanitizer = sanitizer


def pytest_sessionfinish(session, exitstatus):
    # The CI subset (-m sanitize) must launch every kernel of the package: a new kernel without
    # a test in the subset fails the run instead of going unchecked.
    sanitizer = getattr(session.config, "_kphi3_sanitizer", None)
    if sanitizer is None or session.config.getoption("markexpr") != "sanitize" \
            or os.environ.get("TRITON_INTERPRET") != "1":     # compiled kernels are not seen
        return
    missing = sanitizer.kernels_not_launched(sanitizer.SANITIZER)
    session.config._kphi3_not_launched = missing
    if missing and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sanitizer = getattr(config, "_kphi3_sanitizer", None)
    if sanitizer is None:
        return
    terminalreporter.section("Triton sanitizer")
    if not sanitizer.SANITIZER.stats and not os.environ.get("TRITON_INTERPRET"):
        terminalreporter.write_line("nothing checked: kernels compile for the GPU here "
                                    "(the sanitizer needs TRITON_INTERPRET=1)")
    for line in sanitizer.summary_lines():
        terminalreporter.write_line(line)
    missing = getattr(config, "_kphi3_not_launched", None)
    if missing:
        terminalreporter.write_line(f"FAILED: kernels of the package the sanitize subset never "
                                    f"launched: {', '.join(missing)}", red=True)


def pytest_collection_modifyitems(config, items):
    import sanitizer   # the subset list only; the interpreter hooks are installed by --sanitize

    missing = sanitizer.mark_subset(items, pytest.mark.sanitize)
    if missing:
        message = f"tests/sanitizer.py SANITIZE_SUBSET names tests that do not exist: " \
                  f"{', '.join(missing)}"
        if _sanitize_requested(config) or "sanitize" in (config.getoption("markexpr") or ""):
            raise pytest.UsageError(message)
        warnings.warn(pytest.PytestWarning(message))
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (bf16 tl.dot is wrong in the interpreter)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_poison_and_reset_backend():
    """Every test: a fixed seed, NaN-poisoned kernel outputs, the default backend."""
    import kphi3_kernels
    from kphi3_kernels.ops import outputs

    torch.manual_seed(0)
    kphi3_kernels.set_backend("auto")
    outputs.POISON = True
    yield
    outputs.POISON = False
    kphi3_kernels.set_backend("auto")
