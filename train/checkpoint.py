"""What a ``step_<N>/`` checkpoint folder may hold, how its completion is recorded, and how resume checks it
before anything in it is unpickled (train/loop.py saves and loads; docs/CONTRACTS.md "Reliability").

    rec = write_complete(step_dir, step=40, world_size=2)     # last, on rank 0, after every rank saved
    ckpt, rec, refused = newest_verified(run_dir)              # resume: the newest folder that verifies
    verify(step_dir)                                           # CheckpointError naming the file, or the record

A folder is ``accelerator.save_state`` (model.safetensors or DeepSpeed's pytorch_model/, optimizer.bin,
random_states_<rank>.pkl, scaler.pt) + scheduler.json (the LR schedule's state, JSON: never a pickle) +
trainer_state.json + COMPLETE, written last: JSON with the sha256 of every other file, the step and the world
size. A folder verifies when every file has a name lmrec writes (ALLOWED), COMPLETE lists exactly the files
present and each hash matches. Pickled files are then read only with ``torch.load(weights_only=True)``
(Accelerate's loader for optimizer, RNG and scaler state; DeepSpeed's checkpoint engine is replaced by
``weights_only_deepspeed_engine``).

Checkpoints written before COMPLETE held hashes (COMPLETE = "<step>") still resume: their names are
checked, their small pickles trial-loaded with weights_only, and the scheduler they pickled
(custom_checkpoint_0.pkl) is read with weights_only too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lmrec_common.manifest import sha256_file
from lmrec_common.publish import atomic_write_json

KIND = "lmrec.checkpoint"
COMPLETE = "COMPLETE"
SCHEDULER_FILE = "scheduler.json"
TRAINER_STATE_FILE = "trainer_state.json"
LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"  # accelerate's register_for_checkpointing, before scheduler.json

# every file (path relative to step_<N>/) that save_state and train/loop.py write; anything else is refused
ALLOWED = [re.compile(p) for p in (
    r"model(_\d+)?\.safetensors", r"optimizer(_\d+)?\.bin", r"scaler\.pt", r"random_states_\d+\.pkl",
    re.escape(SCHEDULER_FILE), re.escape(TRAINER_STATE_FILE),
    # DeepSpeed: engine.save_checkpoint(step_<N>, tag="pytorch_model") + its `latest` pointer and recovery script
    r"pytorch_model/mp_rank_\d+_model_states\.pt",
    r"pytorch_model/(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(model|optim)_states\.pt",
    r"latest", r"zero_to_fp32\.py", r"zero_to_torch\.py",
)]
LEGACY_ALLOWED = [re.compile(re.escape(LEGACY_SCHEDULER_FILE))]
_RNG = re.compile(r"random_states_(\d+)\.pkl")


class CheckpointError(ValueError):
    """A step_<N>/ folder that must not be loaded: damaged, incomplete, or holding files lmrec does not write."""


def _files(d: Path) -> list[str]:
    """Every entry under d except COMPLETE, as posix paths relative to d; links and odd entries are refused."""
    out = []
    for root, dirs, names in os.walk(d, followlinks=False):
        for n in dirs + names:
            p = Path(root) / n
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise CheckpointError(f"{p}: a link or special file in a checkpoint (lmrec writes plain files only)")
        for n in names:
            rel = (Path(root) / n).relative_to(d).as_posix()
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def _allowed(rel: str, legacy: bool) -> bool:
    return any(p.fullmatch(rel) for p in ALLOWED + (LEGACY_ALLOWED if legacy else []))


def write_complete(d: Path, step: int, world_size: int) -> dict:
    """COMPLETE, written last: the sha256 of every file of the folder, the step and the world size."""
    files = _files(d)
    bad = [f for f in files if not _allowed(f, legacy=False)]
    if bad:  # a file this code does not know how to verify on load: fail the save, not the next resume
        raise CheckpointError(f"{d / bad[0]}: not a file lmrec checkpoints hold ({', '.join(bad)}); update train/checkpoint.py ALLOWED")
    rec = {"kind": KIND, "step": step, "world_size": world_size,
           "files": {f: sha256_file(d / f) for f in files}}
    atomic_write_json(d / COMPLETE, rec)
    return rec


def read_complete(d: Path) -> dict:
    f = d / COMPLETE
    try:
        text = f.read_text()
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    if text.strip().isdigit():  # written before hashes were recorded
        return {"kind": KIND, "step": int(text.strip()), "world_size": None, "files": None}
    try:
        rec = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{f}: not the JSON record lmrec writes (damaged)") from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND or not isinstance(rec.get("files"), dict):
        raise CheckpointError(f"{f}: not an lmrec checkpoint record (kind {rec.get('kind') if isinstance(rec, dict) else None!r})")
    return rec


def verify(d: Path) -> dict:
    """The folder's COMPLETE record when the folder is whole and holds only what lmrec writes, else
    CheckpointError naming the first file that is wrong. Reads every file once (sha256)."""
    rec = read_complete(d)
    if d.name != f"step_{rec['step']}":
        raise CheckpointError(f"{d / COMPLETE}: records step {rec['step']}, but the folder is {d.name}")
    legacy = rec["files"] is None
    present = _files(d)
    for f in present:
        if (d / f).is_file() and not _allowed(f, legacy):
            raise CheckpointError(f"{d / f}: unexpected file (not one lmrec writes into a checkpoint); refusing to load "
                                  "this checkpoint")
    present = [f for f in present if (d / f).is_file()]
    if not legacy:
        listed = rec["files"]
        for f in sorted(set(listed) - set(present)):
            raise CheckpointError(f"{d / f}: missing (listed in {COMPLETE})")
        for f in sorted(set(present) - set(listed)):
            raise CheckpointError(f"{d / f}: not listed in {COMPLETE} (added after the save)")
        for f in present:
            if sha256_file(d / f) != listed[f]:
                raise CheckpointError(f"{d / f}: sha256 differs from the one recorded when it was saved (truncated, "
                                      "damaged or modified)")
    for name in (TRAINER_STATE_FILE,) + (() if legacy else (SCHEDULER_FILE,)):
        try:
            json.loads((d / name).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d / name}: missing or not JSON ({type(e).__name__})") from None
    if not any(_RNG.fullmatch(f) for f in present):
        raise CheckpointError(f"{d}: no random_states_<rank>.pkl (resume would not be exact)")
    if legacy:  # no hashes to compare: the small pickles must at least load, with weights_only
        for f in present:
            if _RNG.fullmatch(f) or f == LEGACY_SCHEDULER_FILE:
                try:
                    load_weights_only(d / f)
                except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
                    raise CheckpointError(f"{d / f}: does not load ({type(e).__name__}: {str(e)[:200]})") from None
        if LEGACY_SCHEDULER_FILE not in present:
            raise CheckpointError(f"{d}: neither {SCHEDULER_FILE} nor {LEGACY_SCHEDULER_FILE} (the LR schedule's state)")
        rec = dict(rec, world_size=sum(1 for f in present if _RNG.fullmatch(f)))
    return rec


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_<N>/ that has a COMPLETE marker, newest first."""
    out = [(int(d.name[5:]), d) for d in run_dir.glob("step_*")
           if d.name[5:].isdigit() and d.is_dir() and (d / COMPLETE).is_file()]
    return sorted(out, reverse=True)


