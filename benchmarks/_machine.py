"""Describe the machine a benchmark ran on, and when (written into every result file)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime


def machine() -> dict:
    """The host, platform, Python, CPU (model and count), torch and GPU of this machine, and
    ``measured_at``: the UTC time the benchmark asked (about when it ran)."""
    info = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
