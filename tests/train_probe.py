"""`python -m train` with a look inside each process, for tests that launch training the way users do:

    LMREC_PROBE_DIR=<dir> accelerate launch --config_file launch/accelerate/<x>.yaml tests/train_probe.py key=value ...

Forward hooks on the user tower's Linear layers (the text encoder's are left out) record, in training forwards only,
the dtypes of their weights and outputs; every training forward of the model is counted. With the process's
launcher variables (RANK, LOCAL_RANK, GROUP_RANK = the node, WORLD_SIZE, ...) they are rewritten to
``<dir>/rank<RANK>.json`` after each training forward (train exits through os._exit: no atexit). Nothing of
train/ is changed: the hooks are added to SeqRecModel before train/__main__ runs."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import torch

from train.model import SeqRecModel

ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
seen = {"weight_dtypes": set(), "output_dtypes": set(), "train_forwards": 0}


def _record_linear(mod, args, out) -> None:
    if mod.training and torch.is_tensor(out):
        seen["weight_dtypes"].add(str(mod.weight.dtype).removeprefix("torch."))
        seen["output_dtypes"].add(str(out.dtype).removeprefix("torch."))


def _write() -> None:
    out = Path(os.environ["LMREC_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    rec = {k: sorted(v) if isinstance(v, set) else v for k, v in seen.items()}
    rec["env"] = {k: os.environ.get(k) for k in ENV}
    tmp = out / f".rank{os.environ.get('RANK', '0')}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / f"rank{os.environ.get('RANK', '0')}.json")


_init, _forward = SeqRecModel.__init__, SeqRecModel.forward


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    for name, m in self.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.startswith("text_encoder"):
            m.register_forward_hook(_record_linear)


def forward(self, *args, **kwargs):
    out = _forward(self, *args, **kwargs)
    if self.training:
        seen["train_forwards"] += 1
        _write()
    return out


SeqRecModel.__init__, SeqRecModel.forward = __init__, forward

if __name__ == "__main__":
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)
