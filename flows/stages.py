"""One DVC stage as a Prefect task: ``dvc repro --single-item <stage>`` in a subprocess, its output
streamed line by line into the Prefect log, its exit code checked, transient failures told apart
from real ones (only those are retried).

This module only orchestrates: what a stage does is in ``pipeline/stages/``; what is up to date is
DVC's decision.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

#: Output of a failed ``dvc repro`` that means "try again later", not "this is broken".
TRANSIENT_PATTERNS = (
    "Unable to acquire lock",  # dvc.lock.FAILED_TO_LOCK_MESSAGE: another DVC process
    "LockError",
    "Resource temporarily unavailable",  # EAGAIN
    "Device or resource busy",  # EBUSY
    "Text file busy",  # ETXTBSY
    "Stale file handle",  # ESTALE (network file systems)
    "Interrupted system call",  # EINTR
    "Connection reset by peer",
    "Connection timed out",
)
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETXTBSY, errno.ESTALE, errno.EINTR, errno.ENOMEM}
_PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress line
#: DVC's hints for interactive users (git add dvc.lock, autostage, dvc push): debug level in a flow.
_DVC_HINTS = (
    "To track the changes with git",
    "git add ",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``transient`` says whether retrying may help."""

    def __init__(self, stage: str, returncode: int | None, tail: list[str], transient: bool, reason: str = ""):
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        self.transient = transient
        what = reason or f"`dvc repro --single-item {stage}` exited with {returncode}"
        last = "\n".join(tail[-12:])
        super().__init__(f"stage {stage!r} failed: {what}" + (f"\n{last}" if last else ""))


def is_transient(lines: list[str]) -> bool:
    """Whether a failed stage's output says the failure was transient (see TRANSIENT_PATTERNS)."""
    text = "\n".join(lines)
    return any(p in text for p in TRANSIENT_PATTERNS)


def retry_on_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage only when its failure was transient."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except OSError as exc:
        return exc.errno in TRANSIENT_ERRNOS
    except Exception:
        return False
    return False


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    # the stage's own prints reach the log as they happen; DVC stays offline
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    env.setdefault("TQDM_MININTERVAL", "5")
    # `python` in dvc.yaml's commands: this interpreter's environment first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start_dvc(stage: str, cmd: list[str], project_root: str) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            cmd,
            cwd=project_root,
            env=_stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,  # its own process group: stopped with the run (_stop), not orphaned
        )
    except FileNotFoundError:
        raise StageFailed(
            stage, None, [], transient=False, reason="`dvc` not found on PATH (install the project: make install)"
        ) from None
    except OSError as exc:
        raise StageFailed(
            stage, None, [], transient=exc.errno in TRANSIENT_ERRNOS, reason=f"cannot start dvc: {exc}"
        ) from None


def _stream(stage: str, proc: subprocess.Popen, tail: deque[str]) -> bool:
    """Log the stage's output line by line (tqdm redraws at most every 5 s, DVC's hints for
    interactive users at debug level); returns whether DVC ran the stage (not skipped it)."""
    logger = get_run_logger()
    ran, last_progress = False, 0.0
    for raw in proc.stdout:
        line = raw.rstrip()
        if not line.strip():
            continue
        tail.append(line)
        ran = ran or line.startswith(f"Running stage '{stage}'")
        if _PROGRESS.search(line):
            now = time.monotonic()
            if now - last_progress < 5.0 and "100%|" not in line:
                continue
            last_progress = now
        (logger.debug if line.strip().startswith(_DVC_HINTS) else logger.info)("%s | %s", stage, line)
    return ran


#: Seconds a stopped stage gets to end cleanly (DVC releases its lock, training writes nothing half).
STOP_GRACE_S = 30.0


def _stop(proc: subprocess.Popen) -> None:
    """End a DVC process that is still running, and every process of its group: SIGTERM, then
    SIGKILL after :data:`STOP_GRACE_S`. A finished one is left alone."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, project_root: str = ".", force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item [--force] <stage>``, streamed into the Prefect log.

    Returns ``{"stage", "ran", "forced", "seconds"}`` (``ran`` False: DVC found it up to date and
    skipped it). Raises :class:`StageFailed` on a non-zero exit.
    """
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("$ %s%s", " ".join(cmd), "   (forced: the champion changed since the last verdict)" if force else "")
    t0 = time.monotonic()
    tail: deque[str] = deque(maxlen=60)
    proc = _start_dvc(stage, cmd, project_root)
    try:
        ran = _stream(stage, proc, tail)
        rc = proc.wait()
    finally:
        _stop(proc)  # the run was stopped (SIGTERM, Ctrl-C): DVC and the stage's process with it
    seconds = round(time.monotonic() - t0, 1)
    if rc != 0:
        raise StageFailed(stage, rc, list(tail), transient=is_transient(list(tail)))
    logger.info("stage %s %s in %.1f s", stage, "ran" if ran else "was up to date (skipped)", seconds)
    return {"stage": stage, "ran": ran, "forced": force, "seconds": seconds}
