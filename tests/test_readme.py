"""The README's commands (STYLE.md #10): it names exactly two commands for a fresh machine, the CI
runs the second, and the first runs end to end (``SKIP_INSTALL=1 QUICK=1``: tiny sizes, written under
tmp via ``WORK=``) and prints where the table is. Its Amazon quality, gate and fault-campaign rows quote the committed
result files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_COMMANDS = ["bash scripts/quickstart.sh", "bash scripts/test.sh"]


def readme_commands() -> list[str]:
    """Commands of the first code block under the '## Two commands ...' heading (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Two commands[^\n]*\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## Two commands ...' section"
    block = re.search(r"```[a-z]*\n(.*?)```", m.group(1), flags=re.S)
    assert block, "the '## Two commands' section of README.md has no code block"
    cmds = [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines()]
    return [c for c in cmds if c]


def test_readme_names_exactly_the_two_commands():
    assert readme_commands() == README_COMMANDS
    for c in README_COMMANDS:
        script = ROOT / c.split()[1]
        assert script.is_file(), script
        subprocess.run(["bash", "-n", str(script)], check=True)  # parses
    # "CI runs exactly this": .ci/run calls the README's test command
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh\b", ci, flags=re.M), ci


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DS_ACCELERATOR")}  # as a new user's shell
    env.update({"SKIP_INSTALL": "1", "QUICK": "1", "WORK": str(tmp_path / "work")})
    p = subprocess.run(["bash", "scripts/quickstart.sh", "run_date=2026-11-27"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, f"quickstart exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    m = re.search(r"^The table is at (\S+)\s+\((\d+) rows, (\d+) users\)", p.stdout, flags=re.M)
    assert m, p.stdout[-3000:]
    out, rows, users = Path(m.group(1)), int(m.group(2)), int(m.group(3))
    assert out == (tmp_path / "work" / "recs" / "sample" / "dt=2026-11-27").resolve()
    assert (out / "_SUCCESS").is_file()
    man = json.loads((out / "_manifest.json").read_text())
    assert rows > 0 and rows == man["counts"]["rows"] and users == man["counts"]["users_scored"] > 0
    assert man["k"] == 10 and rows == 10 * users  # QUICK: top-10, every user has >= 10 unseen available items
    # a normal run prints progress and results, not the libraries' notices (issue #31)
    console = p.stdout + p.stderr
    for noise in ("Setting accelerator to CPU", "were not passed to `accelerate launch`", "Traceback", "Warning"):
        assert noise not in console, f"{noise!r} in the quickstart's console:\n{console[-3000:]}"
    # nothing was written into the repository's own ./work by a WORK= run
    assert not (ROOT / "work" / "checkpoints" / "quick").exists()


def readme_row(prefix: str) -> str:
    [line] = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(f"| {prefix}")]
    return line


# README results row -> its results JSON; the rows' model names -> the bench's
AMAZON_ROWS = {"quality, Amazon 2014 Toys": "amazon2014-toy.json", "quality, Amazon 2018 Video Games": "amazon2018-game.json"}
ROW_MODELS = {"learned-pooling hybrid": "pool", "frozen hybrid": "hybrid", "ids only": "id"}


@pytest.mark.parametrize("row", sorted(AMAZON_ROWS))
def test_readme_amazon_rows_are_the_committed_tables(row):
    """The README's Amazon quality rows quote the committed tables (docs/results/<dataset>.json, written by
    bench/quality.py): each model's 3-seed test HR@10 / NDCG@10, and "every paired interval above zero" for pool over
    the frozen hybrid and the frozen hybrid over ids only, on every seed and pooled."""
    name = AMAZON_ROWS[row]
    line = readme_row(row)
    doc = json.loads((ROOT / "docs" / "results" / name).read_text())
    for words, model in ROW_MODELS.items():
        m = re.search(rf"(?:^|, |\| ){re.escape(words)} ([0-9.]+) / ([0-9.]+)", line)
        assert m, f"README row {row!r} has no '{words} HR / NDCG'"
        s = doc["summary"][model]
        assert s["HR@10"]["n_seeds"] == 3 and "3 seeds" in line
        assert (m.group(1), m.group(2)) == (f"{s['HR@10']['mean']:.4f}", f"{s['NDCG@10']['mean']:.4f}"), (row, words)
    assert "every paired interval above zero" in line
    for a, b in (("hybrid", "pool"), ("id", "hybrid")):
        pairs = [p for p in doc["paired"] if (p["a"], p["b"]) == (a, b)]
        assert {str(p["seed"]) for p in pairs} >= {"0", "1", "2"}, (row, a, b)
        assert all(p["NDCG@10"]["ci95"][0] > 0 for p in pairs), (row, a, b)


def test_readme_recbole_figure_is_the_committed_run():
    """The toys row's RecBole SASRec figure is the committed run's (docs/results/amazon2014-toy_recbole_sasrec.json,
    written by bench/recbole_sasrec.py), and "level" holds: its paired NDCG@10 interval against ids only covers zero."""
    line = readme_row("quality, Amazon 2014 Toys")
    doc = json.loads((ROOT / "docs" / "results" / "amazon2014-toy_recbole_sasrec.json").read_text())
    m = re.search(r"RecBole's SASRec on the same split \(seed (\d)\): ([0-9.]+) / ([0-9.]+), level with ids only", line)
    assert m, "README toys row has no RecBole SASRec figure"
    t = doc["metrics"]["test"]
    assert (int(m.group(1)), m.group(2), m.group(3)) == (doc["seed"], f"{t['HR@10']:.4f}", f"{t['NDCG@10']:.4f}")
    [pair] = [p for p in doc["paired"] if p["a"] == f"id_s{doc['seed']}"]
    lo, hi = pair["NDCG@10"]["ci95"]
    assert lo < 0 < hi


def test_readme_search_figures_are_the_committed_runs():
    """The online-service row's search figures are bench/search_eval.py's committed runs (docs/results/search_eval_*.json):
    test NDCG@10 at the service's default weight in both text spaces, query only and history only in the default
    space, sample then Amazon Toys; and the default space and weight are the service's defaults."""
    from inference.serve.config import ServeConfig

    line = readme_row("online service")
    docs = [json.loads((ROOT / "docs" / "results" / f"search_eval_{n}.json").read_text()) for n in ("sample", "amazon2014-toy")]
    cfg = ServeConfig(follow_recs="x")
    assert cfg.search_text_space == "auto"  # = encoder for the frozen-encoder models measured here
    assert cfg.search_broad_history_weight is None  # one weight unless a catalogue's own validation says otherwise
    w = f"{cfg.search_history_weight:.1f}"

    def pair(space: str, key: str, kind: str = "title", ds=docs) -> str:
        return " / ".join(f"{d['queries'][kind]['spaces'][space]['by_history_weight'][key]['NDCG@10']:.4f}" for d in ds)

    assert f"test NDCG@10 at the default weight (sample / Amazon Toys): {pair('encoder', w)} in the frozen encoder's space " \
           f"(the default), {pair('model', w)} in the model's; query only {pair('encoder', '0.0')}, history only " \
           f"{pair('encoder', '1.0')}" in line
    # need queries (a category, a genre): the default weight's figure, and the paired gain of the broad-query rule each
    # catalogue chose on validation over one weight, with its interval above zero
    need = [json.loads((ROOT / "docs" / "results" / f"search_eval_{n}.json").read_text()) for n in ("sample", "ml-100k")]
    gains = [d["queries"]["attribute"]["spaces"]["encoder"]["paired_chosen_rule_vs_one_weight"]["NDCG@10"] for d in need]
    assert all(g["ci95"][0] > 0 for g in gains)
    diffs = " / ".join(f"{g['diff']:+.4f}" for g in gains)
    assert f"queries naming a need (a category, a genre; sample / MovieLens-100K): {pair('encoder', w, 'attribute', need)} " \
           f"at the default weight, {diffs} with a broad-query weight chosen on validation (opt-in)" in line


def test_readme_gate_figures_are_the_committed_run():
    """The promotion-gate row is bench/gate_eval.py's committed run (docs/results/gate_amazon2014-toy.json): the paired
    differences in the README's order, the promoted ones first; "kept out" holds (interval below zero, decision
    kept_incumbent) and every promoted one is within the rule the gate applied."""
    line = readme_row("promotion gate")
    doc = json.loads((ROOT / "docs" / "results" / "gate_amazon2014-toy.json").read_text())
    rows = doc["rows"]
    promoted = [r for r in rows if r["decision"] == "promoted"]
    kept = [r for r in rows if r["decision"] == "kept_incumbent"]
    assert len(promoted) == 3 and len(kept) == 2
    fmt = lambda rs: ", ".join(f"{r['paired_vs_incumbent']['mean']:+.4f}" for r in rs)  # noqa: E731
    assert f"promoted (paired validation NDCG@10 {fmt(promoted)})" in line
    assert f"kept out ({fmt(kept)}, intervals below zero)" in line
    assert all(r["paired_vs_incumbent"]["ci95"][1] < 0 for r in kept)
    for r in promoted:
        c, i = r["candidate"]["metrics"]["NDCG@10"], r["incumbent"]["metrics"]["NDCG@10"]
        assert c >= i * (1 - r["rule"]["max_relative_drop"])


def test_readme_fault_campaign_figures_are_the_committed_run():
    """The fault-campaign row is bench/fault_suite.py's committed full run (docs/results/fault_suite.json): its number of
    cases, all of them passed, every case the suite defines was run, and the kill -9 count per stage."""
    line = readme_row("fault campaign")
    doc = json.loads((ROOT / "docs" / "results" / "fault_suite.json").read_text())
    n, kills = doc["summary"]["cases"], doc["summary"]["kills_landed"]
    assert doc["summary"]["passed"] == n and not doc["summary"]["failed"]
    assert f"{n} faults injected" in line and f"{n} handled as promised" in line
    assert f"{sum(kills.values())} kill -9 of data_prep, train, inference and the gate" in line
    assert set(kills) == {"kill9_data_prep", "kill9_train", "kill9_inference", "kill9_gate"}
    listed = subprocess.run([sys.executable, "bench/fault_suite.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True).stdout
    names = [ln.split()[0] for ln in listed.splitlines() if ln and not ln[0].isspace() and "[item" in ln]
    assert sorted(names) == sorted(c["name"] for c in doc["cases"]), "a case added since the committed run: rerun it"
