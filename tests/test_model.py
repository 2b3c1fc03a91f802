"""Units for train/model.py and train/export.py (tiny towers, CPU, seconds)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import random_item_tokens as _tokens  # noqa: E402

from train.catalogue import Catalogue  # noqa: E402
from train.export import export_final, load_final  # noqa: E402
from train.model import RecModelConfig, SeqRecModel  # noqa: E402


def _model(tower="id", path=None, **kw) -> tuple[SeqRecModel, Catalogue]:
    """A 12-item model and its catalogue (train/catalogue.py: the items' tokens, frozen features when frozen)."""
    cfg = RecModelConfig(num_items=12, num_event_types=2, item_tower=tower, text_model_path=str(path or ""),
                         d_model=16, n_layers=2, n_heads=2, max_len=8, dropout=0.0, **kw)
    torch.manual_seed(0)
    m = SeqRecModel(cfg)
    cat = Catalogue.from_tokens(*_tokens(12)) if m.uses_text else Catalogue(12)
    if m.uses_text and cfg.text_mode == "frozen":
        cat.prepare(m)
    return m, cat


def test_shapes_and_losses_backprop():
    m, _ = _model("id")  # an id-only model needs no catalogue
    hist = torch.tensor([[-1, -1, 1, 2, 3], [4, 5, 6, 7, 8]])
    tgt = torch.tensor([[-1, -1, 2, 3, 4], [5, 6, 7, 8, 9]])
    et = torch.zeros_like(hist)
    assert m.user_states(hist, et).shape == (2, 5, 16)
    assert m.user_vectors(hist, et).shape == (2, 16)
    assert m.all_item_vectors().shape == (12, 16)
    out = m(hist, et, tgt)
    assert out["n_targets"] == 8 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.item_emb.weight.grad is not None and m.item_emb.weight.grad.abs().sum() > 0
    # full softmax over 12 items with near-random init: loss close to log(12)
    assert abs(out["ce"].item() - torch.log(torch.tensor(12.0)).item()) < 0.5


def test_causal_and_left_padding_invariance():
    m = _model("id")[0].eval()
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 9, 10]])  # differs only from position 2 on
    sa, sb = m.user_states(a), m.user_states(b)
    assert torch.allclose(sa[:, :2], sb[:, :2], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(sa[:, 3], sb[:, 3])
    short = torch.tensor([[3, 4]])
    padded = torch.tensor([[-1, -1, -1, 3, 4]])
    assert torch.allclose(m.user_vectors(short), m.user_vectors(padded), atol=1e-5)


def test_sampled_softmax_with_logq_backprops():
    m, _ = _model("id", loss="sampled_softmax")
    hist = torch.tensor([[-1, 1, 2, 3]])
    tgt = torch.tensor([[-1, 2, 3, 4]])
    logq = torch.log(torch.full((12,), 0.1))
    out = m(hist, None, tgt, negatives=torch.tensor([7, 8, 9]), item_log_q=logq)
    assert set(out) == {"loss", "ce", "n_targets"} and torch.equal(out["loss"], out["ce"])
    out["loss"].backward()
    assert m.item_emb.weight.grad is not None


@pytest.mark.parametrize("tower", ["id", "hybrid"])
def test_sampled_softmax_leaves_seen_items_out_and_backprops(tower, tiny_bert):
    """sampled_softmax with exclude_seen_in_loss (the amazon recipes' setting): each position's earlier history items
    leave its softmax unless they are its target, and the backward runs (it once failed: the seen columns were
    masked in place on logits autograd still needed)."""
    m, cat = _model(tower, tiny_bert if tower != "id" else None, loss="sampled_softmax", exclude_seen_in_loss=True)
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 4, 6]])
    tgt = torch.tensor([[-1, 2, 3, 1], [5, 4, 6, 7]])
    neg = torch.tensor([8, 9])
    out = m(hist, None, tgt, negatives=neg, catalogue=cat if m.uses_text else None)
    out["loss"].backward()
    assert m.item_emb.weight.grad is not None and m.item_emb.weight.grad.abs().sum() > 0
    # the same loss by hand: candidates = distinct targets + negatives, a position's seen items at -inf but its target
    with torch.no_grad():
        cand = torch.unique(torch.cat([tgt[tgt >= 0], neg]))
        vec = m.item_vectors(cand, cat if m.uses_text else None)
        hist_vec = torch.zeros(2, 4, vec.size(1))
        for b in range(2):
            for t in range(4):
                if hist[b, t] >= 0:
                    hist_vec[b, t] = m.item_vectors(hist[b, t : t + 1], cat if m.uses_text else None)[0]
        states = m._states_from_vectors(hist, None, hist_vec)
        losses = []
        for b in range(2):
            for t in range(4):
                if tgt[b, t] < 0:
                    continue
                logits = states[b, t] @ vec.T
                for seen in hist[b, : t + 1].tolist():
                    if seen >= 0 and seen != tgt[b, t] and seen in cand.tolist():
                        logits[cand.tolist().index(seen)] = -math.inf
                losses.append(-torch.log_softmax(logits, 0)[cand.tolist().index(int(tgt[b, t]))])
        assert out["loss"].item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_click_head_is_gone_and_old_exports_still_load():
    """The seed article's BCE click head was removed (docs/RESULTS.md): exports written before (bce_click_weight 0.0 in
    model_config.json) load; a config that still sets it is an unknown key; one trained with it is refused by name."""
    cfg = RecModelConfig.from_dict({**_model("id")[0].cfg.to_dict(), "bce_click_weight": 0.0})
    assert "bce_click_weight" not in cfg.to_dict()
    with pytest.raises(ValueError, match="BCE click head"):
        RecModelConfig.from_dict({**cfg.to_dict(), "bce_click_weight": 0.5})


def test_text_tower_encodes_each_distinct_item_once(tiny_bert):
    m, cat = _model("text", tiny_bert, text_mode="full")
    seen = []
    m.text_encoder.register_forward_hook(lambda mod, inp, out: seen.append(out.last_hidden_state.shape[0]))
    hist = torch.tensor([[1, 1, 2, 3], [3, 2, 1, 5]])
    tgt = torch.tensor([[1, 2, 3, 4], [2, 1, 5, 6]])
    cfg = m.cfg
    cfg.loss = "sampled_softmax"
    m(hist, None, tgt, negatives=torch.tensor([6, 7]), catalogue=cat)
    # distinct items over history, targets and negatives: {1,2,3,4,5,6,7} -> ONE encoder call on 7 rows
    assert seen == [7]


