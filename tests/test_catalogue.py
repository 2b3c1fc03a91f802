"""Units for train/catalogue.py: the item side of a model (tokens, frozen features and their cache, cold-item id
borrowing, training candidates, tonight's catalogue in a final's item space), and a model that holds weights only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import random_item_tokens as _tokens, write_prepared  # noqa: E402

from train.catalogue import Catalogue, CatalogueError, build_item_space  # noqa: E402
from train.export import export_final, load_final  # noqa: E402
from train.model import RecModelConfig, SeqRecModel  # noqa: E402


def _model(tower="hybrid", path=None, **kw) -> SeqRecModel:
    cfg = RecModelConfig(num_items=12, num_event_types=2, item_tower=tower, text_model_path=str(path or ""),
                         d_model=16, n_layers=2, n_heads=2, max_len=8, dropout=0.0, **kw)
    torch.manual_seed(0)
    return SeqRecModel(cfg)


def _prepared(m: SeqRecModel, ids=None, lens=None) -> Catalogue:
    cat = Catalogue.from_tokens(*((ids, lens) if ids is not None else _tokens(12)))
    cat.prepare(m)
    return cat


def test_the_model_holds_weights_only(tiny_bert):
    """No catalogue tensor is a buffer of the model: its state dict is its weights (+ id_mask and the pool basis, which
    the export contract carries), so DDP / ZeRO / checkpoints see nothing of the catalogue, whose size may change."""
    for mode in ("frozen", "pool", "full"):
        kw = dict(pool_rank=8, pool_heads=2) if mode == "pool" else {}
        m = _model("hybrid", tiny_bert, text_mode=mode, **kw)
        before = set(m.state_dict())
        cat = _prepared(m)
        assert set(m.state_dict()) == before
        non_weights = {n for n, _ in m.named_buffers() if not n.startswith("text_encoder.")}  # (BERT's own id buffers)
        assert non_weights == ({"id_mask", "pool_basis", "pool_scale"} if mode == "pool" else {"id_mask"})
        assert cat.size == 12 and cat.tokens.shape[0] == 12
        assert cat.features.shape == (12, 32) and (cat.states is not None) == (mode == "pool")
    # a text tower without a catalogue says what is missing
    with pytest.raises(RuntimeError, match="catalogue"):
        _model("hybrid", tiny_bert).all_item_vectors()
    with pytest.raises(RuntimeError, match="catalogue.prepare"):
        _model("hybrid", tiny_bert).all_item_vectors(Catalogue.from_tokens(*_tokens(12)))
    # an id-only model needs none: item i is id row i
    m = _model("id")
    assert torch.equal(m.all_item_vectors(), m.all_item_vectors(Catalogue(12)))


def test_text_feature_cache_skips_unchanged_items(tiny_bert, tmp_path, capsys):
    """Features read from the cache equal freshly computed ones; only items whose tokens changed (or all,
    for another encoder) go through the encoder again; a broken file is recomputed, never trusted."""
    from train.text_cache import KEEP_ENCODERS

    cache = tmp_path / "cache"
    m = _model("hybrid", tiny_bert)
    want = _prepared(m).features.clone()
    cat = Catalogue.from_tokens(*_tokens(12))
    assert cat.prepare(m, cache_dir=str(cache)) == 12 and torch.equal(cat.features, want)  # miss: all encoded
    files = list(cache.iterdir())
    assert len(files) == 1
    cat2 = Catalogue.from_tokens(*_tokens(12))
    assert cat2.prepare(m, cache_dir=str(cache)) == 0 and torch.equal(cat2.features, want)  # hit: none encoded
    # one item's text changed, one new item appended: those two are encoded, the rest read
    ids, lens = _tokens(12)
    ids2, lens2 = torch.cat([ids, ids[:1]]), torch.cat([lens, lens[:1]])
    ids2[3, 0] += 1
    cat3 = Catalogue.from_tokens(ids2, lens2)
    assert cat3.prepare(m, cache_dir=str(cache)) == 1  # the appended item has item 0's tokens: cached
    assert torch.allclose(cat3.features, _prepared(m, ids2, lens2).features, atol=1e-6)
    # another encoder (different weights) never reads these features
    other = _model("hybrid", tiny_bert)
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(0.01)
    assert Catalogue.from_tokens(*_tokens(12)).prepare(other, cache_dir=str(cache)) == 12
    assert len(list(cache.iterdir())) == 2 <= KEEP_ENCODERS
    # a truncated file: a warning, the features computed again and the file rewritten
    files[0].write_bytes(files[0].read_bytes()[:40])
    cat4 = Catalogue.from_tokens(*_tokens(12))
    assert cat4.prepare(m, cache_dir=str(cache)) == 12 and torch.equal(cat4.features, want)
    assert "unusable" in capsys.readouterr().err
    assert Catalogue.from_tokens(*_tokens(12)).prepare(m, cache_dir=str(cache)) == 0
    # a reader that must not write (every rank but one)
    ro = tmp_path / "ro"
    assert Catalogue.from_tokens(*_tokens(12)).prepare(m, cache_dir=str(ro), write_cache=False) == 12
    assert not ro.exists()


def test_text_feature_cache_refuses_partitioned_weights(tiny_bert, tmp_path, capsys):
    """Under ZeRO-3 a rank holds a slice of the encoder's weights, which cannot key the cache: no cache, a warning."""
    m = _model("hybrid", tiny_bert)
    next(m.text_encoder.parameters()).ds_id = 0  # what deepspeed.zero.Init marks a partitioned parameter with
    assert Catalogue.from_tokens(*_tokens(12)).prepare(m, cache_dir=str(tmp_path / "c")) == 12
    assert "partitioned" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_borrow_cold_ids_gives_cold_items_their_text_twin_id_row(tiny_bert):
    """A cold item (no training event) or a new one (index >= num_items) whose text equals a warm
    item's gets that warm item's whole vector once it borrows; training never borrows."""
    m = _model("hybrid", tiny_bert)
    with torch.no_grad():
        m.item_emb.weight.normal_()
    ids, lens = _tokens(12)
    # 14 catalogue rows: 12 model items + 2 new; item 9 (cold) copies item 2's text, new item 13 copies item 5's
    ids2, lens2 = torch.cat([ids, ids[:2]]), torch.cat([lens, lens[:2]])
    ids2[9], lens2[9] = ids[2], lens[2]
    ids2[13], lens2[13] = ids[5], lens[5]
    cat = _prepared(m, ids2, lens2)
    n_train = torch.ones(12, dtype=torch.long)
    n_train[9] = n_train[10] = 0
    m.set_seen_items(n_train)
    m.eval()
    before = cat.item_vectors(m)
    assert not torch.allclose(before[9], before[2], atol=1e-5)  # text alone vs text + id row
    assert cat.lenders_and_borrowers(m)[1].tolist() == [9, 10, 12, 13]
    assert cat.borrow_cold_ids(m, chunk=1) == 4  # items 9, 10 (cold) and 12, 13 (new)
    after = cat.item_vectors(m)
    assert torch.allclose(after[9], before[2], atol=1e-5) and torch.allclose(after[13], before[5], atol=1e-5)
    lent = cat.borrow
    assert lent[9].item() == 2 and lent[13].item() == 5 and lent[10].item() >= 0 and lent[12].item() >= 0
    assert bool((lent[torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11])] == -1).all())  # warm items keep their own row
    assert torch.allclose(after[:9], before[:9]) and torch.allclose(after[11], before[11])
    m.train()  # training never borrows: the cold item is text alone again
    assert torch.allclose(m.item_vectors(torch.tensor([9]), cat), before[9:10], atol=1e-5)
    # rows that are not real items tonight (present False) neither lend nor borrow
    present = torch.ones(14, dtype=torch.bool)
    present[[2, 13]] = False
    m.eval()
    assert cat.borrow_cold_ids(m, present) == 3 and cat.borrow[13].item() == -1 and cat.borrow[9].item() != 2
    cat.prepare(m)  # new features: the borrowed rows were computed from the old ones
    assert cat.borrow is None
    with pytest.raises(ValueError, match="hybrid"):
        Catalogue(12).borrow_cold_ids(_model("id"))


