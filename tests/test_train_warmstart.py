"""Warm start (``init_from=<previous run>/final``): the nightly chain's fine-tune from last night's model.

Night 1 trains on prepared v1 (50 users, items i0..i39). Night 2's catalogue has 6 new items and 10 new
users, and its item_idx order is reversed (so a copy by row number instead of by item_id would be
caught). Tiny 2-layer BERT (hidden 32) item tower, hybrid frozen; in-process run(cfg) calls.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import reset_accelerate
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402

from lmrec_common.config import load_config  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.export import WarmStartError, warm_start  # noqa: E402
from train.loop import EXIT_REQUEUE, TrainingError, run  # noqa: E402
from train.model import SeqRecModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def reverse_item_order(src: Path, dst: Path) -> Path:
    """Copy a prepared version with its items in reversed item_idx order (sequences remapped)."""
    import datasets

    items = datasets.load_from_disk(str(src / "items"))
    n = len(items)
    perm = list(range(n - 1, -1, -1))  # new row r holds old item perm[r]
    old_to_new = {old: new for new, old in enumerate(perm)}
    it = items.select(perm).to_dict()
    it["item_idx"] = list(range(n))
    datasets.Dataset.from_dict(it, features=items.features).save_to_disk(str(dst / "items"))
    seq = datasets.load_from_disk(str(src / "sequences"))
    sd = seq.to_dict()
    sd["item_idx"] = [[old_to_new[i] for i in row] for row in sd["item_idx"]]
    datasets.Dataset.from_dict(sd, features=seq.features).save_to_disk(str(dst / "sequences"), num_shards=2)
    m = json.loads((src / "manifest.json").read_text())
    m["version"] = dst.name
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "config.yaml").write_text((src / "config.yaml").read_text())
    return dst


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Night 1 trained and exported once for the module; night 2's prepared folder."""
    root = tmp_path_factory.mktemp("warm")
    bert = write_tiny_text_model(root / "bert")
    v1 = write_prepared(root / "prepared", version="v1")
    raw2 = write_prepared(root / "raw2", num_users=60, num_items=46, seed=1, version="v2")
    v2 = reverse_item_order(raw2, root / "prepared" / "v2")
    reset_accelerate()
    cfg = make_cfg(bert, v1, root / "ck", "run_name=night1", "max_steps=40", "optim.lr=1e-2")
    assert run(cfg) == 0
    reset_accelerate()
    return {"root": root, "bert": bert, "v1": v1, "v2": v2, "final1": root / "ck" / "night1" / "final"}


def make_cfg(bert: Path, data: Path, out: Path, *over: str) -> TrainConfig:
    base = [f"data={data}", f"output_dir={out}", f"model.text_model_path={bert}", "model.item_tower=hybrid",
            "model.d_model=32", "model.max_len=20", "model.dropout=0.0", "batch_size=16", "tracker=none",
            "optim.warmup_steps=0", "log_every=5", "eval_every=0", "save_every=0", "early_stopping_patience=0",
            "evaluate_test=false"]
    return load_config(TrainConfig, None, base + list(over))


def first_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "losses.jsonl").read_text().splitlines()[0])["loss"]


def test_final_exports_item_ids(nights):
    import pyarrow.parquet as pq

    ids = pq.read_table(str(nights["final1"] / "item_ids.parquet")).column("item_id").to_pylist()
    assert ids == [f"i{i}" for i in range(40)]


def test_carried_rows_equal_previous_rows_by_item_id(nights):
    """warm_start on a fresh night-2 model: every shared item's id row equals night 1's row of the
    same item_id (rows are at reversed positions); new items keep the fresh init; user tower copied."""
    from train.data import open_prepared

    old_sd = load_file(str(nights["final1"] / "model.safetensors"))
    prep = open_prepared(str(nights["v2"]))
    ids = prep.items.data.table.column("item_id").to_pylist()
    counts = torch.tensor(prep.items.data.table.column("n_train_events").to_numpy(), dtype=torch.float)
    cfg = make_cfg(nights["bert"], nights["v2"], nights["root"] / "unused")
    torch.manual_seed(0)
    model = SeqRecModel(cfg.model.rec_config(len(ids), 2, 0), text_model_path=str(nights["bert"]))
    model.set_seen_items(counts)
    fresh = model.item_emb.weight.detach().clone()
    rep = warm_start(model, nights["final1"], ids, list(prep.event_types), text_model_dir=nights["bert"])
    assert (rep["items_carried"], rep["items_new"], rep["items_dropped"]) == (40, 6, 0)
    w = model.item_emb.weight.detach()
    for new_idx, item_id in enumerate(ids):
        k = int(item_id[1:])
        if k < 40:
            assert torch.equal(w[new_idx], old_sd["item_emb.weight"][k]), item_id
        else:
            assert torch.equal(w[new_idx], fresh[new_idx]), item_id
    # id_mask: night 1's flag (i38, i39 were cold there), or tonight's seen flag (they are warm tonight)
    mask = model.id_mask
    for new_idx, item_id in enumerate(ids):
        k = int(item_id[1:])
        expect = max(float(counts[new_idx] > 0), float(old_sd["id_mask"][k]) if k < 40 else 0.0)
        assert float(mask[new_idx]) == expect, item_id
    assert float(mask[ids.index("i38")]) == 1.0 and float(old_sd["id_mask"][38]) == 0.0
    for k in ("pos_emb.weight", "blocks.0.qkv.weight", "ln_f.weight", "text_proj.0.weight", "type_emb.weight"):
        assert torch.equal(model.state_dict()[k], old_sd[k]), k
    # the encoder's weights are in final/item_tower/ (a Hugging Face model folder), under its own names
    tower = load_file(str(nights["final1"] / "item_tower" / "model.safetensors"))
    k = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[f"text_encoder.{k}"], tower[k])