def test_frozen_features_match_live_encoder_and_cold_items_use_text(tiny_bert):
    frozen, cat = _model("hybrid", tiny_bert, text_mode="frozen")
    frozen.eval()
    vec_frozen = cat.item_vectors(frozen)
    live_feats = frozen._encode_text(torch.arange(12), cat)
    assert torch.allclose(cat.features, live_feats, atol=1e-5)
    # item 11 never seen in training: its id row is masked, its vector is the text projection alone
    counts = torch.ones(12)
    counts[11] = 0
    frozen.set_seen_items(counts)
    v = frozen.item_vectors(torch.tensor([11]), cat)
    assert torch.allclose(v, frozen.text_proj(cat.features[11:12]), atol=1e-6)
    assert not torch.allclose(frozen.item_vectors(torch.tensor([10]), cat), frozen.text_proj(cat.features[10:11]))
    # items added after training (index >= num_items) are scored from text alone
    ids, lens = _tokens(14, seed=0)
    cat14 = Catalogue.from_tokens(ids, lens)
    cat14.prepare(frozen)
    assert cat14.item_vectors(frozen).shape == (14, 16)
    assert vec_frozen.shape == (12, 16)


def test_export_roundtrip_and_lora_merge(tiny_bert, tmp_path):
    m, cat = _model("hybrid", tiny_bert, text_mode="lora", lora_target_modules=["query", "value"])
    m.eval()
    # LoRA B starts at zero: make the adapter non-trivial so merging matters
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    with torch.no_grad():
        ref = m.score(m.user_vectors(hist, catalogue=cat), m.all_item_vectors(cat))
    info = export_final(tmp_path / "final", m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"},
                        {"valid": {"NDCG@10": 0.1}}, item_ids=[f"i{i}" for i in range(12)])
    assert (tmp_path / "final" / "item_tower" / "config.json").is_file()
    loaded, linfo = load_final(tmp_path / "final")
    assert linfo["model_version"] == info["model_version"] and linfo["metrics"]["valid"]["NDCG@10"] == 0.1
    assert loaded.cfg.text_mode == "frozen" and not any("lora" in k for k in loaded.state_dict())
    lcat = Catalogue.from_tokens(cat.tokens, cat.lengths)
    lcat.prepare(loaded)
    with torch.no_grad():
        got = loaded.score(loaded.user_vectors(hist, catalogue=lcat), lcat.item_vectors(loaded))
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


def _texts_to_tokens(tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].sum(1)


