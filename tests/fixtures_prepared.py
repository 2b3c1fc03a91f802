"""Tiny prepared folders (docs/CONTRACTS.md section 2) and a tiny item-tower model for the train tests.

The sequences follow a learnable rule (a user walks the item ring i -> i+1 -> ... with a user-specific
stride and a little noise), so "the loss goes down" and "better than most-popular" are meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmrec_common.models import resolve_model_path


def write_tiny_text_model(dest: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A random 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer, saved like a HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:all-MiniLM-L6-v2")))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


def write_prepared(root: Path, num_users: int = 50, num_items: int = 40, seed: int = 0, min_len: int = 4,
                   max_len: int = 30, cold_items: int = 2, version: str = "v1", schema_version: int = 1) -> Path:
    """Write prepared/<version>/ exactly per the contract and return the version folder."""
    import datasets
    from transformers import AutoTokenizer

    rng = np.random.default_rng(seed)
    out = Path(root) / version
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:all-MiniLM-L6-v2")))
    colours = ["red", "green", "blue", "black", "white"]
    texts = [f"item {i} {colours[i % 5]} {'movie' if i % 2 else 'book'} number {i // 5}" for i in range(num_items)]
    ids = [tok(t, truncation=True, max_length=32)["input_ids"] for t in texts]

    warm = num_items - cold_items  # the last `cold_items` items never occur (cold start)
    users = {"user_idx": [], "user_id": [], "item_idx": [], "timestamp": [], "event_type": [],
             "train_len": [], "valid_pos": [], "test_pos": []}
    counts = np.zeros(num_items, dtype=np.int64)
    for u in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        stride = 1 + u % 3
        cur = int(rng.integers(0, warm))
        seq = []
        for _ in range(n):
            seq.append(cur)
            cur = (cur + stride) % warm if rng.random() > 0.1 else int(rng.integers(0, warm))
        train_len = n - 2
        counts += np.bincount(seq[:train_len], minlength=num_items)
        users["user_idx"].append(u)
        users["user_id"].append(f"u{u}")
        users["item_idx"].append(seq)
        users["timestamp"].append([1_700_000_000 + 60 * k for k in range(n)])
        users["event_type"].append([int(k % 2) for k in range(n)])
        users["train_len"].append(train_len)
        users["valid_pos"].append(n - 2)
        users["test_pos"].append(n - 1)

    feats_items = datasets.Features({
        "item_idx": datasets.Value("int32"), "item_id": datasets.Value("string"), "text": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "n_train_events": datasets.Value("int64"),
        "in_catalogue": datasets.Value("bool"), "available": datasets.Value("bool")})
    datasets.Dataset.from_dict({
        "item_idx": list(range(num_items)), "item_id": [f"i{i}" for i in range(num_items)], "text": texts,
        "input_ids": ids, "n_train_events": counts.tolist(), "in_catalogue": [True] * num_items,
        "available": [True] * num_items}, features=feats_items).save_to_disk(str(out / "items"))
    feats_seq = datasets.Features({
        "user_idx": datasets.Value("int32"), "user_id": datasets.Value("string"),
        "item_idx": datasets.Sequence(datasets.Value("int32")), "timestamp": datasets.Sequence(datasets.Value("int64")),
        "event_type": datasets.Sequence(datasets.Value("int8")), "train_len": datasets.Value("int32"),
        "valid_pos": datasets.Value("int32"), "test_pos": datasets.Value("int32")})
    datasets.Dataset.from_dict(users, features=feats_seq).save_to_disk(str(out / "sequences"), num_shards=2)
    manifest = {
        "kind": "lmrec.prepared", "schema_version": schema_version, "version": version, "code_version": "test",
        "created_at": "2026-01-01T00:00:00+00:00", "config": {"split": "leave_last_out"},
        "counts": {"users": num_users, "items": num_items, "items_cold": cold_items},
        "event_types": ["view", "click"], "user_id_type": "string", "item_id_type": "string",
        "tokenizer": {"path": "bundled:all-MiniLM-L6-v2", "name": "all-MiniLM-L6-v2", "max_text_tokens": 32},
        "vocab": {"users_sha256": "x", "items_sha256": "y"}, "num_shards": 2, "split": {"kind": "leave_last_out"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "config.yaml").write_text("split: leave_last_out\n")
    return out


def random_item_tokens(num_items: int, L: int = 6, seed: int = 0):
    """(num_items, L) right-padded token ids (pad 0) and their lengths in 2..L: a catalogue's tokens for unit tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, L + 1, (num_items,), generator=g)
    ids = torch.randint(1000, 2000, (num_items, L), generator=g)
    ids[torch.arange(L)[None, :] >= lens[:, None]] = 0
    return ids, lens
