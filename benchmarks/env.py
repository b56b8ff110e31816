"""What a result was measured on: device, library versions, date; and the results-file name."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import sys
from typing import Dict

import torch


def _version(distribution: str) -> str:
    # The installed distribution's metadata: importing transformers only to read its version
    # cost seconds of every run.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H200`` on CUDA; ``CPU (<model>, N threads)`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``nvidia-h200``, ``cpu``."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_results_name(device: torch.device) -> str:
    """``<device>-<date>.json``, the name of a committed results file in benchmarks/results/."""
    return f"{device_slug(device)}-{today()}.json"


ROW_KEYS = ("device", "device_name", "torch", "triton", "transformers", "date")


def row_env(info: Dict[str, str]) -> Dict[str, str]:
    """The part of ``environment()`` stored on every result row."""
    return {k: info[k] for k in ROW_KEYS}


def environment(device: torch.device) -> Dict[str, str]:
    """Device, versions and date, as stored with every result."""
    import kphi3_kernels

    info = {
        "device": device.type,
        "device_name": device_name(device),
        "date": now_iso(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "kphi3_kernels": kphi3_kernels.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
    return info