def test_final_item_tower_opens_with_transformers(tiny_bert, tmp_path):
    """final/item_tower is a whole Hugging Face model folder holding the TRAINED encoder: AutoModel and
    AutoTokenizer load it (nothing freshly initialised) and give the text features of the model's tower."""
    from transformers import AutoModel, AutoTokenizer

    from train.model import pool_hidden

    m = _model("hybrid", tiny_bert, text_mode="full")[0].eval()
    with torch.no_grad():  # a trained encoder differs from the text model it started from
        for p in m.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_final(tmp_path / "final", m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    tower = tmp_path / "final" / "item_tower"
    enc, loading = AutoModel.from_pretrained(str(tower), output_loading_info=True)
    assert not any(loading.values()), loading  # no missing / unexpected / mismatched weights
    tok = AutoTokenizer.from_pretrained(str(tower))
    ids, lens = _texts_to_tokens(tok, ["a red book", "the green film number two", "blue"])
    attn = (torch.arange(ids.size(1))[None, :] < lens[:, None]).long()
    with torch.no_grad():
        hf = pool_hidden(enc(input_ids=ids, attention_mask=attn).last_hidden_state, attn, "mean")
        ours = m.encode_text(ids, lens)
        loaded, _ = load_final(tmp_path / "final")
        lcat = Catalogue.from_tokens(ids, lens)
        lcat.prepare(loaded)
    assert torch.allclose(hf, ours, atol=1e-6), (hf - ours).abs().max()
    assert torch.equal(lcat.features, hf)
    # the encoder is stored once: model.safetensors holds the rest of the recommender
    from safetensors.torch import load_file

    assert not any(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "final" / "model.safetensors")))
    # BERT's pooler (unused by lmrec) keeps the text model's weights, so the folder is a whole model
    base = AutoModel.from_pretrained(str(tiny_bert))
    assert torch.equal(enc.pooler.dense.weight, base.pooler.dense.weight)
    assert not torch.equal(enc.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_lora_export_holds_a_peft_adapter_whose_merge_is_the_exported_tower(tiny_bert, tmp_path):
    """A LoRA run writes final/item_tower_lora/ in peft's format: PeftModel.from_pretrained loads it on the text
    model the run started from, and its merge equals the merged weights in final/item_tower/."""
    import json

    from peft import PeftModel
    from transformers import AutoModel

    m = _model("hybrid", tiny_bert, text_mode="lora", lora_target_modules=["query", "value", "dense"])[0].eval()
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    final = tmp_path / "final"
    export_final(final, m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    adapter = final / "item_tower_lora"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_bert) and conf["r"] == m.cfg.lora_r
    assert conf["exclude_modules"] == ["pooler.dense"]  # trained without BERT's pooler: no adapter there
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_bert)), str(adapter))
    trained = {k: v for k, v in m.text_encoder.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(trained) == set(got) and all(torch.equal(trained[k], got[k]) for k in trained)
    merged = peft_model.merge_and_unload().state_dict()
    exported = AutoModel.from_pretrained(str(final / "item_tower")).state_dict()
    assert set(merged) == set(exported)
    assert all(torch.equal(merged[k], exported[k]) for k in merged), [k for k in merged if not torch.equal(merged[k], exported[k])]
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(exported[q], AutoModel.from_pretrained(str(tiny_bert)).state_dict()[q])  # the adapter is in it


def test_final_without_item_ids_is_refused_by_name(tiny_bert, tmp_path):
    """item_ids.parquet is required: export_final will not write a final without it, and a final without it (an
    export from before the ids existed) is refused naming the file; there is no fallback to the training data."""
    import json

    from lmrec_common.manifest import sha256_file
    from train.export import ExportIntegrityError, WarmStartError, _export_files, warm_start

    m, _ = _model("id")
    with pytest.raises(ValueError, match="item_ids.parquet is required"):
        export_final(tmp_path / "none", m.state_dict(), m.cfg, None, {}, {"version": "v1"}, {}, item_ids=None)
    final = tmp_path / "final"
    export_final(final, m.state_dict(), m.cfg, None, {}, {"version": "v1", "config": {"output_dir": str(tmp_path)}}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    (final / "item_ids.parquet").unlink()
    e = json.loads((final / "export.json").read_text())
    e["files_sha256"] = {f: sha256_file(final / f) for f in _export_files(final)}
    (final / "export.json").write_text(json.dumps(e))
    with pytest.raises(ExportIntegrityError, match=r"final/item_ids.parquet: missing: .*train it again"):
        load_final(final)
    with pytest.raises(WarmStartError, match=r"final/item_ids.parquet: missing"):
        warm_start(_model("id")[0], final, [f"i{i}" for i in range(12)])


def test_final_in_the_previous_layout_still_loads(tiny_bert, tmp_path):
    """Exports written before item_tower/ held weights (the encoder inside model.safetensors, item_tower/ with
    config and tokenizer only) load to the same model, and warm-start a run to the same weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from lmrec_common.manifest import sha256_file
    from train.export import _export_files, warm_start

    m, cat = _model("hybrid", tiny_bert, text_mode="full")
    m.eval()
    with torch.no_grad():
        for p in m.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = [f"i{i}" for i in range(12)]
    new = tmp_path / "new"
    export_final(new, m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"}, {}, item_ids=ids)
    old = tmp_path / "old"  # rewrite it as the previous export_final did
    shutil.copytree(new, old)
    sd = load_file(str(old / "model.safetensors"))
    enc = AutoModel.from_pretrained(str(old / "item_tower"))
    enc.pooler = None
    sd.update({f"text_encoder.{k}": v for k, v in enc.state_dict().items()})
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "pt"})
    (old / "item_tower" / "model.safetensors").unlink()
    e = json.loads((old / "export.json").read_text())
    e["files_sha256"] = {f: sha256_file(old / f) for f in _export_files(old)}
    e["weights_sha256"] = e["files_sha256"]["model.safetensors"]
    (old / "export.json").write_text(json.dumps(e))

    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    scores, states = [], []
    for f in (new, old):
        loaded, _ = load_final(f)
        lcat = Catalogue.from_tokens(cat.tokens, cat.lengths)
        lcat.prepare(loaded)
        with torch.no_grad():
            scores.append(loaded.score(loaded.user_vectors(hist, catalogue=lcat), lcat.item_vectors(loaded)))
        fresh, _ = _model("hybrid", tiny_bert, text_mode="full")
        warm_start(fresh, f, ids, text_model_dir=tiny_bert)
        states.append(fresh.state_dict())
    assert torch.equal(scores[0], scores[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(states[0]["text_encoder.embeddings.word_embeddings.weight"],
                       m.state_dict()["text_encoder.embeddings.word_embeddings.weight"])


def test_bad_text_model_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face transformer"):
        _model("text", tmp_path / "empty")
    with pytest.raises(ValueError, match="not divisible"):
        RecModelConfig(num_items=3, d_model=10, n_heads=3).validate()


def test_half_precision_checkpoint_loads_as_float32(tiny_bert, tmp_path):
    """A folder saved in fp16 (an fp16 export, a bf16 Qwen) trains on float32 master weights."""
    from transformers import AutoModel

    from train.model import load_text_encoder

    half = tmp_path / "fp16"
    AutoModel.from_pretrained(str(tiny_bert)).half().save_pretrained(str(half))
    enc = load_text_encoder(str(half))
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    ref = load_text_encoder(str(tiny_bert))
    w, w_half = dict(ref.named_parameters()), dict(enc.named_parameters())
    assert w.keys() == w_half.keys()
    for name, p in w_half.items():  # the same weights, rounded through fp16
        assert torch.allclose(p, w[name].half().float()), name


def test_items_without_training_events_are_not_softmax_negatives(tiny_bert):
    """Cold items (n_train_events == 0) are left out of the full-softmax candidates, so training never
    pushes their text vectors down; their text tower input cannot change the loss."""
    m, cat = _model("text", tiny_bert)
    m.eval()
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8]])
    et = torch.zeros_like(hist)
    counts = torch.ones(12)
    counts[[10, 11]] = 0  # never seen in training
    loss_all = m(hist, et, tgt, catalogue=cat)["ce"].item()
    m.set_seen_items(counts)
    cat.set_training_counts(counts)
    loss_masked = m(hist, et, tgt, catalogue=cat)["ce"].item()
    # the same logits minus two candidates: strictly smaller cross-entropy
    assert loss_masked < loss_all
    # the cold items' features no longer influence the loss at all
    cat.features[10:] += 5.0
    assert m(hist, et, tgt, catalogue=cat)["ce"].item() == pytest.approx(loss_masked, abs=1e-6)


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 4 * 50 * 7])  # one chunk; chunks of 7 rows (37 = 5x7 + 2)
def test_fused_linear_softmax_ce_matches_cross_entropy_value_and_gradients(chunk_bytes):
    from train.model import linear_softmax_cross_entropy

    g = torch.Generator().manual_seed(3)
    u0, t0 = torch.randn(37, 8, generator=g) * 2, torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    u1, t1 = u0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    u2, t2 = u0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    la = linear_softmax_cross_entropy(u1, t1, labels, chunk_bytes=chunk_bytes)
    lb = torch.nn.functional.cross_entropy(u2 @ t2.T, labels)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    (la * 3).backward()
    (lb * 3).backward()
    assert torch.allclose(u1.grad, u2.grad, atol=1e-5) and torch.allclose(t1.grad, t2.grad, atol=1e-5)
    # no gradient wanted (evaluation): value only; no rows: zero loss
    with torch.no_grad():
        assert linear_softmax_cross_entropy(u0, t0, labels).item() == pytest.approx(lb.item(), rel=1e-6)
    assert linear_softmax_cross_entropy(torch.zeros(0, 8), t0, labels[:0]).item() == 0.0


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 4 * 50 * 7])
def test_fused_ce_leaves_masked_columns_out_but_never_the_label(chunk_bytes):
    """``masked`` columns get -inf logits before the softmax (so no gradient either); the row's own label
    stays even when listed (a repeat of a seen item); -1 entries mask nothing."""
    from train.model import linear_softmax_cross_entropy

    g = torch.Generator().manual_seed(4)
    u0, t0 = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    masked = torch.randint(0, 50, (37, 6), generator=g)
    masked[:, 4:] = -1
    masked[0, 0] = labels[0]  # listed, but it is the target: stays
    ref_logits_mask = torch.zeros(37, 50, dtype=torch.bool)
    for r in range(37):
        for c in masked[r].tolist():
            if c >= 0 and c != labels[r]:
                ref_logits_mask[r, c] = True
    u1, t1 = u0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    u2, t2 = u0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    la = linear_softmax_cross_entropy(u1, t1, labels, chunk_bytes=chunk_bytes, masked=masked)
    lb = torch.nn.functional.cross_entropy((u2 @ t2.T).masked_fill(ref_logits_mask, -math.inf), labels)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    la.backward()
    lb.backward()
    assert torch.allclose(u1.grad, u2.grad, atol=1e-5) and torch.allclose(t1.grad, t2.grad, atol=1e-5)
    # lower than without the mask (fewer competitors), and masking nothing changes nothing
    assert la.item() < linear_softmax_cross_entropy(u0, t0, labels).item()
    none = torch.full_like(masked, -1)
    assert linear_softmax_cross_entropy(u0, t0, labels, masked=none).item() == pytest.approx(
        linear_softmax_cross_entropy(u0, t0, labels).item(), rel=1e-6)
    with pytest.raises(ValueError, match="rows"):
        linear_softmax_cross_entropy(u0, t0, labels, masked=masked[:3])


def test_seen_before_lists_the_causal_prefix_of_each_target_position():
    from train.model import seen_before

    hist = torch.tensor([[-1, -1, 3, 5], [7, 8, 9, 7]])
    tmask = torch.tensor([[False, False, True, True], [True, False, False, True]])
    got = seen_before(hist, tmask)
    assert got.tolist() == [[-1, -1, 3, -1], [-1, -1, 3, 5], [7, -1, -1, -1], [7, 8, 9, 7]]


def test_exclude_seen_in_loss_changes_only_the_loss(tiny_bert):
    """With exclude_seen_in_loss the history items leave each position's softmax: a lower CE on the same
    weights; gathered candidates (Catalogue.set_training_counts) map the items to their columns; scoring unchanged;
    the sampled softmax leaves out the seen items among its candidates."""
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8]])
    et = torch.zeros_like(hist)
    for tower in ("id", "hybrid"):
        (a, cat), (b, _) = _model(tower, tiny_bert), _model(tower, tiny_bert, exclude_seen_in_loss=True)
        a.eval(), b.eval()
        ce_a, ce_b = a(hist, et, tgt, catalogue=cat)["ce"].item(), b(hist, et, tgt, catalogue=cat)["ce"].item()
        assert ce_b < ce_a
        # reference: cross-entropy over the (N, I) logits with the causal history masked by hand
        u = b.user_states(hist, et, catalogue=cat)[tgt != -1]
        logits = u @ b.all_item_vectors(cat).T
        rows = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
        for n, (r, t) in enumerate(rows):
            for s in range(t + 1):
                if hist[r, s] >= 0:
                    logits[n, hist[r, s]] = -math.inf
        assert ce_b == pytest.approx(torch.nn.functional.cross_entropy(logits, tgt[tgt != -1]).item(), rel=1e-5)
        assert torch.equal(a.user_vectors(hist, et, catalogue=cat), b.user_vectors(hist, et, catalogue=cat))
        # candidates gathered to the items with training events: same value as the plain path
        counts = torch.ones(12)
        counts[[10, 11]] = 0
        cat.set_training_counts(counts)
        logits[:, 10:] = -math.inf
        assert b(hist, et, tgt, catalogue=cat)["ce"].item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits, tgt[tgt != -1]).item(), rel=1e-5)
    # sampled softmax: candidates = distinct targets + negatives; the seen ones among them are left out
    neg = torch.tensor([0, 1, 9])
    a, _ = _model("id", loss="sampled_softmax")
    b, _ = _model("id", loss="sampled_softmax", exclude_seen_in_loss=True)
    a.eval(), b.eval()
    cand = torch.unique(torch.cat([tgt[tgt != -1], neg]))
    u = b.user_states(hist, et)[tgt != -1]
    logits = u @ b.all_item_vectors()[cand].T
    label = torch.searchsorted(cand, tgt[tgt != -1])
    assert a(hist, et, tgt, negatives=neg)["ce"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, label).item(), rel=1e-5)
    for n, (r, t) in enumerate(rows):
        for s in range(t + 1):
            item = int(hist[r, s])
            if item >= 0 and item in cand.tolist() and item != int(tgt[r, t]):
                logits[n, cand.tolist().index(item)] = -math.inf
    assert b(hist, et, tgt, negatives=neg)["ce"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, label).item(), rel=1e-5)


def test_cpu_dropout_rate_scale_and_determinism():
    from train.model import dropout

    x = torch.ones(400_000)
    torch.manual_seed(5)
    y = dropout(x, 0.2, True)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(0.8, abs=0.005)  # 400k draws: sd of the rate ~0.0006
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1.25)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the expectation
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2, True), y)  # the torch generator decides: seeds / resume are exact
    assert dropout(x, 0.2, False) is x and dropout(x, 0.0, True) is x
    # odd sizes and gradients
    z = torch.randn(3, 7, requires_grad=True)
    dropout(z, 0.5, True).sum().backward()
    assert set(torch.unique(z.grad).tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("tower", ["id", "hybrid"])
def test_last_position_user_vectors_match_full_states(tower, tiny_bert):
    """Evaluation/inference compute the last layer at the last position only and may gather history
    items from a precomputed table: the same vectors as the full forward's last position."""
    m, cat = _model(tower, tiny_bert)
    m.eval()
    hist = torch.tensor([[-1, -1, -1, 1, 2], [4, 5, 6, 7, 8], [-1, -1, -1, -1, 11]])
    et = torch.tensor([[0, 0, 0, 1, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]])
    with torch.no_grad():
        full = m.user_states(hist, et, catalogue=cat)[:, -1]
        fast = m.user_vectors(hist, et, catalogue=cat)
        from_table = m.user_vectors(hist, et, item_table=cat.item_vectors(m))
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(from_table, full, atol=1e-5)
    # training mode keeps the full path (dropout, every position)
    m.train()
    assert m.user_vectors(hist, et, catalogue=cat).shape == (3, 16)


def test_id_dropout_drops_whole_id_rows_in_training_only(tiny_bert):
    m, cat = _model("hybrid", tiny_bert, text_mode="frozen", id_dropout=0.5)
    with torch.no_grad():
        m.item_emb.weight.normal_()  # id rows far from zero, so a dropped row is unmistakable
    text = m.text_proj(cat.features[:12])
    full = text + m.item_emb.weight[:12]
    m.train()
    torch.manual_seed(3)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3, 7])  # repeats: one draw per distinct item
    v = m.item_vectors(idx, cat)
    dropped = torch.tensor([torch.allclose(v[i], text[j], atol=1e-5) for i, j in enumerate(idx.tolist())])
    kept = torch.tensor([torch.allclose(v[i], full[j], atol=1e-5) for i, j in enumerate(idx.tolist())])
    assert bool((dropped ^ kept).all())  # each row is either text alone or text + its whole id row
    assert 0 < int(dropped[:12].sum()) < 12
    assert dropped[12] == dropped[13] == dropped[3] and dropped[14] == dropped[7]
    torch.manual_seed(3)
    assert torch.equal(m.item_vectors(idx, cat), v)  # torch's generator decides: seeded runs and resume stay exact
    # evaluation / inference never drop
    m.eval()
    assert torch.allclose(m.item_vectors(torch.arange(12), cat), full, atol=1e-5)
    # only meaningful for the hybrid tower, and a rate in [0, 1)
    with pytest.raises(ValueError, match="id_dropout"):
        RecModelConfig(num_items=3, item_tower="id", id_dropout=0.1).validate()
    with pytest.raises(ValueError, match="id_dropout"):
        RecModelConfig(num_items=3, item_tower="hybrid", id_dropout=1.0).validate()


