"""Units for lmrec_common: typed config loading, overrides, atomic publish."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from lmrec_common.config import ConfigError, dump_yaml, load_config, parse_overrides
from lmrec_common.manifest import git_commit, sha256_strings
from lmrec_common.publish import atomic_write_json, clean_stale_temps, publish_dir, staged_dir

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Inner:
    a: int = 1
    names: list[str] = dataclasses.field(default_factory=lambda: ["x"])


@dataclasses.dataclass
class Job:
    path: str = "p"
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    date: str = ""
    opt: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def validate(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_yaml_plus_overrides_are_coerced(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("path: data\nlr: 0.01\ninner:\n  a: 3\n")
    cfg = load_config(Job, y, ["steps=20", "flag=true", "inner.names=a,b", "date=2026-11-27", "opt=null", "lr=2e-4"])
    assert cfg.path == "data" and cfg.steps == 20 and cfg.flag is True
    assert cfg.lr == pytest.approx(2e-4)
    assert cfg.inner.a == 3 and cfg.inner.names == ["a", "b"]
    assert cfg.date == "2026-11-27" and cfg.opt is None


def test_zero_padded_string_override_keeps_its_digits():
    cfg = load_config(Job, None, ["path=007"])
    assert cfg.path == "007"


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("pathh: data\n")
    with pytest.raises(ConfigError, match=r"pathh.*job\.yaml"):
        load_config(Job, y)
    with pytest.raises(ConfigError, match=r"inner\.b"):
        load_config(Job, None, ["inner.b=1"])


def test_bad_type_and_validate_errors_name_the_key():
    with pytest.raises(ConfigError, match="steps"):
        load_config(Job, None, ["steps=ten"])
    with pytest.raises(ConfigError, match="steps must be"):
        load_config(Job, None, ["steps=-1"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["steps"])


def test_duplicate_yaml_key_is_an_error_naming_key_and_file(tmp_path):
    """PyYAML keeps the last of two equal keys: a section given twice would silently drop the first."""
    y = tmp_path / "job.yaml"
    y.write_text("inner:\n  a: 3\nsteps: 4\ninner:\n  names: [x]\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: key 'inner' appears twice in one mapping \(lines 1 and 4\)"):
        load_config(Job, y)
    y.write_text("inner: {a: 1, a: 2}\n")
    with pytest.raises(ConfigError, match=r"key 'a' appears twice"):
        load_config(Job, y)
    # YAML merge keys are not duplicates: the explicit key overrides the merged one, as YAML says
    y.write_text("base: &b {a: 1, names: [x]}\ninner:\n  <<: *b\n  a: 5\n")
    from lmrec_common.config import read_yaml

    assert read_yaml(y)["inner"] == {"a": 5, "names": ["x"]}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(Job, None, ["inner.a=5"])
    y = tmp_path / "resolved.yaml"
    y.write_text(dump_yaml(cfg))
    assert load_config(Job, y) == cfg


def test_staged_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "1"  # old output intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left behind


def test_publish_replaces_whole_folder(tmp_path):
    final = tmp_path / "t"
    final.mkdir()
    (final / "old_only.txt").write_text("x")
    tmp = tmp_path / "new"
    tmp.mkdir()
    (tmp / "new.txt").write_text("y")
    publish_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_clean_stale_temps(tmp_path):
    (tmp_path / ".tmp-x-1-ab").mkdir()
    (tmp_path / ".old-x-2-cd").mkdir()
    (tmp_path / "x").mkdir()
    removed = clean_stale_temps(tmp_path, "x")
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def _run(root: Path, run_id: str, t: float) -> Path:
    from lmrec_common.publish import place_run

    stage = root / f".stage-x-{run_id}"
    stage.mkdir(parents=True)
    (stage / f"part-0-{run_id}.parquet").write_text(run_id)
    (stage / "_SUCCESS").write_text("")
    os.utime(stage / "_SUCCESS", (t, t))
    return place_run(stage, root, "x", run_id)


def test_run_folders_behind_a_link_and_the_grace_period(tmp_path):
    """place_run + point_to: the link moves in one rename, run folders are never changed; resolve_table gives the
    folder to read; sweep_runs keeps every replaced run for grace_s after the link left it (a rollback too)."""
    import time

    from lmrec_common.publish import point_to, resolve_table, sweep_runs

    with pytest.raises(FileNotFoundError, match="no published table"):
        resolve_table(tmp_path / "x")
    a, b, c = (_run(tmp_path, r, 1000.0 + i) for i, r in enumerate("abc"))
    for f in (a, b, c):
        link = point_to(tmp_path, "x", f)
        assert os.readlink(link) == f"_runs/x/{f.name}" and resolve_table(link) == f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_runs", "x"]  # no link left beside it
    assert sorted(p.name for p in a.iterdir()) == ["_SUCCESS", "part-0-a.parquet"]  # replaced, unchanged
    os.utime(a, (2000.0, 2000.0))  # as if the link had left a at t=2000, b at t=3000
    os.utime(b, (3000.0, 3000.0))
    assert sweep_runs(tmp_path, "x", grace_s=100, now=2099.0) == []
    assert [p.name for p in sweep_runs(tmp_path, "x", grace_s=100, now=3099.0)] == ["run=a"]
    # roll back to b (point_to, as CONTRACTS section 4 says): c's grace starts now
    point_to(tmp_path, "x", b)
    now = time.time()
    assert sweep_runs(tmp_path, "x", grace_s=100, now=now + 50) == [] and resolve_table(link) == b
    assert [p.name for p in sweep_runs(tmp_path, "x", grace_s=100, now=now + 101)] == ["run=c"]
    # without a link (a table withdrawn by hand): the last folder goes after its grace, then the date's folder
    link.unlink()
    os.utime(b, (1000.0, 1000.0))
    assert [p.name for p in sweep_runs(tmp_path, "x", grace_s=100, now=1101.0)] == ["run=b"]
    assert not (tmp_path / "_runs" / "x").exists()


def test_point_to_replaces_a_real_folder_of_the_old_layout(tmp_path, monkeypatch):
    """A table published before run folders (a real folder) is swapped for the link and kept as a replaced run, with
    RENAME_EXCHANGE and with the two-rename fallback."""
    import json

    from lmrec_common import publish

    for exchange in (True, False):
        root = tmp_path / str(exchange)
        (root / "x").mkdir(parents=True)
        (root / "x" / "_SUCCESS").write_text("")
        (root / "x" / "_manifest.json").write_text(json.dumps({"run_id": "20261126T000000-abcdef"}))
        if not exchange:
            monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
        new = _run(root, "n", 1000.0)
        publish.point_to(root, "x", new)
        assert publish.resolve_table(root / "x") == new
        kept = root / "_runs" / "x" / "run=legacy-20261126T000000-abcdef"
        assert (kept / "_SUCCESS").is_file() and (kept / "_manifest.json").is_file()
        assert sorted(p.name for p in root.iterdir()) == ["_runs", "x"]


def test_atomic_json_and_hash(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text().strip().startswith("{")
    assert sha256_strings(["a", "bc"]) != sha256_strings(["ab", "c"])  # length-prefixed


def test_git_commit_names_the_checkout_and_its_edits(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_commit(tmp_path) is None  # not a checkout: no commit, no error
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    (tmp_path / "f.txt").write_text("a\n")
    for cmd in (["init", "-q"], ["add", "f.txt"], ["commit", "-q", "-m", "one"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, env=env)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head[:12]
    (tmp_path / "untracked.txt").write_text("x")  # untracked files do not make the code differ from the commit
    assert git_commit(tmp_path) == head[:12]
    (tmp_path / "f.txt").write_text("b\n")
    assert git_commit(tmp_path) == head[:12] + "-dirty"


def test_exit_cleanly_destroys_the_group_flushes_and_keeps_the_code(tmp_path):
    """The end of `python -m train` / `-m inference`: the process group is gone before exit, buffered
    output is not lost (os._exit skips interpreter finalization), and the exit code is the one given."""
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys, torch.distributed as dist\n"
        "from lmrec_common.log import exit_cleanly\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "import atexit\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "print('buffered', end='')\n"
        "dist.destroy_process_group = (lambda f: (lambda *a, **k: (print(' destroyed', end=''), f(*a, **k))[1]))(dist.destroy_process_group)\n"
        "exit_cleanly(124)\n")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "rdzv")], capture_output=True, text=True, timeout=120,
                       cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 124, p.stderr[-2000:]
    assert p.stdout == "buffered destroyed"  # flushed; finalization (atexit) skipped


@pytest.mark.parametrize("argv, says", [
    (["-m", "data_prep", "--config", "configs/data_prep/amazon.yaml", "num_shards=0"], "num_shards must be >= 1"),
    (["-m", "train", "--config", "configs/train/sample.yaml", "data=/nonexistent/prepared", "tracker=none"],
     "prepared data path /nonexistent/prepared does not exist"),
    (["-m", "inference", "--config", "configs/inference/nightly.yaml", "model_dir=/nonexistent/final", "run_date=2026-12-05"],
     "model_dir: /nonexistent/final does not exist"),
])
def test_expected_errors_are_one_line_without_traceback(argv, says):
    """A user mistake (bad key value, missing path) is one line 'error: ...' naming it and exit 2, not a traceback;
    a wrong key=value is blamed on the command line, not on the YAML file that is fine."""
    import subprocess

    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LMREC_TRACEBACK": ""})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last, last
    if "=0" in argv[-1]:
        assert "given on the command line" in last and "itself is fine" in last


def test_config_base_chain_merges_sections_and_refuses_loops(tmp_path):
    from lmrec_common.config import ConfigError, load_config, read_config_tree
    from train.config import TrainConfig

    (tmp_path / "a.yaml").write_text("run_name: a\nmodel:\n  d_model: 32\n  n_layers: 3\noptim:\n  lr: 0.01\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nrun_name: b\nmodel:\n  n_layers: 1\n")
    cfg = load_config(TrainConfig, tmp_path / "sub" / "b.yaml", ["model.dropout=0.3"])
    # b's keys win, a's other keys of the same section stay, the command line wins over both
    assert (cfg.run_name, cfg.model.d_model, cfg.model.n_layers, cfg.optim.lr, cfg.model.dropout) == ("b", 32, 1, 0.01, 0.3)
    assert "base" not in read_config_tree(tmp_path / "sub" / "b.yaml")
    (tmp_path / "a.yaml").write_text("base: sub/b.yaml\nrun_name: a\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(TrainConfig, tmp_path / "sub" / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(TrainConfig, tmp_path / "c.yaml")


def test_shipped_variant_configs_resolve_over_their_twin():
    from lmrec_common.config import load_config
    from train.config import TrainConfig

    root = Path(__file__).resolve().parent.parent / "configs" / "train"
    pool, hybrid = load_config(TrainConfig, root / "amazon_pool.yaml"), load_config(TrainConfig, root / "amazon_hybrid.yaml")
    assert pool.model.text_mode == "pool" and hybrid.model.text_mode == "frozen"
    assert (pool.epochs, pool.model.max_len, pool.optim.lr, pool.model.dropout, pool.model.d_model) == (
        hybrid.epochs, hybrid.model.max_len, hybrid.optim.lr, hybrid.model.dropout, hybrid.model.d_model)


@pytest.mark.parametrize("stage", ["data_prep", "train", "inference"])
def test_help_prints_every_key_with_default_and_meaning(stage):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", stage, "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr[-2000:]
    expect = {"data_prep": ["events_path = ", "columns.user_id = \"user_id\"", "id_normalization = \"exact\"  # "],
              "train": ["model.text_mode = \"frozen\"  # ", "optim.lr = 0.001", "data = "],
              "inference": ["compression = \"zstd\""]}[stage]
    for e in expect:
        assert e in p.stdout, (e, p.stdout[:3000])
