"""One window builder (train.data.latest_windows) for training, evaluation, nightly and online serving: a
hand-computed case, and the same history giving the same window through all four paths (CPU, seconds).

    python -m pytest tests/test_windows.py -q
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_prepared import write_prepared  # noqa: E402

from data_prep.schema import load_prepared  # noqa: E402
from inference.run import history_windows  # noqa: E402
from train.data import EvalExamples, TrainExamples, latest_windows, list_column  # noqa: E402


def test_latest_windows_by_hand():
    # three lists in one flat column: [10 11 12 13 14], [20], [30 31 32]
    vals = np.array([10, 11, 12, 13, 14, 20, 30, 31, 32], dtype=np.int32)
    ets = np.array([1, 0, 1, 0, 1, 2, 0, 0, 1], dtype=np.int8)
    starts, ends = np.array([0, 5, 6]), np.array([4, 1, 0])  # the first 4, 1 and 0 events of each
    n, (items, types_) = latest_windows(starts, ends, 3, (vals, -1), (ets, 0))
    assert n.tolist() == [3, 1, 0]
    assert items.tolist() == [[11, 12, 13], [-1, -1, 20], [-1, -1, -1]] and items.dtype == np.int64
    assert types_.tolist() == [[0, 1, 0], [0, 0, 2], [0, 0, 0]]
    n, (items,) = latest_windows(np.zeros(0, np.int64), np.zeros(0, np.int64), 4, (vals, -1))
    assert n.shape == (0,) and items.shape == (0, 4)


@pytest.mark.parametrize("T", [3, 8, 40])
def test_training_evaluation_and_serving_windows_of_a_history_are_identical(tmp_path, T):
    """History H = a user's events before the test target. Training through "valid" ends its example at that
    target too (width max_len + 1 = T), evaluation of the test split takes the T events before it, and the nightly
    and online serving paths take the latest T events of H given as the user's history: four equal windows, item
    indices and event types alike, for every user (histories of 2..30 events: some shorter, some longer than T)."""
    from inference.serve.engine import Engine

    prep = load_prepared(str(write_prepared(tmp_path, num_users=60, num_items=50, min_len=4, max_len=30)))
    seq = prep.sequences
    vals, offs = list_column(seq, "item_idx")
    ets, _ = list_column(seq, "event_type")
    test_pos = np.asarray(seq.data.table.column("test_pos").to_numpy(), np.int64)
    assert (test_pos == np.diff(offs) - 1).all()  # leave-last-out: H = all but the last event

    train = TrainExamples.build(seq, max_len=T - 1, through="valid")
    ev = EvalExamples.build(seq, "test", max_len=T)
    # nightly serving: each user's list cut to H, item space = tonight's (identity)
    h_offs = np.concatenate([[0], np.cumsum(test_pos)])
    h_idx = np.concatenate([np.arange(offs[u], offs[u] + test_pos[u]) for u in range(len(test_pos))])
    nightly, nightly_et, w, unmapped = history_windows(vals[h_idx], h_offs, ets[h_idx].astype(np.int64),
                                                       np.arange(50), T, space="tonight")
    assert unmapped == 0 and w.tolist() == np.minimum(test_pos, T).tolist()
    assert len(train) == len(ev) == len(test_pos) == 60 and (train.user_idx == ev.user_idx).all()
    assert train.items.tolist() == ev.hist.tolist() == nightly.tolist()
    assert train.etypes.tolist() == ev.etypes.tolist() == nightly_et.tolist()
    assert (ev.target.numpy() == vals[offs[:-1] + test_pos]).all()

    # online serving: Engine.prepare_history on each user's history given as item ids and event names
    ids = [f"i{i}" for i in range(50)]
    names = list(prep.event_types)
    stub = types.SimpleNamespace(index={s: i for i, s in enumerate(ids)}, id_normalization="exact",
                                 event_index={s: i for i, s in enumerate(names)}, event_types=names, default_event=0,
                                 cat=types.SimpleNamespace(to_model=np.arange(50)), T=T)
    stub.lookup = types.MethodType(Engine.lookup, stub)
    stub.event_codes = types.MethodType(Engine.event_codes, stub)
    for u in range(len(test_pos)):
        h = slice(offs[u], offs[u] + test_pos[u])
        got = Engine.prepare_history(stub, [ids[i] for i in vals[h]], [names[e] for e in ets[h]], [], True)
        assert got["hist"][0].tolist() == train.items[u].tolist() and got["et"][0].tolist() == train.etypes[u].tolist()