def test_linear_text_adaptor_and_text_dropout(tiny_bert, tmp_path):
    """text_adaptor linear: the text part is one affine map of the encoder features (so it is linear in them);
    text_dropout: whole-feature dropout before the adaptor in training only, one mask per item and step."""
    m, cat = _model("hybrid", tiny_bert, text_mode="frozen", text_adaptor="linear", text_dropout=0.5)
    assert len(m.text_proj) == 1 and isinstance(m.text_proj[0], torch.nn.Linear)
    f = cat.features[:12]
    m.eval()
    lin = m.project_text(f)
    # affine: the map of a mix of two items' features is the same mix of their vectors
    mix = m.project_text(0.25 * f[:6] + 0.75 * f[6:])
    assert torch.allclose(mix, 0.25 * lin[:6] + 0.75 * lin[6:], atol=1e-5)
    m.train()
    torch.manual_seed(1)
    v = m.item_vectors(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3]), cat)
    assert torch.equal(v[12], v[3]) and torch.equal(v[13], v[3])  # one draw per distinct item and step
    m.eval()
    assert not torch.allclose(v[:12], m.item_vectors(torch.arange(12), cat))  # training drew a mask
    torch.manual_seed(1)
    m.train()
    assert torch.equal(m.item_vectors(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3]), cat), v)  # seeded
    # the exported model rebuilds the same adaptor
    m.eval()
    export_final(tmp_path / "final", m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    loaded, _ = load_final(tmp_path / "final")
    assert loaded.cfg.text_adaptor == "linear" and len(loaded.text_proj) == 1
    assert torch.allclose(loaded.project_text(f), lin, atol=1e-6)
    with pytest.raises(ValueError, match="text_dropout"):
        RecModelConfig(num_items=3, text_dropout=1.0).validate()
    with pytest.raises(ValueError, match="text_adaptor"):
        RecModelConfig(num_items=3, text_adaptor="moe").validate()


def test_validation_scores_are_float32_under_bf16_autocast():
    """train.loop.model_scorer ranks in float32 even inside the training's bf16 autocast: a bf16 (B, I)
    product rounds nearby scores into ties, which target_ranks counts against the target."""
    from train.loop import model_scorer

    m = SeqRecModel(RecModelConfig(num_items=3000, num_event_types=1, item_tower="id", d_model=32, n_layers=1,
                                   n_heads=1, max_len=8, dropout=0.0)).eval()
    torch.manual_seed(1)
    batch = {"hist": torch.randint(1, 3000, (16, 8)), "event_types": torch.zeros(16, 8, dtype=torch.long)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model_scorer(m)(batch)
        items = m.all_item_vectors().float()
        u = m.user_vectors(batch["hist"], batch["event_types"], item_table=items).float()
        low = m.score(u, items)  # what the scorer computed before: the product in bf16
    assert scores.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert torch.equal(scores, u @ items.T)  # the same vectors, multiplied in float32
    # the bf16 product ties many more scores than float32 does (the reason for the float32 product)
    ties = lambda s: s.shape[1] - torch.tensor([r.unique().numel() for r in s.float()]).float().mean()  # noqa: E731
    assert ties(low) > 10 * ties(scores) + 10


def test_pool_mode_starts_as_the_frozen_tower_and_trains_only_its_pooling(tiny_bert, tmp_path):
    """text_mode pool: before training the item vectors are the frozen hybrid's (mean features, zero correction);
    the tokens' coordinates are whitened departures from their item's mean on a fitted basis; a few steps move the
    pooling and no encoder weight; final/ keeps the pooling and its basis and serves the same vectors, and a
    catalogue with a new item is projected on the SAME basis (not refitted)."""
    frozen, fcat = _model("hybrid", tiny_bert)
    m, cat = _model("hybrid", tiny_bert, text_mode="pool", pool_heads=2, pool_rank=8)
    assert not m.pool_basis.any()
    cat.prepare(m)  # fits the model's pool basis (a new model) and the tokens' coordinates on it
    assert m.pool_basis.any()
    with torch.no_grad():
        m.text_proj.load_state_dict(frozen.text_proj.state_dict())
        m.item_emb.weight.copy_(frozen.item_emb.weight)
        assert torch.allclose(cat.features, fcat.features, atol=1e-5)
        assert torch.allclose(cat.item_vectors(m), fcat.item_vectors(frozen), atol=1e-5)
    z = cat.states
    assert z.shape == (int(cat.lengths.sum()), 8) and torch.allclose(z.pow(2).mean(0), torch.ones(8), atol=1e-2)
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    m.train()
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8]])
    for step in range(3):
        opt.zero_grad()
        m(hist, None, tgt, catalogue=cat)["loss"].backward()
        if step == 0:
            assert m.text_pool.out.weight.grad.abs().sum() > 1e-4  # a real gradient from the first step
        opt.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert {"text_pool.query", "text_pool.out.weight"} <= moved and not any(n.startswith("text_encoder.") for n in moved)
    m.eval()
    with torch.no_grad():
        vecs = cat.item_vectors(m)
        assert m._pool_term(torch.arange(12), cat).abs().sum() > 0
    m.set_seen_items(torch.ones(12))
    export_final(tmp_path / "final", m.state_dict(), m.cfg, tiny_bert, {"run": "t"}, {"version": "v"}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    loaded, _ = load_final(tmp_path / "final")
    assert loaded.cfg.text_mode == "pool" and torch.equal(loaded.pool_basis, m.pool_basis)
    ids, lens = _tokens(13, seed=5)
    ids[:12], lens[:12] = cat.tokens, cat.lengths  # tonight: the same 12 items and one new
    tonight = Catalogue.from_tokens(ids, lens)
    tonight.prepare(loaded)  # what inference does
    assert torch.equal(loaded.pool_basis, m.pool_basis)
    with torch.no_grad():
        assert torch.allclose(tonight.item_vectors(loaded)[:12], vecs, atol=1e-4)


def test_pool_dropout_drops_the_pooled_coordinates_in_training_only(tiny_bert):
    """pool_dropout: dropout on the pooled token coordinates before the pooling's output map (text_dropout does not
    reach that path), in training only, one mask per distinct item and step, seeded."""
    m, cat = _model("hybrid", tiny_bert, text_mode="pool", pool_heads=2, pool_rank=8, pool_dropout=0.5)
    cat.prepare(m)
    torch.nn.init.normal_(m.text_pool.out.weight)  # a non-zero map, as after some training
    idx = torch.arange(12)
    m.eval()
    clean = m._pool_term(idx, cat)
    assert torch.equal(m._pool_term(idx, cat), clean)  # evaluation is deterministic
    m.train()
    torch.manual_seed(3)
    dropped = m._pool_term(idx, cat)
    assert not torch.allclose(dropped, clean)
    torch.manual_seed(3)
    assert torch.equal(m._pool_term(idx, cat), dropped)  # seeded: a resumed run draws the same masks
    torch.manual_seed(3)
    v = m.item_vectors(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3]), cat)
    assert torch.equal(v[12], v[3]) and torch.equal(v[13], v[3])  # one draw per distinct item and step
    # the mean over many masks is the clean term (inverted dropout keeps the expectation)
    mean = torch.stack([m._pool_term(idx, cat) for _ in range(400)]).mean(0)
    assert torch.allclose(mean, clean, atol=0.15 * clean.abs().max().item())
    with pytest.raises(ValueError, match="pool_dropout"):
        RecModelConfig(num_items=3, pool_dropout=-0.1).validate()
    # only where there is a pooling to drop from: not silently ignored elsewhere
    with pytest.raises(ValueError, match="pool_dropout 0.3 needs text_mode pool"):
        RecModelConfig(num_items=3, item_tower="hybrid", text_mode="frozen", pool_dropout=0.3).validate()
    with pytest.raises(ValueError, match="pool_dropout 0.3 needs text_mode pool"):
        RecModelConfig(num_items=3, item_tower="id", text_mode="pool", pool_dropout=0.3).validate()


