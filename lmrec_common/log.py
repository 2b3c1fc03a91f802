"""Rank-aware logging: ``print0`` prints on the global main process only; ``Progress`` is a
fixed-format progress line with rate and ETA for long loops (no tqdm needed, no bar in logs)."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable


def rank() -> int:
    """Global rank as set by torchrun/accelerate (``RANK``); 0 outside a distributed launch."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def verbose() -> bool:
    """LMREC_VERBOSE=1: print details (the resolved config) that a normal run keeps in its output folder."""
    return os.environ.get("LMREC_VERBOSE", "") not in ("", "0")


def print_config(stage: str, path: str | None, overrides: list[str], cfg, saved_as: str) -> None:
    """One line naming the config and where the resolved settings are saved; the whole YAML only when verbose()."""
    from lmrec_common.config import dump_yaml

    extra = f" {' '.join(overrides)}" if overrides else ""
    print0(f"[{stage}] config {path or '(defaults)'}{extra}; resolved settings: {saved_as}"
           + ("" if verbose() else " (LMREC_VERBOSE=1 prints them here)"))
    if verbose():
        print0(dump_yaml(cfg), end="")


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def fmt_secs(s: float) -> str:
    s = max(0, int(s))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """``p = Progress("tokenize", total=n, unit="items"); p.update(k)`` prints at most every
    ``every`` seconds: ``[tokenize] 12.3k/50.0k items (24.6%) | 8.1k items/s | eta 0:04``."""

    def __init__(self, name: str, total: int | None = None, unit: str = "rows", every: float = 2.0, enabled: bool | None = None):
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.enabled = is_main() if enabled is None else enabled
        self.n = 0
        self.t0 = self.last = time.time()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._print(now)

    def _print(self, now: float, done: bool = False) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        msg = f"[{self.name}] {fmt_count(self.n)}"
        if self.total:
            msg += f"/{fmt_count(self.total)} {self.unit} ({100.0 * self.n / self.total:.1f}%)"
        else:
            msg += f" {self.unit}"
        msg += f" | {fmt_count(rate)} {self.unit}/s"
        if done:
            msg += f" | done in {fmt_secs(dt)}"
        elif self.total and rate > 0:
            msg += f" | eta {fmt_secs((self.total - self.n) / rate)}"
        print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._print(time.time(), done=True)



def exit_cleanly(code: int = 0) -> None:
    """End a finished launch (train, inference) with ``code``: destroy the process group, flush, and
    leave without interpreter finalization.

    Without destroy_process_group, gloo's worker threads can still hold work objects whose tensors are
    freed during finalization, which needs the GIL of an interpreter being torn down: the rank aborts
    AFTER its work is done ("terminate called without an active exception", SIGABRT; pytorch/pytorch
    #190489), and a nightly chain reports a failed job for a complete, published table. It showed in
    this repo's 2-process CPU runs about once per CI run. Call it on success only: destroying a group
    while another rank is still in a collective can hang (the error path raises instead)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:
        pass
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def quiet_deepspeed_detection() -> None:
    """Without a GPU, tell DeepSpeed it runs on CPU (``DS_ACCELERATOR=cpu``) unless the user said otherwise:
    accelerate and transformers import DeepSpeed whenever it is installed (unwrap, save_pretrained), and its
    auto-detection then logs "Setting accelerator to CPU ... we were unable to detect it" on every CPU run."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def user_errors(main: Callable[[], None], expected: tuple[type[BaseException], ...],
                exit_codes: dict[type[BaseException], int] | None = None) -> None:
    """Run a job's ``main``; an EXPECTED error (a bad config, bad input, a refused checkpoint: the types the stage
    raises on purpose, with a message naming the file, key or row) prints one line ``error: ...`` and exits 2,
    without a traceback. ``exit_codes`` names expected errors with an exit code of their own (checked first: the
    gate's "nothing fit to serve", data_prep's "the log has not landed", both 3). Anything else is a bug and keeps its
    traceback. ``LMREC_TRACEBACK=1`` shows the traceback of expected errors too."""
    codes = exit_codes or {}
    try:
        main()
    except tuple(codes) + tuple(expected) as e:
        if os.environ.get("LMREC_TRACEBACK"):
            import traceback

            traceback.print_exc()
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank not in (None, '0') else ''}: {e}", file=sys.stderr, flush=True)
        sys.exit(next((c for t, c in codes.items() if isinstance(e, t)), 2))