def test_warm_start_first_loss_below_cold_start_and_resume_wins(nights, capsys):
    out = nights["root"] / "ck2"
    common = ["max_steps=4", "optim.lr=1e-3"]
    cold = make_cfg(nights["bert"], nights["v2"], out, *common, "run_name=cold")
    assert run(cold) == 0
    reset_accelerate()
    capsys.readouterr()
    warm = make_cfg(nights["bert"], nights["v2"], out, *common, "run_name=warm", f"init_from={nights['final1']}",
                    "stop_after_steps=2")
    assert run(warm) == EXIT_REQUEUE
    log = capsys.readouterr().out
    assert "items carried over 40 | new 6 (fresh init) | dropped 0" in log, log
    rd = out / "warm"
    rep = json.loads((rd / "warm_start.json").read_text())
    assert rep["items_carried"] == 40 and rep["items_new"] == 6
    # the night-1 model already knows the walk: its loss on night 2's data at step 1 (before any
    # update) is far below a fresh model's
    lc, lw = first_loss(out / "cold"), first_loss(rd)
    assert lw < lc - 0.5, (lw, lc)
    # relaunch: the step_2 checkpoint wins over init_from, and the export keeps the lineage
    reset_accelerate()
    again = make_cfg(nights["bert"], nights["v2"], out, *common, "run_name=warm", f"init_from={nights['final1']}")
    assert run(again) == 0
    log = capsys.readouterr().out
    assert "ignored: resuming from" in log and "items carried over" not in log, log
    info = json.loads((rd / "final" / "export.json").read_text())
    assert info["warm_start"]["items_carried"] == 40 and info["warm_start"]["init_from"] == str(nights["final1"])
    assert info["data_version"] == "v2"


def test_incompatible_previous_model_is_refused(nights, tmp_path):
    cfg = make_cfg(nights["bert"], nights["v2"], tmp_path, "max_steps=2", "run_name=bad", "model.d_model=16",
                   f"init_from={nights['final1']}")
    with pytest.raises(TrainingError, match=r"d_model: 32 \(previous\) vs 16"):
        run(cfg)
    reset_accelerate()
    cfg = make_cfg(nights["bert"], nights["v2"], tmp_path, "max_steps=2", "run_name=bad2", "model.item_tower=id",
                   f"init_from={nights['final1']}")
    with pytest.raises(TrainingError, match="item_tower: 'hybrid'"):
        run(cfg)
    reset_accelerate()
    cfg = make_cfg(nights["bert"], nights["v2"], tmp_path, "max_steps=2", "run_name=bad3", f"init_from={tmp_path}")
    with pytest.raises(TrainingError, match="not a final/ export"):
        run(cfg)


def test_other_text_model_is_refused(nights, tmp_path):
    bert64 = write_tiny_text_model(tmp_path / "bert64", hidden=64)
    from train.data import open_prepared

    prep = open_prepared(str(nights["v2"]))
    ids = prep.items.data.table.column("item_id").to_pylist()
    cfg = make_cfg(bert64, nights["v2"], tmp_path)
    model = SeqRecModel(cfg.model.rec_config(len(ids), 2, 0), text_model_path=str(bert64))
    with pytest.raises(WarmStartError, match="text model hidden_size: 32 \\(previous\\) vs 64"):
        warm_start(model, nights["final1"], ids, list(prep.event_types), text_model_dir=bert64)
    # the same text model whitened (model.text_whiten): the adaptor's input space differs, even at the same width
    cfg = make_cfg(nights["bert"], nights["v2"], tmp_path, "model.text_whiten=32")
    model = SeqRecModel(cfg.model.rec_config(len(ids), 2, 0), text_model_path=str(nights["bert"]))
    with pytest.raises(WarmStartError, match="text_whiten: 0 \\(previous\\) vs 32"):
        warm_start(model, nights["final1"], ids, list(prep.event_types), text_model_dir=nights["bert"])