def test_text_whiten_fits_once_on_the_training_catalogue_and_serves_the_same_space(tiny_bert, tmp_path):
    """text_whiten r: prepare() fits the features' mean, top r principal axes and spread on a new model's catalogue and
    the catalogue keeps the whitened coordinates (zero mean, identity covariance); a raw feature (a search query)
    goes through the same map; final/ carries the whitening and a later catalogue is whitened with it, not refitted;
    the pool mode is whitened the same way; settings where it cannot hold are refused."""
    for mode in ("frozen", "pool"):
        kw = dict(pool_rank=8, pool_heads=2) if mode == "pool" else {}
        m, cat = _model("hybrid", tiny_bert, text_mode=mode, text_whiten=4, **kw)
        if mode == "pool":
            assert not m.whitening_fitted()
            with pytest.raises(RuntimeError, match="not fitted"):
                m.project_text(torch.zeros(2, 32))
            cat.prepare(m)
        assert m.whitening_fitted() and cat.whitened and cat.features.shape == (12, 4)
        assert m.text_proj[0].in_features == 4
        z = cat.features.double()
        assert torch.allclose(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(z.T @ z / 12, torch.eye(4, dtype=torch.float64), atol=1e-3)
        m.eval()
        with torch.no_grad():
            vecs = cat.item_vectors(m)
            # the same titles as queries (raw encoder output, whitened in project_text) land on the items' text vectors
            attn = (torch.arange(cat.tokens.size(1))[None, :] < cat.lengths[:, None]).long()
            assert torch.allclose(m.query_text_vectors(cat.tokens, attn), m.text_vectors(torch.arange(12), cat), atol=1e-4)
        m.set_seen_items(torch.ones(12))
        export_final(tmp_path / mode, m.state_dict(), m.cfg, tiny_bert, {"run": "t"}, {"version": "v"}, {},
                     item_ids=[f"i{i}" for i in range(12)])
        loaded, _ = load_final(tmp_path / mode)
        assert torch.equal(loaded.text_basis, m.text_basis) and torch.equal(loaded.text_center, m.text_center)
        ids, lens = _tokens(13, seed=5)
        ids[:12], lens[:12] = cat.tokens, cat.lengths  # tonight: the same 12 items and one new
        tonight = Catalogue.from_tokens(ids, lens)
        tonight.prepare(loaded)  # what inference does: the model's whitening, not one fitted on tonight's 13 items
        assert torch.equal(loaded.text_basis, m.text_basis)
        with torch.no_grad():
            assert torch.allclose(tonight.item_vectors(loaded)[:12], vecs, atol=1e-4)
    wide, _ = _model("hybrid", tiny_bert, text_whiten=384)  # a recipe's r with a 32-wide encoder: every axis, no error
    assert wide.text_basis.shape == (32, 32) and wide.text_proj[0].in_features == 32
    with pytest.raises(ValueError, match="text_whiten -1 must be >= 0"):
        RecModelConfig(num_items=3, text_whiten=-1).validate()
    for tower, mode in (("hybrid", "lora"), ("hybrid", "top"), ("id", "frozen")):
        with pytest.raises(ValueError, match="text_whiten 8 needs text_mode frozen or pool"):
            RecModelConfig(num_items=3, item_tower=tower, text_mode=mode, text_whiten=8).validate()


def test_top_mode_is_the_whole_encoder_from_cached_states_and_trains_only_the_top_layer(tiny_bert, tmp_path):
    """text_mode top: the catalogue caches every token's output of the frozen lower layer once; the trained top layer
    run from that cache gives what the whole encoder gives (float16 cache), in chunks sorted by length or not; a
    sampled-softmax step moves the top layer and nothing below it; final/ is a frozen tower whose whole-encoder
    vectors are the trained model's."""
    m, cat = _model("hybrid", tiny_bert, text_mode="top", top_layers=1, loss="sampled_softmax")
    cat.prepare(m)
    assert cat.states.dtype == torch.float16 and cat.states.shape == (int(cat.lengths.sum()), 32)
    trainable = [n for n, p in m.text_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    m.eval()
    idx = torch.tensor([5, 0, 11, 3, 3, 7])
    with torch.no_grad():
        whole = m.encode_text(cat.tokens[idx], cat.lengths[idx])
        top = m._encode_text(idx, cat)
        assert torch.allclose(top, whole, atol=5e-3), (top - whole).abs().max()
        m.TOP_CHUNK = 2  # several chunks of different lengths: the same rows, in the caller's order
        assert torch.allclose(m._encode_text(idx, cat), top, atol=1e-6)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    m.train()
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8]])
    for _ in range(3):
        opt.zero_grad()
        m(hist, None, tgt, negatives=torch.tensor([0, 9, 10, 11]), catalogue=cat)["loss"].backward()
        opt.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    enc = {n for n in moved if n.startswith("text_encoder.")}
    assert enc and all(n.startswith("text_encoder.encoder.layer.1.") for n in enc)
    m.eval()
    with torch.no_grad():
        vecs = cat.item_vectors(m)
    m.set_seen_items(torch.ones(12))
    export_final(tmp_path / "final", m.state_dict(), m.cfg, tiny_bert, {"run": "t"}, {"version": "v"}, {},
                 item_ids=[f"i{i}" for i in range(12)])
    loaded, _ = load_final(tmp_path / "final")
    assert loaded.cfg.text_mode == "frozen"  # the whole encoder, its top layer trained: no cache needed to serve it
    served = Catalogue.from_tokens(cat.tokens, cat.lengths)
    served.prepare(loaded)
    with torch.no_grad():
        assert torch.allclose(served.item_vectors(loaded), vecs, atol=1e-3)


