"""On-disk cache of the text tower's per-item features, reused across nightly runs.

A model with a text item tower runs its encoder (MiniLM: 6 transformer layers per item) over the whole
catalogue before it can score anyone; nightly, most of the catalogue is the same as last night. With
``text_feature_cache: <dir>`` (inference config) the pooled encoder output of every item is stored under
<dir>, keyed by

- the encoder: a sha256 over its weights (names, dtypes, shapes, bytes), its pooling and the device type
  it ran on (a GPU's kernels round differently from a CPU's), so a fine-tuned (LoRA-merged) encoder,
  another model or another device never reads features it did not compute;
- the item: a 128-bit blake2b of its token ids (what the encoder sees), so an item whose text changed is
  encoded again and an item whose id changed but text did not is not.

Only the features of the items of the last run are kept (a catalogue that shrinks does not leave a growing
file); each encoder's file is replaced atomically (lmrec_common.publish.atomic_write_bytes), so a killed run
leaves the previous file or the new one, never half of one. A file that cannot be read is ignored with a
warning (the features are computed again and the file rewritten), and one that cannot be written is
reported and skipped: the cache never changes a result, only how long it takes. The files of the
``KEEP_ENCODERS`` most recently used encoders are kept; older ones are removed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

KEEP_ENCODERS = 4
_SUFFIX = ".textfeat.safetensors"


def encoder_fingerprint(encoder: torch.nn.Module, pooling: str, device_type: str) -> str:
    if any(hasattr(p, "ds_id") for p in encoder.parameters()):
        # ZeRO-3 partitions: this rank holds a slice, so its weights would not tell two encoders apart
        raise ValueError("the text encoder's weights are partitioned (DeepSpeed ZeRO-3): no text-feature cache")
    h = hashlib.sha256(f"pooling={pooling};device={device_type};".encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def item_keys(tokens: torch.Tensor, lengths: torch.Tensor) -> list[bytes]:
    """(N, L) token ids + (N,) lengths -> N 16-byte keys of each item's first ``length`` token ids."""
    rows = tokens.detach().to("cpu", torch.int64).numpy()
    lens = lengths.detach().to("cpu").tolist()
    return [hashlib.blake2b(rows[i, :n].tobytes(), digest_size=16).digest() for i, n in enumerate(lens)]


def _warn(msg: str) -> None:
    print(f"[text_cache] warning: {msg}", file=sys.stderr, flush=True)


class TextFeatureCache:
    """The cached features of one encoder under ``root``."""

    def __init__(self, root: str | Path, fingerprint: str, write: bool = True):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.write = write  # False on all ranks but one: one writer per file
        self.path = self.root / f"{fingerprint[:32]}{_SUFFIX}"

    def load(self) -> tuple[dict[bytes, int], torch.Tensor]:
        """(key -> row, (rows, H) float32 features); ({}, empty) when there is no usable file."""
        none = ({}, torch.zeros(0, 0))
        if not self.path.is_file():
            return none
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                    raise ValueError("written for another encoder")
                keys, feats = f.get_tensor("keys"), f.get_tensor("features")
            if keys.dim() != 2 or keys.size(1) != 16 or feats.dim() != 2 or keys.size(0) != feats.size(0):
                raise ValueError(f"unexpected shapes keys {tuple(keys.shape)}, features {tuple(feats.shape)}")
        except Exception as e:  # noqa: BLE001 - a bad cache costs time, never the run
            _warn(f"{self.path} unusable ({type(e).__name__}: {e}); computing the features again")
            return none
        os.utime(self.path)  # recently used: kept by the pruning below
        kb = keys.numpy().tobytes()
        return {kb[16 * i:16 * (i + 1)]: i for i in range(keys.size(0))}, feats.float()

    def save(self, keys: list[bytes], feats: torch.Tensor) -> None:
        """Replace this encoder's file with exactly these items' features (atomic rename)."""
        if not self.write:
            return
        from safetensors.torch import save

        from lmrec_common.publish import atomic_write_bytes

        k = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 16) if keys \
            else torch.zeros(0, 16, dtype=torch.uint8)
        data = save({"keys": k, "features": feats.detach().to("cpu", torch.float32).contiguous()},
                    metadata={"fingerprint": self.fingerprint})
        try:
            atomic_write_bytes(self.path, data)
        except OSError as e:
            _warn(f"could not write {self.path} ({e}); next run encodes these items again")
            return
        self._prune()

    def _prune(self) -> None:
        try:  # another run may be pruning the same directory: a file gone meanwhile is not an error
            files = sorted(self.root.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
            for p in files[KEEP_ENCODERS:]:
                if p != self.path:
                    p.unlink(missing_ok=True)
        except OSError as e:
            _warn(f"could not prune {self.root} ({e})")


def open_cache(root: str | Path, encoder: torch.nn.Module, pooling: str, device_type: str, write: bool = True):
    """The cache of this encoder under root, or None (with a warning) when its features cannot be keyed."""
    try:
        return TextFeatureCache(root, encoder_fingerprint(encoder, pooling, device_type), write)
    except ValueError as e:
        _warn(f"{e}; encoding every item")
        return None
