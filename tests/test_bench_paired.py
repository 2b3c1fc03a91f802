"""bench/paired.py: paired per-user comparison of two models' ranks (the statistics, on synthetic ranks)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import paired  # noqa: E402


def test_paired_difference_and_its_error():
    # users 0-3: A ranks the target 1, 20, 3, 100; B ranks it 1, 2, 3, 200
    ra, rb = torch.tensor([1, 20, 3, 100]), torch.tensor([1, 2, 3, 200])
    res = paired.compare(ra, rb)
    hr = res["HR@10"]
    assert (hr["a"], hr["b"], hr["diff"]) == (0.5, 0.75, 0.25)  # only user 1 changes, 0 -> 1
    assert (hr["users_b_better"], hr["users_a_better"], hr["n"]) == (1, 0, 4)
    d = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert hr["se_paired"] == pytest.approx(float(d.std() / 2))
    assert hr["ci95"] == pytest.approx([0.25 - 1.96 * hr["se_paired"], 0.25 + 1.96 * hr["se_paired"]])
    nd = res["NDCG@10"]
    assert nd["diff"] == pytest.approx((1 / math.log2(3)) / 4)
    assert res["MRR"]["diff"] == pytest.approx(((1 / 2 - 1 / 20) + (1 / 200 - 1 / 100)) / 4)
    assert res["MRR"]["users_b_better"] == 1 and res["MRR"]["users_a_better"] == 1


def test_same_model_has_zero_difference_and_mismatched_users_fail():
    r = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))
    res = paired.compare(r, r.clone())
    assert all(v["diff"] == 0 and v["se_paired"] == 0 and v["se_one_model"] > 0 for v in res.values())
    with pytest.raises(ValueError, match="different users"):
        paired.compare(r, r[:-1])


def test_seeds_pooled_per_user_and_one_seed_is_the_plain_comparison():
    """compare_seeds averages each user's difference over the seeds before the interval over users: its mean
    is the mean of the seeds' differences, its interval is narrower than one seed's when the seeds' noise is
    independent, and a single pair gives exactly compare()."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 300, (5000,), generator=g)
    pairs = []
    for _ in range(3):  # B a little better than A, each seed with its own per-user noise
        noise_a, noise_b = (torch.randint(-40, 41, (5000,), generator=g) for _ in range(2))
        pairs.append(((base + noise_a).clamp(min=1), (base - 5 + noise_b).clamp(min=1)))
    one = [paired.compare(a, b) for a, b in pairs]
    pooled = paired.compare_seeds(pairs)
    for k in ("HR@10", "NDCG@50", "MRR"):
        assert pooled[k]["diff"] == pytest.approx(sum(o[k]["diff"] for o in one) / 3)
        assert pooled[k]["n_seeds"] == 3 and pooled[k]["n"] == 5000
        assert pooled[k]["se_paired"] < min(o[k]["se_paired"] for o in one)
    assert paired.compare_seeds(pairs[:1]) == one[0]
    with pytest.raises(ValueError, match="different users"):
        paired.compare_seeds([pairs[0], (pairs[1][0][:-1], pairs[1][1][:-1])])


def test_refit_model_is_compared_on_held_out_splits_only(tmp_path):
    """A model trained through the validation targets (train_through=valid) would look better on
    validation for having trained on it: paired.py refuses that split for it, naming the model."""
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_prepared import write_prepared

    prep = write_prepared(tmp_path / "prepared")
    final = tmp_path / "refit" / "final"
    final.mkdir(parents=True)
    (final / "metrics.json").write_text(json.dumps({"train_through": "valid"}))
    with pytest.raises(SystemExit, match=r"refit\).*not valid"):
        paired.main(["--prepared", str(prep), "--a", str(final), "--b", str(final), "--splits", "valid,test"])


def test_pooling_needs_one_challenger_per_reference(tmp_path):
    with pytest.raises(SystemExit, match="--a names 2 models and --b 1"):
        paired.main(["--prepared", str(tmp_path), "--a", "s0/final", "s1/final", "--b", "s0b/final"])


def _bench_run(root: Path, name: str, ranks: list[int], dataset: str = "toys", sha: str = "abc") -> Path:
    """A run folder of bench/quality.py as its record leaves it: record.json + record.npz (the test ranks)."""
    import quality

    run = root / name
    run.mkdir(parents=True)
    quality.write_record(run, {"kind": quality.RECORD_KIND, "dataset": dataset, "variant": name.split("_")[0],
                               "seed": int(name[-1]), "tag": root.name,
                               "data": {"n_candidates": 50, "n_test_users": len(ranks), "sha256": sha}},
                         torch.tensor(ranks))
    return run


def test_bench_runs_compare_from_their_records_without_ranking(tmp_path):
    """Runs of bench/quality.py (two tables' runs, e.g. a recipe before and after a change) compare from the test
    ranks their records keep: no --prepared, no model loaded; the figures are compare()'s / compare_seeds()'s."""
    before = [_bench_run(tmp_path / "runs-r1", f"hybrid_s{s}", r) for s, r in enumerate([[1, 20, 3, 100], [1, 20, 30, 100]])]
    after = [_bench_run(tmp_path / "runs-r2", f"hybrid_s{s}", r) for s, r in enumerate([[1, 2, 3, 200], [1, 2, 3, 200]])]
    one = paired.main(["--a", str(before[0]), "--b", str(after[0] / "record.json")])
    assert list(one["splits"]) == ["test"]
    assert one["splits"]["test"] == paired.compare(torch.tensor([1, 20, 3, 100]), torch.tensor([1, 2, 3, 200]))
    pooled = paired.main(["--a", *map(str, before), "--b", *map(str, after), "--out", str(tmp_path / "p.json")])
    assert pooled["splits"]["test"]["HR@10"]["diff"] == pytest.approx(0.375)  # per user (0, 1, .5, 0)
    assert [s["splits"]["test"]["HR@10"]["diff"] for s in pooled["per_seed"]] == pytest.approx([0.25, 0.5])
    assert (tmp_path / "p.json").is_file()


def test_bench_runs_of_other_data_or_without_ranks_are_refused(tmp_path):
    """Records of other users cannot be paired (named: the file and the one it was compared with); a record
    without its ranks, a final/ folder beside a record, or another split than test each get one clear message."""
    a = _bench_run(tmp_path / "runs-r1", "hybrid_s0", [1, 2, 3, 4])
    other = _bench_run(tmp_path / "runs-g", "hybrid_s0", [1, 2, 3, 4], sha="def")
    with pytest.raises(SystemExit, match=r"runs-g/hybrid_s0/record.json: sha256 def .*runs-r1/hybrid_s0/record.json.*same users"):
        paired.main(["--a", str(a), "--b", str(other)])
    with pytest.raises(SystemExit, match="keeps its test ranks only"):
        paired.main(["--a", str(a), "--b", str(a), "--splits", "valid,test"])
    with pytest.raises(SystemExit, match=r"x/final: no record.json"):
        paired.main(["--a", str(a), "--b", str(tmp_path / "x" / "final")])
    (a / "record.npz").unlink()
    with pytest.raises(SystemExit, match=r"record.npz\) are missing"):
        paired.main(["--a", str(a), "--b", str(a)])