def test_top_layers_must_leave_a_frozen_layer_below(tiny_bert):
    with pytest.raises(ValueError, match="top_layers 2 must be between 1 and 1: the text encoder has 2 layers"):
        _model("hybrid", tiny_bert, text_mode="top", top_layers=2)
    with pytest.raises(ValueError, match="^top_layers must be >= 1"):
        RecModelConfig(num_items=3, text_mode="top", top_layers=0).validate()


def test_pool_heads_must_be_positive(tiny_bert):
    with pytest.raises(ValueError, match="pool_heads must be >= 1"):
        _model("hybrid", tiny_bert, text_mode="pool", pool_heads=0)
    with pytest.raises(ValueError, match="pool_rank 64 exceeds the text encoder's hidden size 32"):
        _model("hybrid", tiny_bert, text_mode="pool")


@pytest.mark.parametrize("field, value", [("n_heads", 0), ("d_model", 0), ("n_layers", 0), ("max_len", -1),
                                          ("text_batch_size", 0), ("lora_r", 0), ("lora_alpha", 0),
                                          ("lora_dropout", 1.0), ("temperature", float("nan"))])
def test_model_config_validate_names_the_field(field, value):
    """n_heads=0 used to fail as ZeroDivisionError in d_model % n_heads, d_model=0 inside torch: now the field is named."""
    with pytest.raises(ValueError, match=rf"^{field} "):
        RecModelConfig(num_items=3, item_tower="id", **{field: value}).validate()