def newest_verified(run_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest complete step_<N>/ that verifies, its record, and why each newer one was refused."""
    refused = []
    for _, d in step_dirs(run_dir):
        try:
            return d, verify(d), refused
        except CheckpointError as e:
            refused.append(str(e))
    return None, None, refused


# ------------------------------------------------------------------------------------------------ loading
def load_weights_only(path: Path, map_location="cpu"):
    """torch.load restricted to tensors and plain containers (what Accelerate's own loader allows)."""
    from accelerate.utils import load

    return load(str(path), map_location=map_location, weights_only=True)


# the pickled files accelerator.load_state reads (torch.load, weights_only=True), in the order it reads them
_PICKLED = re.compile(r"(optimizer(_\d+)?\.bin|scaler\.pt|random_states_\d+\.pkl)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_unloadable(d: Path) -> tuple[str, str] | None:
    """(file, why) of the first pickled file of step_<N>/ that does not load with weights_only, else None. Called
    only after load_state failed, to name the file (torch's error does not); a second read costs nothing then."""
    for f in sorted((p for p in d.iterdir() if _PICKLED.fullmatch(p.name)), key=lambda p: (not p.name.startswith("optim"), p.name)):
        try:
            load_weights_only(f)
        except Exception as e:  # noqa: BLE001 - any failure to unpickle is the answer
            return f.name, short_error(e)
    return None


def short_error(e: BaseException, n: int = 200) -> str:
    """``Type: first line of the message`` without terminal colour codes (torch's weights_only errors carry them and
    run over many lines)."""
    msg = _ANSI.sub("", str(e)).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first[:n]}{'...' if len(first) > n or len(msg) > 1 else ''}"


def save_scheduler(d: Path, scheduler) -> None:
    """The LR scheduler's state as JSON (LambdaLR: last_epoch, _step_count, base_lrs, _last_lr; lr_lambdas are
    functions, stored as null and rebuilt from the config)."""
    sd = scheduler.state_dict()
    atomic_write_json(d / SCHEDULER_FILE, sd)


def load_scheduler(d: Path, scheduler) -> None:
    f = d / SCHEDULER_FILE
    if f.is_file():
        sd = json.loads(f.read_text())
    else:  # a checkpoint from before scheduler.json: accelerate pickled the state dict; read it without code
        sd = load_weights_only(d / LEGACY_SCHEDULER_FILE)
    if not isinstance(sd, dict) or "last_epoch" not in sd:
        raise CheckpointError(f"{f}: not an LR scheduler state (no last_epoch)")
    scheduler.load_state_dict(sd)


def saved_torch_rng(d: Path, rank: int):
    """The CPU torch RNG state this rank saved (to check that load_state restored it: Accelerate only logs a
    failure at info level, and a resume without it is no longer exact)."""
    f = d / f"random_states_{rank}.pkl"
    return load_weights_only(f)["torch_manual_seed"] if f.is_file() else None


def weights_only_deepspeed_engine(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine reads every file with torch.load(weights_only=False): swap its load for
    one with weights_only=True that allows only the few DeepSpeed classes its own state dicts hold."""
    import torch

    allowed = _deepspeed_safe_globals()
    ce = engine.checkpoint_engine

    def load(path: str, map_location=None):
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def _deepspeed_safe_globals() -> list:
    """Classes pickled into DeepSpeed's model/optimizer state files (loss scalers, the ZeRO stage enum, the
    parameter fragment records); found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3
    checkpoints of this repo (tests/test_train_distributed.py)."""
    import collections

    out = [collections.OrderedDict]
    for mod, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                       ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                       ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                       ("deepspeed.runtime.zero.partition_parameters", ("ZeroParamStatus",))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(m, n) for n in names if hasattr(m, n)]
    return out


def read_jsonl_tolerant(f: Path) -> tuple[list[tuple[int, str]], list[int]]:
    """(step, line) of each line of a JSON-lines log with a "step", and the numbers (1-based) of the lines that
    do not parse (the torn last line of a killed writer, or damage): those are to be dropped."""
    rows, bad = [], []
    for i, ln in enumerate(f.read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append((row["step"], ln))
        else:
            bad.append(i)
    return rows, bad
