"""Fine-tuning the text tower really changes it (issue 34 item 2): for text_mode frozen / lora / full / top, which weights
move in a few steps, in one process (run(cfg), as __main__ calls it) and under DeepSpeed ZeRO-2 / ZeRO-3 (2 CPU
processes through launch/accelerate/cpu_ds_zero{2,3}.yaml), and that final/ carries what was tuned.

What moved is read from best/model.safetensors (the consolidated, un-merged state dict of the last step: eval only at
the end) against the text model's folder (base weights) and a rebuild of the run's initial model (same seed, same
construction as train/loop.py: the LoRA A matrices). final/item_tower/ (a Hugging Face folder: the encoder's weights
are stored there, LoRA merged) must hold the tuned encoder; final/ is then loaded with train.export.load_final and its
item vectors and scores are compared with those of the same model given back the untuned tower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared, write_tiny_text_model  # noqa: E402

from lmrec_common.config import load_config  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.catalogue import Catalogue  # noqa: E402
from train.export import load_final  # noqa: E402
from train.model import SeqRecModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("frozen", "lora", "full", "top")
TOP = "encoder.layer.1."  # text_mode top (top_layers 1) on the 2-layer test encoder: the layer that is trained
STEPS, LR = 3, 3e-3
ENC = "text_encoder."
PEFT = "text_encoder.base_model.model."
# softmax(q.k + q.b) does not depend on the key bias b (the same shift for every key of a query): its gradient is 0,
# only weight decay moves it (~1e-7 here). Every other encoder tensor gets a gradient.
NO_GRADIENT = ".attention.self.key.bias"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning_assets")
    return {"prep": write_prepared(root / "prepared"), "bert": write_tiny_text_model(root / "bert")}


def overrides(assets, out: Path, mode: str) -> list[str]:
    # eval only at the end: best/ holds the weights of the last step
    return [f"data={assets['prep']}", f"output_dir={out}", f"run_name={mode}", f"model.text_model_path={assets['bert']}",
            "model.item_tower=hybrid", f"model.text_mode={mode}", "model.d_model=32", "model.max_len=20",
            "model.dropout=0.1", "batch_size=8", "eval_batch_size=8", "tracker=none", f"max_steps={STEPS}",
            "optim.warmup_steps=3", f"optim.lr={LR}", "eval_every=0", "save_every=0", "early_stopping_patience=0",
            "evaluate_test=false"]


def plain_key(k: str) -> str:
    """A trained model's encoder key -> the HF folder's key (peft prefix and base_layer dropped)."""
    return k.removeprefix(PEFT).removeprefix(ENC).replace(".base_layer.", ".")


def merged_reference(best: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """LoRA's definition, computed here (independently of peft's merge, which export uses): each adapted Linear's
    W + scaling * B @ A, every other encoder weight as it is; keys of the HF folder."""
    out = {}
    for k, v in best.items():
        if not k.startswith(ENC) or ".lora_" in k:
            continue
        if k.endswith(".base_layer.weight"):
            stem = k[: -len(".base_layer.weight")]
            v = v + scaling * (best[f"{stem}.lora_B.default.weight"] @ best[f"{stem}.lora_A.default.weight"])
        out[plain_key(k)] = v
    return out


def initial_state(run_dir: Path, bert: Path) -> dict[str, torch.Tensor]:
    """The run's model before its first step: train/loop.py seeds with cfg.seed right before building it."""
    from accelerate.utils import set_seed

    cfg = load_config(TrainConfig, run_dir / "train_config.yaml")
    set_seed(cfg.seed)
    return SeqRecModel(cfg.model.rec_config(40, 2, 0), text_model_path=str(bert)).state_dict()


def item_vectors_and_scores(model: SeqRecModel, items) -> tuple[torch.Tensor, torch.Tensor]:
    cat = Catalogue.build(items, model)
    with torch.no_grad():
        v = cat.item_vectors(model)  # (I, d)
        hist = torch.tensor([[0, 1, 2, 3], [5, 7, 9, 11]])  # two users' histories (item indices)
        return v, model.score(model.user_vectors(hist, torch.zeros_like(hist), catalogue=cat), v)  # (2, I)