def _hybrid_export(tiny_bert, out):
    import pyarrow.parquet as pq

    m = _model("hybrid", tiny_bert, text_mode="frozen")[0].eval()
    ids = [f"i{i}" for i in range(12)]
    info = export_final(out, m.state_dict(), m.cfg, tiny_bert, {"run_name": "t"}, {"version": "v1"}, {}, item_ids=ids)
    assert pq.read_table(str(out / "item_ids.parquet")).column("item_id").to_pylist() == ids
    return info


def test_final_export_verifies_every_file_on_load(tiny_bert, tmp_path):
    """export.json records the sha256 of every file of final/; load_final refuses flipped weight bytes, a permuted
    item_ids.parquet, a changed item-tower config, a missing or an added file, naming it."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.export import ExportIntegrityError

    good = tmp_path / "good"
    info = _hybrid_export(tiny_bert, good)
    assert {"model.safetensors", "model_config.json", "item_ids.parquet", "item_tower/config.json", "train_config.yaml",
            "data_manifest.json", "metrics.json"} <= set(info["files_sha256"]) and "export.json" not in info["files_sha256"]
    assert any(f.startswith("item_tower/tok") for f in info["files_sha256"])  # the tokenizer files too
    load_final(good)

    def damaged(name, how):
        d = tmp_path / name
        shutil.copytree(good, d)
        how(d)
        return d

    def flip(d):  # bytes of the tensor data (the end of the file), not the header: safetensors still loads it
        f = d / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[-5:] = bytes(x ^ 0xFF for x in b[-5:])
        f.write_bytes(bytes(b))

    def permute(d):
        f = d / "item_ids.parquet"
        ids = pq.read_table(str(f)).column("item_id").to_pylist()
        pq.write_table(pa.table({"item_id": pa.array(ids[::-1], pa.string())}), str(f))

    cases = {"flipped": (flip, "model.safetensors: sha256 differs"),
             "permuted": (permute, "item_ids.parquet: sha256 differs"),
             "tower": (lambda d: (d / "item_tower" / "config.json").write_text(
                 (d / "item_tower" / "config.json").read_text().replace('"hidden_act"', '"hidden_act_"')), "config.json: sha256"),
             "missing": (lambda d: (d / "item_ids.parquet").unlink(), "item_ids.parquet: missing"),
             "added": (lambda d: (d / "item_tower" / "modeling_x.py").write_text("import os\n"), "modeling_x.py: not part of"),
             # a half-copied export and a torn export.json are damage too (an ExportIntegrityError, not a bare
             # FileNotFoundError or JSONDecodeError that the job prints as a traceback)
             "no_weights": (lambda d: (d / "model.safetensors").unlink(), r"missing \['model.safetensors'\]"),
             "torn_export": (lambda d: (d / "export.json").write_text((d / "export.json").read_text()[:100]),
                             "export.json: not readable JSON")}
    for name, (how, msg) in cases.items():
        with pytest.raises(ExportIntegrityError, match=msg):
            load_final(damaged(name, how))

    # an export written before files_sha256 still loads; what it records (weights_sha256) is verified
    def old_style(d):
        e = json.loads((d / "export.json").read_text())
        del e["files_sha256"]
        (d / "export.json").write_text(json.dumps(e))

    load_final(damaged("old", old_style))
    with pytest.raises(ExportIntegrityError, match="model.safetensors: sha256 differs from weights_sha256"):
        load_final(damaged("old_flipped", lambda d: (old_style(d), flip(d))))


def test_item_tower_with_custom_code_is_refused_not_run(tiny_bert, tmp_path):
    """config.json with auto_map makes transformers import Python from the folder (after a prompt, or at once with
    trust_remote_code): lmrec refuses the folder, as a text model, in data_prep's tokenizer path and inside final/."""
    import json
    import shutil

    from lmrec_common.models import RemoteCodeError, resolve_model_path
    from train.export import _export_files
    from lmrec_common.manifest import sha256_file

    evil = tmp_path / "evil"
    shutil.copytree(tiny_bert, evil)
    marker = tmp_path / "code_ran"
    (evil / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertConfig as EvilConfig\n")
    conf = json.loads((evil / "config.json").read_text())
    (evil / "config.json").write_text(json.dumps({**conf, "auto_map": {"AutoConfig": "evil_code.EvilConfig"}}))
    with pytest.raises(RemoteCodeError, match=r"evil/config.json: 'auto_map'"):
        resolve_model_path(str(evil))
    with pytest.raises(RemoteCodeError, match="auto_map"):
        _model("hybrid", evil)
    # inside a final/ whose export.json records the modified config (a hash check alone would pass it)
    final = tmp_path / "final"
    _hybrid_export(tiny_bert, final)
    (final / "item_tower" / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    e = json.loads((final / "export.json").read_text())
    e["files_sha256"] = {f: sha256_file(final / f) for f in _export_files(final)}
    (final / "export.json").write_text(json.dumps(e))
    with pytest.raises(RemoteCodeError, match=r"item_tower/tokenizer_config.json: 'auto_map'"):
        load_final(final)
    assert not marker.exists()


def _spread_id_model(num_items: int, loss: str):
    cfg = RecModelConfig(num_items=num_items, num_event_types=1, item_tower="id", d_model=16, n_layers=1, n_heads=1,
                         max_len=8, dropout=0.0, loss=loss, use_event_types=False)
    torch.manual_seed(0)
    m = SeqRecModel(cfg).eval()
    with torch.no_grad():
        m.item_emb.weight.mul_(4.0)  # spread scores: a near-uniform softmax would hide what the correction does
    return m


def test_sampled_softmax_logq_matches_hand_computed_loss_with_popularity_proposal():
    from train.loop import candidate_log_q, sampling_distributions

    m = _spread_id_model(30, "sampled_softmax")
    hist = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]])
    tgt = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8]])
    counts = torch.arange(30, dtype=torch.float).pow(2)  # a skewed popularity
    p_t, p_n = sampling_distributions(counts, "popularity", 0.75)
    assert not torch.allclose(p_n, p_n[0].expand_as(p_n))  # non-uniform proposal
    n_t = int((tgt != -1).sum())
    logq = candidate_log_q(float(n_t), p_t, p_n, 5)
    neg = torch.tensor([20, 29, 29, 11, 2])
    out = m(hist, None, tgt, negatives=neg, item_log_q=logq)
    # by hand: candidates = distinct targets and negatives; logits - log q; CE over the 7 target positions
    with torch.no_grad():
        u = m.user_states(hist)[tgt != -1]
        cand = torch.unique(torch.cat([tgt[tgt != -1], neg]))
        logits = u @ m.item_vectors(cand).T - logq[cand][None]
        label = torch.searchsorted(cand, tgt[tgt != -1])
        want = torch.nn.functional.cross_entropy(logits, label)
        plain = torch.nn.functional.cross_entropy(u @ m.item_vectors(cand).T, label)
    assert torch.allclose(out["ce"], want, atol=1e-5)
    assert abs(out["ce"].item() - plain.item()) > 0.01  # the correction is applied, not a no-op
    expect_q = torch.log(n_t * counts[7] / counts.sum() + 5 * p_n[7])
    assert torch.allclose(logq[7], expect_q, atol=1e-6)


