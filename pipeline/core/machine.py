"""What machine this is: the description written into benchmark results, audit bundles and
reproduction reports, and the part of it that decides whether two runs can give identical weights
(:func:`machine_type`)."""

from __future__ import annotations

import os
import platform
from typing import Any


def describe() -> dict[str, Any]:
    """The host, platform, Python, CPU (model and count), torch and GPU of this machine."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_type(info: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for CPU training to give identical weights: the CPU model, core count,
    torch version and GPU (the host's name and the platform's kernel release need not)."""
    return (info.get("cpu"), info.get("cpu_count"), info.get("torch"), info.get("gpu"))