def test_training_candidates_are_the_items_with_training_events():
    cat = Catalogue(5)
    cat.set_training_counts(torch.tensor([3, 0, 1, 0, 2]))
    assert cat.cand_idx.tolist() == [0, 2, 4] and cat.cand_pos.tolist() == [0, -1, 1, -1, 2]
    cat.set_training_counts(torch.ones(5))  # every item: no gathering
    assert cat.cand_idx.numel() == 0 and cat.cand_pos.numel() == 0


def test_build_item_space_maps_tonight_by_item_id():
    tonight = np.array(["b", "x", "a", "y"], dtype=object)
    to_model, space = build_item_space(np.array(["a", "b", "c"], dtype=object), tonight, 3, text_capable=True)
    assert to_model.tolist() == [1, 3, 0, 4] and space == 5  # new items after the model's, in tonight's order
    to_model, space = build_item_space(np.array(["a", "b", "c"], dtype=object), tonight, 3, text_capable=False)
    assert to_model.tolist() == [1, -1, 0, -1] and space == 3  # an id-only model cannot score new items
    with pytest.raises(CatalogueError, match="same vocabulary hash"):
        build_item_space(None, tonight, 5, text_capable=True)


def test_for_tonight_maps_a_newer_catalogue_onto_an_existing_final(tiny_bert, tmp_path):
    """An existing final/ (its item_ids.parquet) + tonight's prepared catalogue with items added, removed and
    reordered: known items keep their model row (the same vectors as in the training catalogue), new ones are
    appended and scored from text, model items missing tonight are stubs that neither lend nor borrow."""
    import json

    import datasets

    from data_prep.schema import load_prepared

    v1 = write_prepared(tmp_path / "prepared", num_users=10, num_items=20, version="v1")
    items = datasets.load_from_disk(str(v1 / "items"))
    torch.manual_seed(0)
    mcfg = RecModelConfig(num_items=20, num_event_types=2, item_tower="hybrid", text_model_path=str(tiny_bert), d_model=16,
                          n_layers=1, n_heads=1, max_len=8, dropout=0.0)
    model = SeqRecModel(mcfg, text_model_path=str(tiny_bert))
    with torch.no_grad():
        model.item_emb.weight.normal_()
    final = tmp_path / "final"
    export_final(final, model.state_dict(), mcfg, tiny_bert, {"t": 1}, json.loads((v1 / "manifest.json").read_text()), {},
                 item_ids=[str(x) for x in items["item_id"]])
    loaded, info = load_final(final)
    ref = Catalogue.from_items(items, loaded)
    ref.prepare(loaded)
    ref_vecs = ref.item_vectors(loaded)
    # tonight: items 0..19 reversed, without item 7, plus 3 new items whose text copies item 0's
    keep = [i for i in reversed(range(20)) if i != 7]
    tbl = items.data.table.take(keep + [0, 0, 0])
    new_ids = [str(x) for x in tbl.column("item_id").to_pylist()]
    new_ids[-3:] = ["new-a", "new-b", "new-c"]
    tbl = tbl.set_column(tbl.column_names.index("item_id"), "item_id", [new_ids])
    tbl = tbl.set_column(tbl.column_names.index("item_idx"), "item_idx", [list(range(len(new_ids)))])
    v2 = tmp_path / "prepared" / "v2"
    datasets.Dataset(tbl).save_to_disk(str(v2 / "items"))
    for name in ("sequences", "manifest.json"):
        src = v1 / name
        (v2 / name).symlink_to(src, target_is_directory=src.is_dir())
    man = json.loads((v1 / "manifest.json").read_text())
    man["version"], man["vocab"]["items_sha256"] = "v2", "changed"
    (v2 / "manifest.json").unlink()
    (v2 / "manifest.json").write_text(json.dumps(man))
    prep2 = load_prepared(v2)
    cat = Catalogue.for_tonight(loaded, info, final, prep2)
    assert cat.size == 23 and cat.to_model.tolist() == keep + [20, 21, 22]
    assert not bool(cat.present[7]) and int(cat.present.sum()) == 22
    cat.prepare(loaded)
    vecs = cat.in_tonight_order(cat.item_vectors(loaded))  # (22, d) in tonight's order
    assert torch.allclose(vecs[:19], ref_vecs[keep], atol=1e-6)
    assert torch.allclose(cat.features[20], ref.features[0], atol=1e-6)  # a new item: its text's features
    assert cat.borrow_cold_ids(loaded) == 3  # the new items borrow; item 7 (not here tonight) lends to nobody
    assert cat.borrow[20:].tolist() == [0, 0, 0] and cat.borrow[7].item() == -1
    # an id-only model cannot score new items: they map to -1 and come out as zero rows
    idm = SeqRecModel(RecModelConfig(num_items=20, item_tower="id", d_model=16, n_layers=1, n_heads=1, max_len=8))
    idcat = Catalogue.for_tonight(idm, info, final, prep2)
    assert idcat.size == 20 and idcat.tokens is None and idcat.to_model[-3:].tolist() == [-1, -1, -1]
    assert idcat.in_tonight_order(idcat.item_vectors(idm))[-3:].abs().sum() == 0