def test_logq_corrected_sampled_softmax_learns_what_the_full_softmax_learns():
    """One user vector, item vectors trained on targets drawn from a skewed popularity, negatives drawn from that
    popularity: with the logQ correction the learned distribution matches the data as the full softmax's does;
    without it the over-sampled popular items are pushed down (the bias the correction exists to remove)."""
    from train.loop import candidate_log_q, sampling_distributions

    I, K, B = 60, 10, 32
    counts = torch.arange(I, 0, -1, dtype=torch.float) ** 1.5  # item 0 the most popular
    p_t, p_n = sampling_distributions(counts, "popularity", 1.0)

    def kl_after_training(kind: str) -> float:
        m = _spread_id_model(I, "full_softmax" if kind == "full" else "sampled_softmax").train()
        for n, p in m.named_parameters():
            p.requires_grad_(n == "item_emb.weight")
        opt = torch.optim.Adam([m.item_emb.weight], lr=0.05)
        g = torch.Generator().manual_seed(3)
        hist = torch.zeros(B, 1, dtype=torch.long)  # every user the same one-item history: one user vector
        for _ in range(300):
            tgt = torch.multinomial(p_t, B, replacement=True, generator=g).view(B, 1)
            kw = {}
            if kind != "full":
                kw["negatives"] = torch.multinomial(p_n, K, replacement=True, generator=g)
                if kind == "corrected":
                    kw["item_log_q"] = candidate_log_q(float(B), p_t, p_n, K)
            loss = m(hist, None, tgt, **kw)["ce"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = torch.softmax((m.user_vectors(hist[:1]) @ m.all_item_vectors().T)[0], -1)
        return (p_t * (p_t.log() - p.log())).sum().item()

    full, corrected, plain = kl_after_training("full"), kl_after_training("corrected"), kl_after_training("none")
    # measured: full 0.133, corrected 0.105, uncorrected 0.339 (KL(data || model))
    assert corrected < full + 0.05 and corrected < 0.5 * plain, (full, corrected, plain)


def test_run_identity_survives_an_upgrade_that_adds_or_removes_keys():
    """A run started before a key was added (at its default) or removed (at its 'off' value) resumes after the upgrade."""
    from train.config import TrainConfig
    from train.loop import same_identity_across_versions

    now = TrainConfig().identity()
    then = json.loads(json.dumps(now))
    then["model"]["bce_click_weight"] = 0.0  # removed since, was off
    del then["model"]["pool_rank"]  # added since, now at its default
    assert same_identity_across_versions(then, now)
    then["model"]["bce_click_weight"] = 0.5  # the run used what was removed: another run
    assert not same_identity_across_versions(then, now)
    then["model"]["bce_click_weight"] = 0.0
    now["model"]["pool_rank"] = 32  # a key added since, set away from its default: another run
    assert not same_identity_across_versions(then, now)
    then["model"]["pool_rank"] = 32
    then["optim"]["lr"] = 5.0  # a real change
    assert not same_identity_across_versions(then, now)
