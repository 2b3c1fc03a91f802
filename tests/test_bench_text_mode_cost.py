"""bench/text_mode_cost.py: every text mode's training step measured through the real training command.

The parser is checked on the loop's own progress lines; the end-to-end run stops real trainings of the shipped
Amazon configs (on a tiny prepared set and a tiny encoder) and checks that each row's figures come from those runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_mode_cost  # noqa: E402
from fixtures_prepared import write_prepared  # noqa: E402


def test_parse_log_reads_the_loops_progress_lines_and_schedule():
    lines = [
        "[train] world 1 | cpu | precision no | train examples 19,124 (142,999 target positions/epoch) | valid users "
        "19,124 | 150 steps/epoch | max steps 3000 (~20.0 epochs) | eval every 300 | save every 1000\n",
        "step 00001/03000 | epoch 0 | loss 9.7747 | lr 2.00e-05 | 203.86 ex/s | 1.31k tok/s | mem 1.10 GiB | eta 1:22:52\n",
        "step 00002/03000 | epoch 0 | loss 9.7 | lr 3.00e-05 | 1.28k ex/s | 8.31k tok/s | mem 1.25 GiB | eta 0:02:00\n",
        "[valid] step 2 | HR@10 0.1 | NDCG@10 0.05\n",
        "[train] model hybrid tower (lora, bundled:all-MiniLM-L6-v2) | d 64 | layers 4 | heads 1 | max_len 50 | loss "
        "sampled_softmax | params trainable 1.02M / total 23.61M\n",
    ]
    got = text_mode_cost.parse_log(lines)
    assert got["plan"] == {"steps_per_epoch": 150, "max_steps": 3000}
    assert got["steps"] == {1: (203.86, 1.10), 2: (1280.0, 1.25)}
    assert got["model"]["model"].startswith("hybrid tower (lora, ")
    assert got["model"]["params_trainable"] == pytest.approx(1.02e6) and got["model"]["params_total"] == pytest.approx(23.61e6)


def test_summary_is_the_median_over_rounds_and_the_ratio_to_frozen():
    def run(v, r, step):
        return {"variant": v, "round": r, "config": f"configs/train/{v}.yaml", "overrides": [], "step_s_median": step,
                "examples_per_step": 128, "setup_s": 10.0, "peak_rss_gib": 1.0 + r,
                "plan": {"steps_per_epoch": 150, "max_steps": 3000}}

    runs = [run("frozen", 0, 0.2), run("lora", 0, 3.0), run("frozen", 1, 0.4), run("lora", 1, 5.0), run("frozen", 2, 0.3),
            run("lora", 2, 4.0)]
    rows = {r["variant"]: r for r in text_mode_cost.summarize(runs, ["frozen", "lora"])}
    assert rows["frozen"]["step_s"] == pytest.approx(0.3) and rows["frozen"]["x_frozen"] == pytest.approx(1.0)
    assert rows["lora"]["step_s"] == pytest.approx(4.0) and rows["lora"]["x_frozen"] == pytest.approx(4.0 / 0.3)
    assert rows["lora"]["projected_train_s"] == pytest.approx(10.0 + 3000 * 4.0)
    assert rows["lora"]["peak_rss_gib"] == 3.0 and rows["lora"]["examples_s"] == pytest.approx(32.0)
    assert "| lora | `lora.yaml` | 4.000 | 13.33 | 32 |" in text_mode_cost.table(list(rows.values()))


def test_bad_arguments_are_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="unknown \\['bogus'\\]"):
        text_mode_cost.main(["--prepared", str(tmp_path), "--variants", "frozen,bogus"])
    with pytest.raises(SystemExit, match="--steps-for 'lora=x'"):
        text_mode_cost.main(["--prepared", str(tmp_path), "--steps-for", "lora=x"])
    with pytest.raises(SystemExit, match="no manifest.json"):
        text_mode_cost.main(["--prepared", str(tmp_path), "--variants", "frozen"])


@pytest.mark.slow
def test_end_to_end_on_a_tiny_set_measures_each_shipped_mode(tmp_path, tiny_bert):
    prep = write_prepared(tmp_path / "prepared", num_users=40, num_items=30)
    out = tmp_path / "cost.json"
    doc = text_mode_cost.main(["--prepared", str(prep), "--variants", "ids,frozen,pool,lora_sampled", "--steps", "2",
                               "--warmup", "1", "--set", f"model.text_model_path={tiny_bert}", "--set", "batch_size=8",
                               "--set", "model.max_len=10", "--set", "model.pool_rank=16", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == doc["rows"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == ["ids", "frozen", "pool", "lora_sampled"]
    assert rows["frozen"]["x_frozen"] == pytest.approx(1.0)
    for r in doc["runs"]:
        assert len(r["step_s"]) == 2 and all(s > 0 for s in r["step_s"])
        assert r["examples_per_step"] == 8 and r["peak_rss_gib"] > 0.1
        log = Path(r["log"]).read_text()
        assert "stop_after_steps=3" in log  # each run was the training command itself, stopped after its 3 steps
        # the schedule is the config's own on this data: epochs x steps per epoch
        assert r["plan"]["max_steps"] % r["plan"]["steps_per_epoch"] == 0
    assert rows["lora_sampled"]["overrides"][0] == "model.loss=sampled_softmax"
    # each mode is the one its row names: lora trains adapters inside the encoder, frozen and pool leave it alone
    assert [rows[v]["model"].split(" |")[0].split(",")[0] for v in ("ids", "frozen", "pool", "lora_sampled")] == \
        ["id tower", "hybrid tower (frozen", "hybrid tower (pool", "hybrid tower (lora"]
    assert rows["lora_sampled"]["params_trainable"] > rows["frozen"]["params_trainable"] > rows["ids"]["params_trainable"]