def check_tuning(mode: str, run_dir: Path, assets) -> dict:
    base = load_file(str(assets["bert"] / "model.safetensors"))  # the untuned tower (pooler dropped by the model)
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    enc = {k: v for k, v in best.items() if k.startswith(ENC)}
    assert enc, f"{run_dir}/best holds no text encoder weights"
    adapters = {k: v for k, v in enc.items() if ".lora_" in k}
    weights = {k: v for k, v in enc.items() if ".lora_" not in k}
    assert {plain_key(k) for k in weights} == {k for k in base if not k.startswith("pooler.")}, sorted(weights)[:5]
    moved = {k for k, v in weights.items() if not torch.equal(v, base[plain_key(k)])}
    # a gradient-driven move is ~lr per Adam step; weight decay alone moves a tensor by ~lr x 0.01 x |w| (< 1e-5)
    learned = {k for k, v in weights.items() if (v - base[plain_key(k)]).abs().max() > 1e-4}
    if mode in ("frozen", "lora"):
        assert not moved, f"{mode}: encoder weights changed: {sorted(moved)[:5]}"
    if mode == "frozen":
        assert not adapters
    if mode == "lora":
        # every targeted module (query/key/value/dense of both layers) has an adapter; B starts at 0 (peft), so a
        # B that is no longer 0 was trained, and A moved from its seeded start by no more than Adam's ~lr per step
        stems = {k.rsplit(".lora_", 1)[0] for k in adapters}
        assert len(stems) == 2 * 6 and len(adapters) == 2 * len(stems), sorted(stems)
        init = initial_state(run_dir, assets["bert"])
        for k, v in adapters.items():
            if ".lora_B." in k:
                assert v.abs().max() > 1e-4, f"{k} is still (near) its zero init"
            else:
                d = (v - init[k]).abs().max()
                assert 1e-4 < d <= STEPS * LR, f"{k}: moved {float(d)} from its initial value"
    if mode in ("full", "top"):
        want = {k for k in weights if not k.endswith(NO_GRADIENT) and (mode == "full" or plain_key(k).startswith(TOP))}
        assert learned == want, f"{mode}: not learned {sorted(want - learned)[:5]}, unexpected {sorted(learned - want)[:5]}"
        assert moved == {k for k in weights if mode == "full" or plain_key(k).startswith(TOP)}, sorted(moved)[:5]

    # ---- final/: loads, carries the tuned encoder (LoRA merged), and its scores differ from the untuned tower's
    import datasets

    model, info = load_final(run_dir / "final")
    assert info["trained_text_mode"] == mode and model.cfg.text_mode == "frozen"
    assert not any(k.startswith(ENC) for k in load_file(str(run_dir / "final" / "model.safetensors")))  # stored once
    fin = load_file(str(run_dir / "final" / "item_tower" / "model.safetensors"))
    pooler = {k for k in fin if k.startswith("pooler.")}  # unused by the model: the text model's own, kept whole
    assert pooler and all(torch.equal(fin.pop(k), base[k]) for k in pooler)
    assert not any(".lora_" in k for k in fin)
    assert (run_dir / "final" / "item_tower_lora" / "adapter_config.json").is_file() == (mode == "lora")
    if mode == "lora":
        cfg = load_config(TrainConfig, run_dir / "train_config.yaml").model
        want_fin = merged_reference(best, cfg.lora_alpha / cfg.lora_r)
    else:
        want_fin = {plain_key(k): v for k, v in weights.items()}
    assert fin.keys() == want_fin.keys() and all(torch.equal(fin[k], want_fin[k]) for k in fin)
    differs = sorted(k for k in fin if not torch.equal(fin[k], base[k]))
    items = datasets.load_from_disk(str(assets["prep"] / "items"))
    tuned_v, tuned_s = item_vectors_and_scores(model, items)
    model.text_encoder.load_state_dict({k: v for k, v in base.items() if not k.startswith("pooler.")}, strict=True)
    untuned_v, untuned_s = item_vectors_and_scores(model, items)  # the same model with the untuned tower
    gap = float((tuned_s - untuned_s).abs().max())
    if mode == "frozen":
        assert not differs and torch.equal(tuned_v, untuned_v) and gap == 0.0
    else:
        # lora: exactly the adapted Linear weights (merged W + s B A) differ from the base; full: all
        targeted = [k for k in fin if k.endswith(".weight") and any(f".{m}." in f".{k}" for m in ("query", "key", "value", "dense"))]
        want = targeted if mode == "lora" else [k for k in fin if k.startswith(TOP)] if mode == "top" else fin
        assert differs == sorted(want), differs
        assert gap > 1e-4, f"{mode}: final/'s scores equal the untuned tower's (max |diff| {gap})"
    return {"moved": len(moved), "learned": len(learned), "adapters": len(adapters), "score_gap": gap}


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("mode", MODES)
def test_text_tower_one_process(assets, tmp_path, mode):
    from train.loop import run

    assert run(load_config(TrainConfig, None, overrides(assets, tmp_path, mode))) == 0
    check_tuning(mode, tmp_path / mode, assets)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zero", [2, 3])
def test_text_tower_deepspeed(assets, tmp_path, mode, zero):
    """2 CPU processes through the launch file users use (ZeRO-3: the encoder is partitioned and gathered for best/)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / f"cpu_ds_zero{zero}.yaml"), "-m", "train", *overrides(assets, tmp_path, mode)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"exit {p.returncode}\n{log[-6000:]}"
    assert f"world size 2 | distributed DEEPSPEED | precision no | ZeRO stage {zero}" in log, log[-3000:]
    check_tuning(mode, tmp_path / mode, assets)
