"""The fault campaign of issue 29, reproducible: each case injects one fault into a tiny synthetic run and drives the
real command lines as subprocesses (``python -m data_prep``, ``accelerate launch -m train``, ``accelerate launch -m
inference``, ``python -m inference.gate``), then checks the outcome the code promises (docs/CONTRACTS.md section 5, docs/RELIABILITY.md).

    python bench/fault_suite.py                      # every case, ~10 min on 2 busy cores -> docs/results/fault_suite.json
    python bench/fault_suite.py --list               # the cases: name, issue item, fault, expected outcome
    python bench/fault_suite.py --only final_flipped_weight_byte,resume_torn_log_line
    python bench/fault_suite.py --fast               # the subset tests/test_bench_faults.py runs (~1 min)
    python bench/fault_suite.py --kills 12 --seed 3  # more kill -9 moments per stage

Shared fixtures are built once per invocation under --work (default: a temporary folder) and only when a selected
case needs them: a synthetic log (60 users, 40 items, 800 events), its prepared data, a 6-step training run
(hybrid tower on the bundled MiniLM, frozen; step_2/, step_4/, step_6/ and final/), the same run trained to step 60
(the gate cases' candidate) and one published table. A case
copies what it damages. Each case records its fault, the expected outcome, what was observed (exit code of every
command, the first ``error:`` line, whether a traceback appeared and from which process, what is on disk) and
every check with its result; the case passes when every check holds. The report (--out; the default
docs/results/fault_suite.json only for a full run) holds the command, machine, date and every case, and a table is
printed at the end.

Tracebacks: ``job`` = printed by lmrec's process (a bug, or an expected error that escaped its one-line message);
``launcher`` = printed by ``accelerate launch`` itself, which re-raises any non-zero exit of its worker as
CalledProcessError unless it is given ``-q`` (see case accelerate_launch_user_error). A case that runs the job
through ``accelerate launch`` checks that lmrec's own process printed one ``error:`` line and no traceback.

Kill cases (``kill9_*``) SIGKILL the whole process group of a command at random moments (uniform over a clean run's
duration, seeded by --seed) and at moments chosen by watching the disk (a staging folder, a checkpoint being
written, a run folder placed but not yet pointed at), check after each kill that no half-written output is
visible as whole, then rerun the command to completion and compare with a clean run.

Processes: every command inherits this one's niceness; OMP_NUM_THREADS=1. Run it with ``nice -n 19`` on a shared
machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lmrec_common.manifest import git_commit  # noqa: E402

PY = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU_1PROC = "launch/accelerate/cpu_1proc.yaml"
CPU_DDP_2PROC = "launch/accelerate/cpu_ddp_2proc.yaml"
RUN_DATE = "2026-11-27"
NAME = f"dt={RUN_DATE}"
K = 5
BASE_STEPS = 6  # the shared training run: saves at 2, 4, 6 (keep_last 3), final/ after step 6
RESUME_STEPS = 8  # a resumed copy trains on to this step

ENV = {k: v for k, v in os.environ.items() if k not in ("LMREC_TRACEBACK", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
ENV.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1"})

ERROR_LINE = re.compile(r"^error(?: \(rank \d+\))?: .*")
LAUNCHER_FRAMES = ("/bin/accelerate", "/bin/torchrun", "accelerate/commands/launch.py", "accelerate/commands/accelerate_cli.py", "torch/distributed/run.py",
                   "torch/distributed/elastic/", "torch/distributed/launcher/")


# ================================================================================================ processes
@dataclasses.dataclass
class Proc:
    """One finished (or killed) command and what it printed."""

    cmd: list[str]
    rc: int | None
    out: str
    err: str
    seconds: float
    killed_at: float | None = None  # seconds after start when it was SIGKILLed (None: ran to its end)
    kill_reason: str = ""

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def error_line(self) -> str | None:
        """The first line lmrec prints for an expected error (``error: ...``), else None."""
        for ln in self.err.splitlines() + self.out.splitlines():
            if ERROR_LINE.match(ln.strip()):
                return ln.strip()
        return None

    def tracebacks(self) -> list[str]:
        """Who printed a traceback: 'launcher' (accelerate launch / torchrun re-raising the worker's exit code) or
        'job' (lmrec's own process)."""
        who = []
        for block in self.text.split("Traceback (most recent call last):")[1:]:
            frames = re.findall(r'File "([^"]+)"', block.split("\n\n")[0])
            kind = "launcher" if frames and all(any(m in f for m in LAUNCHER_FRAMES) for f in frames) else "job"
            if kind not in who:
                who.append(kind)
        return who

    def obs(self) -> dict:
        d = {"exit": self.rc, "error_line": _short(self.error_line(), 400), "traceback": self.tracebacks() or None,
             "seconds": round(self.seconds, 1)}
        if self.killed_at is not None:
            d.update(killed_at_s=round(self.killed_at, 2), kill_reason=self.kill_reason)
        return d

    def tail(self, n: int = 3000) -> str:
        return f"$ {' '.join(self.cmd)}\n--- stdout\n{self.out[-n:]}\n--- stderr\n{self.err[-n:]}"


def _short(s: str | None, n: int = 160) -> str | None:
    return s if s is None or len(s) <= n else s[: n - 3] + "..."


def run(cmd: list, timeout: float = 600, env: dict | None = None, kill_when: Callable[[float], str] | None = None) -> Proc:
    """Run ``cmd`` (cwd = the repository) in its own process group. ``kill_when(elapsed_s)`` is polled every ~2 ms and
    SIGKILLs the whole group as soon as it returns a reason (a non-empty string)."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.time()
        p = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=fo, stderr=fe, text=True,
                             start_new_session=True)
        killed_at, reason = None, ""
        while p.poll() is None:
            el = time.time() - t0
            try:
                why = kill_when(el) if kill_when else ""
            except OSError:  # a watched path vanished between listing and reading it: look again
                why = ""
            if why or el > timeout:
                reason = why or f"timeout {timeout:.0f}s"
                killed_at = el
                _killpg(p.pid)
                p.wait()
                break
            time.sleep(0.002 if kill_when else 0.02)
        _killpg(p.pid)  # whatever the launcher left behind (a torchrun worker)
        fo.seek(0)
        fe.seek(0)
        return Proc(cmd, p.returncode, fo.read(), fe.read(), time.time() - t0, killed_at, reason)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ================================================================================================ independent oracles
def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def files_under(d: Path) -> list[str]:
    return sorted(f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file())


def final_whole(final: Path) -> str | None:
    """None when final/ holds exactly the files its export.json records, with their hashes; else why not."""
    try:
        info = json.loads((final / "export.json").read_text())
    except (OSError, ValueError) as e:
        return f"export.json: {type(e).__name__}"
    listed = info.get("files_sha256") or {}
    present = [f for f in files_under(final) if f != "export.json"]
    if sorted(listed) != present:
        return f"files differ from export.json: {sorted(set(listed) ^ set(present))}"
    bad = [f for f in present if sha256(final / f) != listed[f]]
    return f"sha256 differs: {bad}" if bad else None


def checkpoint_whole(d: Path) -> str | None:
    """None when step_<N>/COMPLETE lists exactly the files of the folder with their hashes; else why not."""
    try:
        rec = json.loads((d / "COMPLETE").read_text())
    except (OSError, ValueError) as e:
        return f"COMPLETE: {type(e).__name__}"
    present = [f for f in files_under(d) if f != "COMPLETE"]
    if sorted(rec.get("files", {})) != present:
        return f"files differ from COMPLETE: {sorted(set(rec.get('files', {})) ^ set(present))}"
    bad = [f for f in present if sha256(d / f) != rec["files"][f]]
    return f"sha256 differs: {bad}" if bad else None


def table_state(recs: Path) -> dict:
    """What a reader finds at recs/dt=<RUN_DATE>: the link's target, whether the resolved folder is one whole table
    (_SUCCESS; the part files are the manifest's, with its row counts), run folders, and leftovers of killed runs."""
    import pyarrow.parquet as pq

    link = recs / NAME
    st = {"link": os.readlink(link) if link.is_symlink() else None, "whole": False, "rows": None, "why": None}
    runs = recs / "_runs" / NAME
    st["run_folders"] = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    st["leftovers"] = sorted(p.name for p in recs.iterdir() if p.name.startswith((".stage-", ".tmp-", ".old-")))
    if st["link"] is None:
        st["why"] = "no link"
        return st
    d = Path(os.path.realpath(link))
    try:
        man = json.loads((d / "_manifest.json").read_text())
        parts = sorted(p.name for p in d.glob("part-*.parquet"))
        want = sorted(p["file"] for p in man["parts"])
        if not (d / "_SUCCESS").is_file():
            st["why"] = "no _SUCCESS"
        elif parts != want:
            st["why"] = f"parts {parts} != manifest {want}"
        else:
            rows = {p["file"]: p["rows"] for p in man["parts"]}
            got = {f: pq.read_metadata(d / f).num_rows for f in parts}
            st["whole"] = got == rows and sum(rows.values()) == man["counts"]["rows"]
            st["rows"] = sum(got.values())
            st["run_id"] = man.get("run_id")
            if not st["whole"]:
                st["why"] = f"row counts {got} != manifest {rows}"
    except (OSError, ValueError, KeyError) as e:
        st["why"] = f"{type(e).__name__}: {e}"
    return st


def prepared_state(out: Path) -> dict:
    """What a reader of a prepared root finds: LATEST, whether each visible version folder is whole (its manifest
    loads and its items/sequences hold the row counts it records), and hidden leftovers of killed runs."""
    import datasets

    st = {"latest": (out / "LATEST").read_text().strip() if (out / "LATEST").is_file() else None, "versions": {},
          "leftovers": []}
    if not out.is_dir():
        return st
    for d in sorted(out.iterdir()):
        if d.name.startswith((".", "_")) or not d.is_dir() or d.name == "forget":
            if d.name.startswith(".tmp-") or d.name.startswith(".old-"):
                st["leftovers"].append(d.name)
            continue
        try:
            man = json.loads((d / "manifest.json").read_text())
            n_items = datasets.load_from_disk(str(d / "items")).num_rows
            n_users = datasets.load_from_disk(str(d / "sequences")).num_rows
            ok = n_items == man["counts"]["items"] and n_users == man["counts"]["users"]
            st["versions"][d.name] = "whole" if ok else f"counts differ ({n_items} items, {n_users} users)"
        except Exception as e:  # noqa: BLE001 - any failure to read is what a reader would hit
            st["versions"][d.name] = f"{type(e).__name__}: {_short(str(e), 120)}"
    cache = out / "_cache"
    if cache.is_dir():
        st["leftovers"] += [f"_cache/{p.name}" for p in cache.iterdir() if p.name.startswith("hf-")]
        st["leftovers"] += [f"_cache/validated/{p.name}" for p in (cache / "validated").glob(".tmp-*")]
    st["latest_whole"] = st["latest"] is not None and st["versions"].get(st["latest"]) == "whole"
    return st


def flock_held(path: Path) -> bool:
    """True when another process holds an exclusive flock on ``path``."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def losses_steps(run_dir: Path) -> list[int] | str:
    try:
        return [json.loads(ln)["step"] for ln in (run_dir / "losses.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"


# ================================================================================================ faults
PAYLOAD = textwrap.dedent("""\
    # unpickling this file with code allowed (torch.load(weights_only=False)) creates the marker file
    import sys
    import torch

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return (open, (self.marker, "w"))

    torch.save({"state": Payload(sys.argv[2])}, sys.argv[1])
""")


def write_payload(dest: Path, marker: Path) -> None:
    """A torch.save file that creates ``marker`` when loaded with weights_only=False (a planted pickle)."""
    script = dest.parent / f".payload-{dest.name}.py"
    script.write_text(PAYLOAD)
    p = run([PY, script, dest, marker], timeout=300)
    script.unlink()
    if p.rc != 0:
        raise RuntimeError(f"could not write the payload\n{p.tail()}")


def flip_byte(f: Path, at: float = 0.6) -> None:
    """Flip one bit in the middle of a file's data (size and mtime unchanged)."""
    st = f.stat()
    b = bytearray(f.read_bytes())
    i = int(len(b) * at)
    b[i] ^= 0x01
    f.write_bytes(bytes(b))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate(f: Path, keep: float = 0.5) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * keep))


def rehash_complete(step_dir: Path) -> None:
    """What a writer of the folder can do: rewrite COMPLETE with the hashes of the files as they are now."""
    rec = json.loads((step_dir / "COMPLETE").read_text())
    rec["files"] = {f: sha256(step_dir / f) for f in files_under(step_dir) if f != "COMPLETE"}
    (step_dir / "COMPLETE").write_text(json.dumps(rec, indent=2) + "\n")


def rehash_export(final: Path) -> None:
    """Rewrite export.json's files_sha256 for the files as they are now (a writer of final/ can)."""
    info = json.loads((final / "export.json").read_text())
    info["files_sha256"] = {f: sha256(final / f) for f in files_under(final) if f != "export.json"}
    info["weights_sha256"] = info["files_sha256"]["model.safetensors"]
    (final / "export.json").write_text(json.dumps(info, indent=2) + "\n")


# ================================================================================================ the suite
@dataclasses.dataclass
class Case:
    name: str
    item: str  # issue 29 item(s)
    fault: str
    expected: str
    fn: Callable
    fast: bool = False
    needs: tuple = ()


CASES: dict[str, Case] = {}


def case(name: str, item: str, fault: str, expected: str, fast: bool = False):
    def deco(fn):
        CASES[name] = Case(name, item, fault, expected, fn, fast)
        return fn
    return deco


class Checks:
    """The expectations of one case: each ``ok(cond, what)`` is recorded; the case passes when all hold."""

    def __init__(self):
        self.items: list[dict] = []

    def ok(self, cond, what: str) -> bool:
        self.items.append({"check": what, "ok": bool(cond)})
        return bool(cond)

    @property
    def passed(self) -> bool:
        return bool(self.items) and all(c["ok"] for c in self.items)

    def refused(self, p: Proc, *names: str, exit_code: int | None = 2) -> None:
        """An expected error: exit code, one 'error:' line naming each of ``names``, no traceback of lmrec's."""
        line = p.error_line() or ""
        if exit_code is not None:
            self.ok(p.rc == exit_code, f"exit code {exit_code} (got {p.rc})")
        else:
            self.ok(p.rc not in (0, None), f"non-zero exit (got {p.rc})")
        self.ok(line, "one line 'error: ...'")
        for n in names:
            self.ok(n in line, f"the error names {n!r}")
        self.ok("job" not in p.tracebacks(), "no traceback from lmrec's process")


class Suite:
    def __init__(self, work: Path, seed: int, kills: int):
        self.work, self.seed, self.kills = work, seed, kills
        self.fx = work / "fixtures"
        shutil.rmtree(self.fx, ignore_errors=True)  # built fresh by every invocation (the code may have changed)
        self.fx.mkdir(parents=True)
        self._built: dict[str, object] = {}
        self.fixture_log: list[dict] = []

    # ------------------------------------------------------------------ commands
    def prep_cmd(self, raw: Path, out: Path, *extra: str) -> list:
        return [PY, "-m", "data_prep", "--config", "configs/data_prep/sample.yaml", f"events_path={raw}/events",
                f"items_path={raw}/items", f"output_dir={out}", "num_shards=2", "num_proc=1", *extra]

    def train_args(self, out: Path, run_name: str = "base", *extra: str) -> list:
        return ["--config", "configs/train/sample.yaml", f"data={self.prepared()}", f"output_dir={out}",
                f"run_name={run_name}", f"max_steps={BASE_STEPS}", "eval_every=2", "save_every=2", "keep_last=3",
                "batch_size=16", "model.d_model=16", "model.max_len=10", "optim.warmup_steps=1", "log_every=1",
                "eval_batch_size=64", "tracker=none", "evaluate_test=false", f"text_feature_cache={self.fx / 'textcache'}",
                *extra]

    def train_cmd(self, out: Path, *extra: str, run_name: str = "base", launcher: str = "accelerate") -> list:
        args = self.train_args(out, run_name, *extra)
        if launcher == "python":
            return [PY, "-m", "train", *args]
        cfg = CPU_DDP_2PROC if launcher == "ddp2" else CPU_1PROC
        return [ACCELERATE, "launch", "--config_file", cfg, "-m", "train", *args]

    def infer_cmd(self, final: Path, recs: Path, *extra: str, launcher: str = "accelerate") -> list:
        args = ["--config", "configs/inference/nightly.yaml", f"model_dir={final}", f"prepared_dir={self.prepared()}",
                f"output_dir={recs}", f"run_date={RUN_DATE}", f"k={K}", "num_threads=1",
                f"text_feature_cache={self.fx / 'textcache'}", *extra]
        if launcher == "python":
            return [PY, "-m", "inference", *args]
        return [ACCELERATE, "launch", "--config_file", CPU_1PROC, "-m", "inference", *args]

    def gate_cmd(self, link: Path, candidate: Path, *extra: str) -> list:
        return [PY, "-m", "inference.gate", "--config", "configs/inference/nightly.yaml", f"model_dir={link}",
                f"prepared_dir={self.prepared()}", f"gate.candidate={candidate}", "num_threads=1",
                f"text_feature_cache={self.fx / 'textcache'}", *extra]

    # ------------------------------------------------------------------ fixtures (built once, on demand)
    def _fixture(self, name: str, build: Callable[[], object]):
        if name not in self._built:
            t = time.time()
            self._built[name] = build()
            self.fixture_log.append({"fixture": name, "seconds": round(time.time() - t, 1)})
            print(f"[fault_suite] fixture {name} ready in {time.time() - t:.1f}s", flush=True)
        return self._built[name]

    def _must(self, p: Proc, what: str) -> Proc:
        if p.rc != 0:
            raise RuntimeError(f"fixture {what} failed\n{p.tail()}")
        return p

    def raw(self) -> Path:
        def build():
            out = self.fx / "raw"
            self._must(run([PY, "-m", "data_prep.synthetic", "--out", out, "n_users=60", "n_items=40", "n_events=800",
                            "n_topics=4", "n_days=5", "max_user_events=30"]), "raw")
            return out
        return self._fixture("raw", build)

    def prepared(self) -> Path:
        def build():
            out = self.fx / "prepared"
            p = self._must(run(self.prep_cmd(self.raw(), out)), "prepared")
            self._built["prep_seconds"] = p.seconds
            return out
        return self._fixture("prepared", build)

    def trained(self) -> Path:
        """fixtures/ck/base: step_2, step_4, step_6 and final/ of a 6-step run."""
        def build():
            p = self._must(run(self.train_cmd(self.fx / "ck")), "trained")
            self._built["train_seconds"] = p.seconds
            return self.fx / "ck" / "base"
        return self._fixture("trained", build)

    def gate_final(self) -> Path:
        """fixtures/ck/gate/final: the shared run trained on to step 60 (validation NDCG@10 above most-popular's, which
        the 6-step run is not): tonight's candidate in the gate cases."""
        def build():
            args = [a for a in self.train_args(self.fx / "ck", "gate")
                    if not a.startswith(("max_steps=", "eval_every=", "save_every="))]
            self._must(run([PY, "-m", "train", *args, "max_steps=60", "eval_every=20", "save_every=60",
                            "optim.lr=3e-3"]), "gate_final")
            return self.fx / "ck" / "gate" / "final"
        return self._fixture("gate_final", build)

    def published(self) -> Path:
        """fixtures/recs: one table of RUN_DATE from the trained final/."""
        def build():
            out = self.fx / "recs"
            p = self._must(run(self.infer_cmd(self.trained() / "final", out)), "published")
            self._built["infer_seconds"] = p.seconds
            return out
        return self._fixture("published", build)

    def tiny_text_model(self) -> Path:
        """A 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer (a model folder a user could bring)."""
        def build():
            out = self.fx / "tiny_bert"
            code = textwrap.dedent(f"""\
                import torch
                from transformers import AutoTokenizer, BertConfig, BertModel
                from lmrec_common.models import resolve_model_path
                tok = AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:all-MiniLM-L6-v2")))
                cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)
                torch.manual_seed(0)
                BertModel(cfg).save_pretrained({str(out)!r})
                tok.save_pretrained({str(out)!r})
            """)
            self._must(run([PY, "-c", code]), "tiny_text_model")
            return out
        return self._fixture("tiny_text_model", build)

    def payload_control(self) -> bool:
        """The planted pickle is live: loading it the way Accelerate loaded custom_checkpoint_0.pkl before the fix
        (torch.load weights_only=False) creates the marker. Checked once so a passing case means 'refused', not 'the
        payload was a dud'."""
        def build():
            d = self.fx / "payload_control"
            d.mkdir(exist_ok=True)
            marker = d / "RAN"
            write_payload(d / "p.pkl", marker)
            p = run([PY, "-c", f"import torch; torch.load({str(d / 'p.pkl')!r}, weights_only=False)"])
            return marker.exists() and p.rc == 0
        return self._fixture("payload_control", build)

    # ------------------------------------------------------------------ helpers of cases
    def case_dir(self, name: str) -> Path:
        d = self.work / "cases" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def copy_run(self, d: Path, drop_final: bool = True) -> Path:
        """A copy of the 6-step run under d/ck/base (final/ and metrics.json dropped: a relaunch must resume)."""
        dst = d / "ck" / "base"
        shutil.copytree(self.trained(), dst, symlinks=True)
        if drop_final:
            shutil.rmtree(dst / "final")
            (dst / "metrics.json").unlink(missing_ok=True)
        return dst

    def copy_final(self, d: Path) -> Path:
        dst = d / "final"
        shutil.copytree(self.trained() / "final", dst)
        return dst

    def copy_recs(self, d: Path) -> Path:
        dst = d / "recs"
        shutil.copytree(self.published(), dst, symlinks=True)
        return dst


# ================================================================================================ item 1: no code from checkpoints/model folders
def _resume_fallback(s: Suite, c: Checks, d: Path, damaged: str, obs: dict, marker: Path | None = None) -> None:
    """Relaunch the copied run (max_steps 8): step_6 is refused with a warning naming ``damaged``, the run resumes
    from step_4 and completes."""
    rd = d / "ck" / "base"
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    refused = [ln for ln in p.out.splitlines() if "checkpoint refused" in ln]
    obs.update(p.obs(), refused=[_short(x, 300) for x in refused], resumed_from=_resumed_from(p))
    c.ok(p.rc == 0, f"the relaunch completes (exit {p.rc})")
    c.ok(any(damaged in x for x in refused), f"a warning names {damaged}")
    c.ok(obs["resumed_from"] == "step_4", "resumed from step_4, the newest that verifies")
    c.ok(not p.tracebacks(), "no traceback")
    c.ok(losses_steps(rd) == list(range(1, RESUME_STEPS + 1)), f"losses.jsonl holds steps 1..{RESUME_STEPS} once each")
    c.ok((rd / "final").is_dir() and final_whole(rd / "final") is None, "final/ exported whole")
    if marker is not None:
        obs["payload_ran"] = marker.exists()
        c.ok(not marker.exists(), "the planted code did not run")
    if p.rc != 0:
        obs["tail"] = p.tail(1500)


def _resumed_from(p: Proc) -> str | None:
    m = re.search(r"resumed from (\S+) \(step", p.out)
    return Path(m.group(1)).name if m else None


@case("ckpt_planted_pickle", "1", "a torch pickle that runs code on load planted as step_6/custom_checkpoint_0.pkl "
      "(the file Accelerate used to unpickle with weights_only=False)",
      "step_6 refused (unexpected file) with a warning naming it; resume from step_4; the code never runs")
def ckpt_planted_pickle(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    obs["payload_live"] = s.payload_control()
    c.ok(obs["payload_live"], "control: the payload runs when unpickled with weights_only=False")
    rd = s.copy_run(d)
    marker = d / "PAYLOAD_RAN"
    write_payload(rd / "step_6" / "custom_checkpoint_0.pkl", marker)
    _resume_fallback(s, c, d, "step_6/custom_checkpoint_0.pkl: unexpected file", obs, marker)


@case("ckpt_unexpected_file", "1", "an extra file step_6/notes.txt",
      "step_6 refused (unexpected file) with a warning; resume from step_4")
def ckpt_unexpected_file(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    rd = s.copy_run(d)
    (rd / "step_6" / "notes.txt").write_text("hello\n")
    _resume_fallback(s, c, d, "step_6/notes.txt: unexpected file", obs)


@case("ckpt_pickle_rehashed", "1", "step_6/optimizer.bin replaced by a code-running pickle and COMPLETE rewritten with "
      "its hash (someone who can write the folder; hashes are no defence against them)",
      "the file verifies but loads only with weights_only: the run stops, one error naming the file, the code never runs")
def ckpt_pickle_rehashed(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    obs["payload_live"] = s.payload_control()
    rd = s.copy_run(d)
    marker = d / "PAYLOAD_RAN"
    write_payload(rd / "step_6" / "optimizer.bin", marker)
    rehash_complete(rd / "step_6")
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    obs.update(p.obs(), payload_ran=marker.exists())
    c.refused(p, "step_6/optimizer.bin", "weights_only", exit_code=None)
    c.ok(not marker.exists(), "the planted code did not run")
    c.ok(not (rd / "final").exists(), "nothing exported")


@case("ckpt_legacy_pickle", "1", "a checkpoint of the format before COMPLETE held hashes (COMPLETE = '6', the LR "
      "schedule in custom_checkpoint_0.pkl) whose custom_checkpoint_0.pkl runs code",
      "the pickle is trial-loaded with weights_only and refused; resume from step_4; the code never runs")
def ckpt_legacy_pickle(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    rd = s.copy_run(d)
    marker = d / "PAYLOAD_RAN"
    st = rd / "step_6"
    (st / "scheduler.json").unlink()
    write_payload(st / "custom_checkpoint_0.pkl", marker)
    (st / "COMPLETE").write_text("6")
    _resume_fallback(s, c, d, "step_6/custom_checkpoint_0.pkl: does not load", obs, marker)


def _auto_map(folder: Path, marker: Path, files=("config.json",)) -> None:
    """Point the folder's config at custom code (auto_map) and ship that code: importing it creates ``marker``."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertModel as EvilModel\n"
                                    "from transformers import BertConfig as EvilConfig\n")
    for name in files:
        f = folder / name
        conf = json.loads(f.read_text())
        conf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                            "AutoTokenizer": ["evil.EvilModel", None]}
        f.write_text(json.dumps(conf, indent=2))


def _nothing_published(c: Checks, before: dict, after: dict) -> None:
    c.ok(after["link"] == before["link"] and after["whole"], "the previous table is still current and whole")
    c.ok(after["run_folders"] == before["run_folders"], "no run folder added")
    c.ok(not after["leftovers"], "no staging folder left")


@case("final_item_tower_auto_map", "1, 3", "final/item_tower/config.json given auto_map + evil.py (custom code)",
      "inference refuses, naming the changed file (integrity); nothing published; the code never runs")
def final_item_tower_auto_map(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    fin, recs, marker = s.copy_final(d), s.copy_recs(d), d / "CODE_RAN"
    _auto_map(fin / "item_tower", marker)
    before = table_state(recs)
    p = run(s.infer_cmd(fin, recs))
    after = table_state(recs)
    obs.update(p.obs(), code_ran=marker.exists(), table=after)
    c.refused(p, "item_tower/", exit_code=None)
    _nothing_published(c, before, after)
    c.ok(not marker.exists(), "the folder's code did not run")


@case("final_item_tower_auto_map_rehashed", "1", "final/item_tower/config.json given auto_map + evil.py, and "
      "export.json rewritten with the new hashes (someone who can write final/)",
      "inference refuses with RemoteCodeError naming item_tower/config.json; nothing published; the code never runs")
def final_item_tower_auto_map_rehashed(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    fin, recs, marker = s.copy_final(d), s.copy_recs(d), d / "CODE_RAN"
    _auto_map(fin / "item_tower", marker)
    rehash_export(fin)
    before = table_state(recs)
    p = run(s.infer_cmd(fin, recs))
    after = table_state(recs)
    obs.update(p.obs(), code_ran=marker.exists(), table=after)
    c.refused(p, "item_tower/config.json", "auto_map", exit_code=None)
    _nothing_published(c, before, after)
    c.ok(not marker.exists(), "the folder's code did not run")


@case("text_model_auto_map", "1", "training's model.text_model_path is a model folder whose config.json and "
      "tokenizer_config.json carry auto_map + evil.py",
      "train refuses before loading it (one error naming the file and auto_map); the code never runs; no run folder")
def text_model_auto_map(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    m = d / "evil_model"
    shutil.copytree(s.tiny_text_model(), m)
    marker = d / "CODE_RAN"
    _auto_map(m, marker, ("config.json", "tokenizer_config.json"))
    p = run(s.train_cmd(d / "ck", f"model.text_model_path={m}", "model.item_tower=text", "model.text_mode=full"))
    obs.update(p.obs(), code_ran=marker.exists())
    c.refused(p, str(m), "auto_map", exit_code=None)
    c.ok(not marker.exists(), "the folder's code did not run")
    c.ok(not (d / "ck" / "base" / "step_2").exists(), "nothing trained")


@case("tokenizer_auto_map", "1", "data_prep's tokenizer is a folder whose tokenizer_config.json carries auto_map",
      "data_prep refuses (exit 2, one error naming the file and auto_map); nothing published; the code never runs", fast=True)
def tokenizer_auto_map(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    m = d / "evil_tok"
    shutil.copytree(s.tiny_text_model(), m)
    marker = d / "CODE_RAN"
    _auto_map(m, marker, ("tokenizer_config.json",))
    p = run(s.prep_cmd(s.raw(), d / "prep", f"tokenizer={m}"))
    obs.update(p.obs(), code_ran=marker.exists())
    c.refused(p, "tokenizer_config.json", "auto_map")
    c.ok(not marker.exists(), "the folder's code did not run")
    c.ok(not (d / "prep" / "LATEST").exists(), "nothing published")


# ================================================================================================ item 2: readers during reruns
@case("readers_during_rerun", "2", "reader processes poll recs/dt=D while a writer republishes it and is kill -9'd at "
      "random moments, then while inference.run.run republishes it (bench/reader_during_rerun.py, short)",
      "0 failures of careful readers and probes (none absent, mixed or not found); one whole run after a clean publish")
def readers_during_rerun(s: Suite, c: Checks, d: Path, obs: dict) -> None:
    out = d / "r.json"
    p = run([PY, "bench/reader_during_rerun.py", "--seconds", "20", "--legacy-seconds", "0", "--inference-reruns", "6",
             "--readers", "careful,naive,probe", "--work", d / "w", "--out", out], timeout=900)
    obs.update(p.obs())
    c.ok(p.rc == 0, f"the bench completes (exit {p.rc})")
    if not out.is_file():
        obs["tail"] = p.tail(1500)
        c.ok(False, "report written")
        return
    res = json.loads(out.read_text())
    obs["summary"] = res.get("summary")
    for phase in ("runs", "inference"):
        sm = res["summary"].get(phase)
        if not sm:
            continue
        c.ok(sm["reruns"] > 0, f"{phase}: reruns happened ({sm['reruns']})")
        bad = {k: v for k, v in sm["failures"].get("careful", {}).items() if v}
        bad.update({f"probe.{k}": v for k, v in sm["failures"].get("probe", {}).items() if v})
        c.ok(not bad, f"{phase}: careful readers and probes never failed ({bad or 0})")
        mixed = sm["failures"].get("naive", {}).get("mixed", 0)
        c.ok(mixed == 0, f"{phase}: naive readers never mixed two runs ({mixed})")
    after = res["phases"]["runs"].get("after_clean_publish", {})
    c.ok(after.get("run_folders") == 1 and after.get("leftovers") == [], "one whole run folder after a clean publish")


def _while_first_holds(cmd: list, lock: Path, during: Callable[[bool], None]) -> int:
    """Start ``cmd``, stop it (SIGSTOP) as soon as it holds ``lock``, call ``during(it held the lock)``, resume it and
    wait for it; returns its exit code."""
    first = subprocess.Popen([str(x) for x in cmd], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    t0 = time.time()
    try:
        while not flock_held(lock) and first.poll() is None and time.time() - t0 < 300:
            time.sleep(0.001)
        held = flock_held(lock)
        os.killpg(first.pid, signal.SIGSTOP)
        during(held)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    first.communicate(timeout=600)
    return first.returncode


@case("concurrent_inference_same_date", "2", "a second inference run of the same date while the first holds the "
      "date's lock (the first is stopped with SIGSTOP once it holds recs/.lock-dt=D, then resumed)",
      "the second stops at once with one error naming the lock and publishes nothing; the first completes; the date's "
      "table is whole and is the first run's")
def concurrent_inference_same_date(s, c, d, obs):
    recs, fin = s.copy_recs(d), s.trained() / "final"
    lock = recs / f".lock-{NAME}"
    before = table_state(recs)

    def second(held: bool) -> None:
        c.ok(held, "the first run holds the date's lock")
        p = run(s.infer_cmd(fin, recs))
        obs["second"] = p.obs()
        c.refused(p, str(lock), exit_code=None)
        after = table_state(recs)
        c.ok(after["link"] == before["link"] and after["run_folders"] == before["run_folders"], "the second published nothing")
    rc = _while_first_holds(s.infer_cmd(fin, recs), lock, second)
    obs["first"] = {"exit": rc}
    c.ok(rc == 0, f"the first completes (exit {rc})")
    st = table_state(recs)
    obs["table"] = {k: st[k] for k in ("whole", "rows", "leftovers")}
    c.ok(st["whole"] and st["link"] != before["link"], "the table is whole and is the first run's")


# ================================================================================================ item 3: integrity of final/
def _damaged_final(s: Suite, c: Checks, d: Path, obs: dict, damage: Callable[[Path], None], names: tuple[str, ...]) -> None:
    fin, recs = s.copy_final(d), s.copy_recs(d)
    damage(fin)
    before = table_state(recs)
    p = run(s.infer_cmd(fin, recs))
    after = table_state(recs)
    obs.update(p.obs(), table={k: after[k] for k in ("link", "whole", "run_folders", "leftovers")})
    c.refused(p, *names, exit_code=None)
    _nothing_published(c, before, after)


@case("final_flipped_weight_byte", "3", "one bit flipped in final/model.safetensors (size and mtime kept)",
      "inference refuses naming model.safetensors; nothing published, the previous table stays current")
def final_flipped_weight_byte(s, c, d, obs):
    _damaged_final(s, c, d, obs, lambda f: flip_byte(f / "model.safetensors"), ("model.safetensors", "sha256 differs"))


@case("final_permuted_item_ids", "3", "final/item_ids.parquet rewritten with its rows permuted (same ids, other order)",
      "inference refuses naming item_ids.parquet; nothing published")
def final_permuted_item_ids(s, c, d, obs):
    def damage(f: Path) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(f / "item_ids.parquet")
        idx = list(range(t.num_rows))
        random.Random(0).shuffle(idx)
        pq.write_table(t.take(idx), f / "item_ids.parquet")
    _damaged_final(s, c, d, obs, damage, ("item_ids.parquet", "sha256 differs"))


@case("final_model_config_edited", "3", "final/model_config.json edited (max_len 10 -> 12)",
      "inference refuses naming model_config.json; nothing published")
def final_model_config_edited(s, c, d, obs):
    def damage(f: Path) -> None:
        conf = json.loads((f / "model_config.json").read_text())
        conf["max_len"] = conf["max_len"] + 2
        (f / "model_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    _damaged_final(s, c, d, obs, damage, ("model_config.json",))


@case("final_file_added", "3", "an extra file final/item_tower/extra.txt", "inference refuses naming it; nothing published")
def final_file_added(s, c, d, obs):
    _damaged_final(s, c, d, obs, lambda f: (f / "item_tower" / "extra.txt").write_text("x"), ("extra.txt", "not part of the export"))


@case("final_tokenizer_missing", "3", "final/item_tower/tokenizer.json deleted",
      "inference refuses naming it (missing); nothing published")
def final_tokenizer_missing(s, c, d, obs):
    _damaged_final(s, c, d, obs, lambda f: (f / "item_tower" / "tokenizer.json").unlink(), ("tokenizer.json", "missing"))


@case("final_weights_missing", "3, 7", "final/model.safetensors deleted (a half-copied export)",
      "inference refuses with one error naming the file; nothing published")
def final_weights_missing(s, c, d, obs):
    _damaged_final(s, c, d, obs, lambda f: (f / "model.safetensors").unlink(), ("model.safetensors",))


@case("final_export_json_torn", "3, 7", "final/export.json cut to its first 100 bytes",
      "inference refuses with one error naming export.json; nothing published")
def final_export_json_torn(s, c, d, obs):
    _damaged_final(s, c, d, obs, lambda f: truncate(f / "export.json", 100 / (f / "export.json").stat().st_size),
                   ("export.json",))


@case("warm_start_damaged_final", "3", "train init_from= a final/ whose model.safetensors has one flipped bit",
      "train refuses naming the file (exit != 0, one error line); nothing trained")
def warm_start_damaged_final(s, c, d, obs):
    fin = s.copy_final(d)
    flip_byte(fin / "model.safetensors")
    p = run(s.train_cmd(d / "ck", f"init_from={fin}", run_name="warm"))
    obs.update(p.obs())
    c.refused(p, "model.safetensors", exit_code=None)
    c.ok(not list((d / "ck").glob("warm/step_*")), "nothing trained")


# ================================================================================================ item 4: resume after damage
@case("resume_truncated_newest", "4", "step_6/model.safetensors cut to half its size (a torn copy or a full disk)",
      "warning naming the file; resume from step_4; the run completes with losses 1..8 once each")
def resume_truncated_newest(s, c, d, obs):
    rd = s.copy_run(d)
    truncate(rd / "step_6" / "model.safetensors")
    _resume_fallback(s, c, d, "step_6/model.safetensors: sha256 differs", obs)


@case("resume_garbled_newest", "4", "one bit flipped in step_6/optimizer.bin",
      "warning naming the file; resume from step_4; the run completes")
def resume_garbled_newest(s, c, d, obs):
    rd = s.copy_run(d)
    flip_byte(rd / "step_6" / "optimizer.bin")
    _resume_fallback(s, c, d, "step_6/optimizer.bin: sha256 differs", obs)


@case("resume_truncated_rng", "4", "step_6/random_states_0.pkl cut to half its size",
      "warning naming the file; resume from step_4 (exact); the run completes")
def resume_truncated_rng(s, c, d, obs):
    rd = s.copy_run(d)
    truncate(rd / "step_6" / "random_states_0.pkl")
    _resume_fallback(s, c, d, "step_6/random_states_0.pkl: sha256 differs", obs)


@case("resume_truncated_rng_rehashed", "4", "the only checkpoint's random_states_0.pkl cut to half and COMPLETE "
      "rewritten to match (the RNG file was short when it was saved)",
      "the run stops (exit != 0) naming random_states_0.pkl: the RNG state was not restored, the resume would not "
      "be exact; nothing trained")
def resume_truncated_rng_rehashed(s, c, d, obs):
    rd = s.copy_run(d)
    for n in (2, 4):
        shutil.rmtree(rd / f"step_{n}")
    truncate(rd / "step_6" / "random_states_0.pkl")
    rehash_complete(rd / "step_6")
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    obs.update(p.obs())
    c.refused(p, "random_states_0.pkl", exit_code=None)
    c.ok("not restored" in (p.error_line() or "") or "does not load" in (p.error_line() or ""), "the error says the RNG state did not load")
    c.ok(not (rd / "final").exists() and not (rd / "step_8").exists(), "nothing trained")


@case("resume_all_damaged", "4", "every step_N/model.safetensors has one flipped bit",
      "the run stops (exit != 0) listing each refused folder; it does not start over from scratch")
def resume_all_damaged(s, c, d, obs):
    rd = s.copy_run(d)
    for n in (2, 4, 6):
        flip_byte(rd / f"step_{n}" / "model.safetensors")
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    obs.update(p.obs())
    c.refused(p, "step_6", "step_4", "step_2", exit_code=None)
    c.ok(not (rd / "final").exists() and "step 00001" not in p.out, "nothing trained")


@case("resume_torn_log_line", "4", "a torn last line appended to losses.jsonl and evals.jsonl (a write cut by kill -9)",
      "warnings name the files and lines; resume works; the logs hold whole lines, steps 1..8 once each")
def resume_torn_log_line(s, c, d, obs):
    rd = s.copy_run(d)
    with open(rd / "losses.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.5, "l')
    with open(rd / "evals.jsonl", "a") as f:
        f.write('{"step": 8, "ndc')
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    warn = [ln for ln in p.out.splitlines() if "do not parse" in ln]
    obs.update(p.obs(), warnings=[_short(w, 300) for w in warn], resumed_from=_resumed_from(p))
    c.ok(p.rc == 0, f"the relaunch completes (exit {p.rc})")
    c.ok(any("losses.jsonl" in w for w in warn) and any("evals.jsonl" in w for w in warn), "a warning names each file")
    c.ok(obs["resumed_from"] == "step_6", "resumed from step_6")
    c.ok(losses_steps(rd) == list(range(1, RESUME_STEPS + 1)), "losses.jsonl holds steps 1..8 once each")
    try:
        [json.loads(x) for x in (rd / "evals.jsonl").read_text().splitlines()]
        c.ok(True, "evals.jsonl parses")
    except ValueError:
        c.ok(False, "evals.jsonl parses")


@case("resume_world_size_recorded", "4", "COMPLETE of every checkpoint says 2 processes saved it; relaunched with 1",
      "refused (exit != 0): the error gives both world sizes and global batches; nothing trained")
def resume_world_size_recorded(s, c, d, obs):
    rd = s.copy_run(d)
    for n in (2, 4, 6):
        f = rd / f"step_{n}" / "COMPLETE"
        rec = json.loads(f.read_text())
        rec["world_size"] = 2
        f.write_text(json.dumps(rec))
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}"))
    obs.update(p.obs())
    c.refused(p, "2 process(es)", "this launch has 1", exit_code=None)
    c.ok(not (rd / "final").exists(), "nothing trained")


@case("resume_other_world_size", "4", "a 1-process run relaunched with 2 processes (CPU DDP, gloo)",
      "refused (exit != 0) naming both world sizes; the checkpoints are untouched; nothing trained")
def resume_other_world_size(s, c, d, obs):
    rd = s.copy_run(d)
    snap = {f: sha256(rd / f) for f in files_under(rd) if f.startswith("step_")}
    p = run(s.train_cmd(d / "ck", f"max_steps={RESUME_STEPS}", launcher="ddp2"), timeout=600)
    obs.update(p.obs())
    c.refused(p, "1 process(es)", "this launch has 2", exit_code=None)
    c.ok({f: sha256(rd / f) for f in files_under(rd) if f.startswith("step_")} == snap, "checkpoints unchanged")
    c.ok(not (rd / "final").exists(), "nothing trained")


# ================================================================================================ item 5 + 7: configs and user errors
CONFIG_CASES = [  # (name, key=value, the words the error must hold)
    ("max_steps_negative", "max_steps=-1", ("max_steps", ">= 0")),
    ("eval_every_negative", "eval_every=-1", ("eval_every", ">= 0")),
    ("save_every_negative", "save_every=-5", ("save_every", ">= 0")),
    ("log_every_zero", "log_every=0", ("log_every", ">= 1")),
    ("seed_negative", "seed=-1", ("seed", ">= 0")),
    ("seed_too_large", f"seed={2**32}", ("seed", "<=")),
    ("batch_size_zero", "batch_size=0", ("batch_size", ">= 1")),
    ("n_heads_zero", "model.n_heads=0", ("model.n_heads", ">= 1")),
    ("d_model_zero", "model.d_model=0", ("model.d_model", ">= 1")),
    ("d_model_not_divisible", "model.n_heads=3", ("model.", "divisible")),
    ("dropout_one", "model.dropout=1.0", ("model.", "dropout")),
    ("lr_zero", "optim.lr=0", ("optim.lr", "> 0")),
    ("lr_nan", "optim.lr=nan", ("optim.lr", "finite")),
    ("warmup_negative", "optim.warmup_steps=-1", ("optim.warmup_steps", ">= 0")),
    ("max_steps_not_int", "max_steps=abc", ("max_steps", "integer")),
    ("mistyped_key", "modle.d_model=32", ("modle", "command line")),
]


def _config_case(key: str, words: tuple[str, ...]):
    def fn(s, c, d, obs):
        p = run(s.train_cmd(d / "ck", key, launcher="python"))
        obs.update(p.obs())
        c.refused(p, *words)
        c.ok("given on the command line" in (p.error_line() or ""), "blamed on the command line, the YAML is fine")
        c.ok(not (d / "ck").exists(), "nothing written")
    return fn


for _n, _kv, _w in CONFIG_CASES:
    case(f"config_{_n}", "5, 7", f"python -m train ... {_kv}",
         f"exit 2, one line 'error: ...' naming {_w[0]}, no traceback, nothing written", fast=True)(_config_case(_kv, _w))


@case("config_yaml_duplicate_key", "5", "a train YAML whose model: section appears twice (YAML keeps the last silently)",
      "exit 2, one error naming the key, both lines and the file; nothing written", fast=True)
def config_yaml_duplicate_key(s, c, d, obs):
    y = d / "dup.yaml"
    text = (ROOT / "configs/train/sample.yaml").read_text()
    y.write_text(text + "model:\n  d_model: 32\n")
    first = 1 + text.splitlines().index("model:")
    args = s.train_args(d / "ck")
    args[args.index("--config") + 1] = str(y)
    p = run([PY, "-m", "train", *args])
    obs.update(p.obs())
    c.refused(p, "'model'", f"lines {first} and {len(text.splitlines()) + 1}", str(y))
    c.ok(not (d / "ck").exists(), "nothing written")


@case("config_yaml_mistyped_key", "5, 7", "a train YAML with a mistyped key (eval_evry: 5)",
      "exit 2, one error naming the key and the YAML file (not the command line)", fast=True)
def config_yaml_mistyped_key(s, c, d, obs):
    y = d / "typo.yaml"
    y.write_text((ROOT / "configs/train/sample.yaml").read_text() + "eval_evry: 5\n")
    args = s.train_args(d / "ck")
    args[args.index("--config") + 1] = str(y)
    p = run([PY, "-m", "train", *args])
    obs.update(p.obs())
    c.refused(p, "eval_evry", f"(in {y})")
    c.ok("command line" not in (p.error_line() or ""), "not blamed on the command line")


@case("config_data_prep_and_inference", "5, 7", "data_prep num_shards=0, inference k=0, run_date=2026-13-45, "
      "run_date=../../etc and an inference key typo, each through python -m",
      "each: exit 2, one error naming the key, no traceback, nothing written", fast=True)
def config_data_prep_and_inference(s, c, d, obs):
    runs = {
        "num_shards=0": (s.prep_cmd(s.raw(), d / "prep", "num_shards=0"), ("num_shards",)),
        "k=0": ([PY, "-m", "inference", "--config", "configs/inference/nightly.yaml", f"output_dir={d / 'recs'}",
                 f"run_date={RUN_DATE}", "k=0"], ("k",)),
        "run_date=2026-13-45": ([PY, "-m", "inference", "--config", "configs/inference/nightly.yaml",
                                 f"output_dir={d / 'recs'}", "run_date=2026-13-45"], ("run_date",)),
        "run_date=../../etc": ([PY, "-m", "inference", "--config", "configs/inference/nightly.yaml",
                                f"output_dir={d / 'recs'}", "run_date=../../etc"], ("run_date",)),
        "exclude_sen=true": ([PY, "-m", "inference", "--config", "configs/inference/nightly.yaml",
                              f"output_dir={d / 'recs'}", f"run_date={RUN_DATE}", "exclude_sen=true"], ("exclude_sen", "command line")),
    }
    obs["runs"] = {}
    for what, (cmd, names) in runs.items():
        p = run(cmd)
        obs["runs"][what] = p.obs()
        sub = Checks()
        sub.refused(p, *names)
        for it in sub.items:
            c.ok(it["ok"], f"{what}: {it['check']}")
    c.ok(not (d / "prep").exists() and not (d / "recs").exists(), "nothing written")


@case("accelerate_launch_user_error", "7", "the documented launch, accelerate launch -m train, with max_steps=-1; "
      "then the same with accelerate launch -q",
      "lmrec's process prints one 'error:' line naming the key, no traceback of its own and exits 2; the launcher "
      "reports exit 1 and, without -q, adds its own CalledProcessError traceback; with -q it adds none")
def accelerate_launch_user_error(s, c, d, obs):
    p = run(s.train_cmd(d / "ck", "max_steps=-1"))
    q = run([ACCELERATE, "launch", "-q", *s.train_cmd(d / "ck", "max_steps=-1")[2:]])
    obs["plain"], obs["quiet"] = p.obs(), q.obs()
    obs["plain"]["worker_exit"] = _worker_exit(p)
    for tag, r in (("plain", p), ("-q", q)):
        c.ok((r.error_line() or "").startswith("error: max_steps must be >= 0"), f"{tag}: lmrec's one error line names the key")
        c.ok("job" not in r.tracebacks(), f"{tag}: no traceback from lmrec's process")
        c.ok(r.rc == 1, f"{tag}: the launcher exits 1 (got {r.rc})")
    c.ok("launcher" in p.tracebacks(), "plain: the launcher adds its own traceback (accelerate's behaviour, recorded)")
    c.ok(not q.tracebacks(), "-q: no traceback at all")


def _worker_exit(p: Proc) -> int | None:
    m = re.search(r"returned non-zero exit status (\d+)", p.err)
    return int(m.group(1)) if m else None


# ================================================================================================ item 6: data_prep
@case("concurrent_data_prep_stalled", "6", "a second data_prep on the same output_dir while the first holds the lock "
      "(the first is stopped with SIGSTOP once it holds it, then resumed)",
      "the second stops at once (exit 2) naming output_dir/.lock and writes nothing; the first completes; one "
      "version published", fast=True)
def concurrent_data_prep_stalled(s, c, d, obs):
    out = d / "prep"
    env = {**ENV}
    first = subprocess.Popen([str(x) for x in s.prep_cmd(s.raw(), out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    try:
        while not flock_held(out / ".lock") and first.poll() is None and time.time() - t0 < 300:
            time.sleep(0.001)
        held = flock_held(out / ".lock")
        os.killpg(first.pid, signal.SIGSTOP)
        c.ok(held, "the first run holds output_dir/.lock")
        listing = sorted(p.name for p in out.iterdir())
        p = run(s.prep_cmd(s.raw(), out))
        obs["second"] = p.obs()
        c.refused(p, f"{out}/.lock")
        c.ok(sorted(p.name for p in out.iterdir()) == listing, "the second wrote nothing")
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    fo, fe = first.communicate(timeout=600)
    obs["first"] = {"exit": first.returncode}
    c.ok(first.returncode == 0, f"the first completes (exit {first.returncode})")
    st = prepared_state(out)
    obs["prepared"] = st
    c.ok(len(st["versions"]) == 1 and st["latest_whole"], "one whole version published, LATEST names it")


@case("concurrent_data_prep_simultaneous", "6", "three data_prep runs started at the same instant on one output_dir",
      "each exits 0 (ran, or found the same inputs already published) or 2 naming the lock; exactly one version "
      "published, whole", fast=True)
def concurrent_data_prep_simultaneous(s, c, d, obs):
    out = d / "prep"
    procs = [subprocess.Popen([str(x) for x in s.prep_cmd(s.raw(), out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    res = [(p.returncode, *p.communicate(timeout=600)) for p in procs]
    res = [(p.returncode, o, e) for p, (_, o, e) in zip(procs, res)]
    obs["exits"] = [r[0] for r in res]
    obs["error_lines"] = [Proc([], r[0], r[1], r[2], 0).error_line() for r in res]
    for rc, o, e in res:
        c.ok(rc == 0 or (rc == 2 and ".lock" in (Proc([], rc, o, e, 0).error_line() or "")), f"exit 0 or 2 naming the lock (got {rc})")
        c.ok("Traceback" not in o + e, "no traceback")
    c.ok(0 in obs["exits"], "at least one ran")
    st = prepared_state(out)
    obs["prepared"] = st
    c.ok(len(st["versions"]) == 1 and st["latest_whole"], "exactly one whole version")


@case("rewritten_input_same_size_mtime", "6", "an events file rewritten with other values, byte size unchanged and its "
      "mtime set back (a cache keyed on size+mtime would reuse the stale result)",
      "the rerun publishes a new version whose data has the new values (nothing reused stale)", fast=True)
def rewritten_input_same_size_mtime(s, c, d, obs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = d / "raw"
    shutil.copytree(s.raw(), raw)
    f = sorted((raw / "events").rglob("*.parquet"))[0]
    t = pq.read_table(f)
    kw = dict(compression="NONE", use_dictionary=False, write_statistics=False)
    pq.write_table(t, f, **kw)
    p1 = run(s.prep_cmd(raw, d / "prep"))
    v1 = (d / "prep" / "LATEST").read_text().strip() if p1.rc == 0 else None
    st0 = f.stat()
    items = t.column("item_id").to_pylist()
    # swap the item ids of the first two rows with different items: same width, same bytes, other data
    j = next(k for k in range(1, len(items)) if items[k] != items[0])
    items[0], items[j] = items[j], items[0]
    t2 = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(items, t.schema.field("item_id").type))
    pq.write_table(t2, f, **kw)
    os.utime(f, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    st1 = f.stat()
    obs["same_size"], obs["same_mtime"] = st1.st_size == st0.st_size, st1.st_mtime_ns == st0.st_mtime_ns
    c.ok(obs["same_size"] and obs["same_mtime"], "control: size and mtime unchanged, content changed")
    time.sleep(1.1)  # version names have one-second resolution
    p2 = run(s.prep_cmd(raw, d / "prep"))
    obs["runs"] = [p1.obs(), p2.obs()]
    c.ok(p1.rc == 0 and p2.rc == 0, "both runs complete")
    v2 = (d / "prep" / "LATEST").read_text().strip()
    obs["versions"] = [v1, v2]
    c.ok(v2 != v1, "a new version was published (not the old one reused)")
    m1 = json.loads((d / "prep" / v1 / "manifest.json").read_text())
    m2 = json.loads((d / "prep" / v2 / "manifest.json").read_text())
    rel = f.relative_to(raw).as_posix()
    obs["reused_files"] = m2["reuse"]["events_files_reused"]
    c.ok(not any(rel in str(x) for x in m2["reuse"]["events_files_reused"]), "the rewritten file was validated again")
    c.ok(m1["vocab"] != m2["vocab"] or _sequences_differ(d / "prep" / v1, d / "prep" / v2), "the new version holds the new data")


def _sequences_differ(a: Path, b: Path) -> bool:
    import datasets

    return datasets.load_from_disk(str(a / "sequences"))["item_idx"] != datasets.load_from_disk(str(b / "sequences"))["item_idx"]


@case("uint64_ids_overflow", "6, 7", "an events file whose user_id column is uint64 with one value 2**63 + 5",
      "exit 2, one error naming the file, the column, the row and the value; nothing published", fast=True)
def uint64_ids_overflow(s, c, d, obs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = d / "raw"
    shutil.copytree(s.raw(), raw)
    f = sorted((raw / "events").rglob("*.parquet"))[1]
    t = pq.read_table(f)
    ids = [int(x) for x in t.column("user_id").to_pylist()]
    ids[3] = 2**63 + 5
    pq.write_table(t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.uint64())), f)
    p = run(s.prep_cmd(raw, d / "prep"))
    obs.update(p.obs())
    c.refused(p, f.name, "user_id", "row 3", str(2**63 + 5))
    c.ok(not (d / "prep" / "LATEST").exists(), "nothing published")


@case("events_day_not_landed", "6, 7", "a nightly data_prep expecting the log's last day (expect_events_through) while "
      "that day's partition is missing, then holds a fifth of its rows, then is whole",
      "missing or partial: exit 3, one error naming the day (and its count), nothing published, LATEST kept; "
      "on_incomplete=keep_previous: exit 0, a warning, LATEST kept; whole: a new version counting the day", fast=True)
def events_day_not_landed(s, c, d, obs):
    import pyarrow.parquet as pq

    raw = d / "raw"
    shutil.copytree(s.raw(), raw)
    last = sorted((raw / "events").glob("dt=*"))[-1]  # the log's last day, moved out: not landed yet
    day = last.name.removeprefix("dt=")
    held = d / "held"
    shutil.move(last, held)
    out = d / "prep"
    first = run(s.prep_cmd(raw, out))
    latest = (out / "LATEST").read_text().strip() if first.rc == 0 else None
    c.ok(first.rc == 0 and latest, "the log without its last day publishes (no day expected)")
    expect = f"expect_events_through={day}"
    missing = run(s.prep_cmd(raw, out, expect))
    c.refused(missing, day, "have not landed", exit_code=3)
    files = sorted(held.rglob("*.parquet"))
    rows = 0
    for f in files:  # a fifth of each file lands: an export still writing
        t = pq.read_table(f)
        rows += t.num_rows
        dst = last / f.relative_to(held)
        dst.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t.slice(0, t.num_rows // 5), dst)
    partial = run(s.prep_cmd(raw, out, expect))
    c.refused(partial, day, "landed in part", exit_code=3)
    kept = run(s.prep_cmd(raw, out, expect, "on_incomplete=keep_previous"))
    c.ok(kept.rc == 0 and "WARNING" in kept.out + kept.err and not kept.tracebacks(), "keep_previous: exit 0 and a warning")
    versions = sorted(v.name for v in out.iterdir() if v.name.startswith("v"))
    c.ok((out / "LATEST").read_text().strip() == latest and versions == [latest], "LATEST and the versions unchanged throughout")
    shutil.rmtree(last)
    shutil.copytree(held, last)
    whole = run(s.prep_cmd(raw, out, expect))
    now = (out / "LATEST").read_text().strip()
    m = json.loads((out / now / "manifest.json").read_text()) if whole.rc == 0 else {}
    got = (m.get("counts") or {}).get("events_by_day", {}).get(day)
    c.ok(whole.rc == 0 and now != latest, "the whole day publishes a new version")
    c.ok(got is not None and 0 < got <= rows and m["counts"]["events_newest_utc"].startswith(day),
         f"its manifest counts the day's usable events ({got} of the {rows} rows)")
    obs.update(day=day, day_rows=rows, day_counted=got, missing=missing.obs(), partial=partial.obs(), keep_previous=kept.obs(),
               whole=whole.obs())


def _string_ids_raw(s: Suite, d: Path) -> tuple[Path, dict]:
    """The synthetic log with user_id as strings, a few ids written ' 42' / '42 ' / '042' (the same users as '42')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = d / "raw"
    shutil.copytree(s.raw(), raw)
    n = {"space": 0, "zero": 0}
    for k, f in enumerate(sorted((raw / "events").rglob("*.parquet"))):
        t = pq.read_table(f)
        ids = [str(x) for x in t.column("user_id").to_pylist()]
        for i in range(len(ids)):
            if i % 17 == 3:
                ids[i] = " " + ids[i] if i % 2 else ids[i] + " "
                n["space"] += 1
            elif i % 17 == 5:
                ids[i] = "0" + ids[i]
                n["zero"] += 1
        pq.write_table(t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.string())), f)
    return raw, n


@case("string_ids_spaces_zeros", "6", "string user ids, some written ' 42', '42 ' or '042' for user '42'",
      "id_normalization exact (default): exit 0, a warning naming a file and row, the manifest counts both kinds; "
      "trim_zeros: the same users as the clean log", fast=True)
def string_ids_spaces_zeros(s, c, d, obs):
    raw, n = _string_ids_raw(s, d)
    obs["injected"] = n
    p = run(s.prep_cmd(raw, d / "exact"))
    q = run(s.prep_cmd(raw, d / "trim", "id_normalization=trim_zeros"))
    ref = json.loads((s.prepared() / (s.prepared() / "LATEST").read_text().strip() / "manifest.json").read_text())
    obs["runs"] = [p.obs(), q.obs()]
    c.ok(p.rc == 0 and q.rc == 0, "both runs complete")
    warn = [ln for ln in (p.out + p.err).splitlines() if "warning" in ln.lower() and ("whitespace" in ln or "zero" in ln)]
    obs["warning"] = _short(warn[0], 300) if warn else None
    c.ok(warn and re.search(r"\.parquet.*row \d+", warn[0]), "exact: a warning names a file and a row")
    me = json.loads((d / "exact" / (d / "exact" / "LATEST").read_text().strip() / "manifest.json").read_text())
    mt = json.loads((d / "trim" / (d / "trim" / "LATEST").read_text().strip() / "manifest.json").read_text())
    ce, ct = me["counts"], mt["counts"]
    obs["counts_exact"] = {k: ce.get(k) for k in ("users", "ids_whitespace_events", "ids_leading_zero_events")}
    obs["counts_trim_zeros"] = {k: ct.get(k) for k in ("users", "ids_whitespace_events", "ids_leading_zero_events")}
    obs["users_clean_log"] = ref["counts"]["users"]
    c.ok(ce.get("ids_whitespace_events") == n["space"], f"exact: ids_whitespace_events = {n['space']} injected")
    c.ok(ce.get("ids_leading_zero_events") == n["zero"], f"exact: ids_leading_zero_events = {n['zero']} injected")
    c.ok(ce["users"] > ref["counts"]["users"], "exact: the changed ids are other users (as documented)")
    c.ok(ct["users"] == ref["counts"]["users"], "trim_zeros: the same users as the clean log")


@case("events_missing_column", "7", "an events file without its item_id column",
      "exit 2, one error naming the file and the column; nothing published", fast=True)
def events_missing_column(s, c, d, obs):
    import pyarrow.parquet as pq

    raw = d / "raw"
    shutil.copytree(s.raw(), raw)
    f = sorted((raw / "events").rglob("*.parquet"))[2]
    pq.write_table(pq.read_table(f).drop_columns(["item_id"]), f)
    p = run(s.prep_cmd(raw, d / "prep"))
    obs.update(p.obs())
    c.refused(p, f.name, "item_id")
    c.ok(not (d / "prep" / "LATEST").exists(), "nothing published")


# ================================================================================================ kill -9
# A watched moment is ``(what, arm)``: ``arm()`` is called just before an attempt starts and returns the condition to poll
# during it (so a condition can compare with the state at the start, e.g. "a run folder that was not there appeared").
Watch = tuple[str, Callable[[], Callable[[], bool]]]


def appears(paths: Callable[[], list]) -> Callable[[], Callable[[], bool]]:
    """A watched condition: a path that was not there when the attempt started (leftovers of the previous attempt, which
    the command itself may remove first, do not count)."""
    def arm():
        had = set(paths())
        return lambda: any(p not in had for p in paths())
    return arm


def _kill_plan(s: Suite, name: str, clean_s: float, watch: list[Watch]) -> list:
    """--kills moments: half uniform over a clean run's duration (seeded), half as soon as a watched condition holds on
    disk (cycling through the watch list), in a seeded random order."""
    rng = random.Random(f"{s.seed}-{name}")
    n_watch = s.kills // 2
    plan = [("watch", watch[i % len(watch)]) for i in range(n_watch)]
    plan += [("random", rng.uniform(0.2, clean_s)) for _ in range(s.kills - n_watch)]
    rng.shuffle(plan)
    return plan


def _killer(kind, arg) -> Callable[[float], str]:
    if kind == "random":
        return lambda el: f"random {arg:.2f}s" if el >= arg else ""
    what, arm = arg
    cond = arm()
    return lambda el: f"when {what}" if cond() else ""


def _moments(attempts: list[dict]) -> dict:
    """How many kills landed at each kind of moment ('random' or the watched condition), and how many ran to the end."""
    out: dict[str, int] = {}
    for a in attempts:
        k = a.get("kill_reason") or "ran to the end"
        k = "random moment" if k.startswith("random") else k
        out[k] = out.get(k, 0) + 1
    return out


@case("kill9_data_prep", "6", "python -m data_prep SIGKILLed (whole process group) at random moments and while it "
      "validates a file, writes its staging folder, or has renamed the version but not yet written LATEST, --kills "
      "times (each attempt changes max_text_tokens 64 <-> 48 so that it prepares a new version, not a reuse), then run "
      "to completion",
      "after every kill LATEST is absent or names a whole version and every visible version folder is whole; the rerun "
      "completes, its data equals a clean run's, and no hidden leftover remains")
def kill9_data_prep(s, c, d, obs):
    out = d / "prep"
    clean = s.prepared()
    ref = json.loads((clean / (clean / "LATEST").read_text().strip() / "manifest.json").read_text())

    def new_version():
        had = set(p.name for p in out.glob("v*"))
        return lambda: any(p.name not in had for p in out.glob("v*")) and (
            not (out / "LATEST").exists() or (out / "LATEST").read_text().strip() in had)
    watch = [("it validates an events file", appears(lambda: list(out.glob("_cache/validated/.tmp-*")))),
             ("its staging folder exists", appears(lambda: list(out.glob(".tmp-v*")))),
             ("the version is renamed into place, LATEST not yet written", new_version)]
    plan = _kill_plan(s, "data_prep", s._built.get("prep_seconds", 4.0), watch)
    attempts, bad = [], []
    for i, (kind, arg) in enumerate(plan):
        p = run(s.prep_cmd(s.raw(), out, f"max_text_tokens={48 if i % 2 else 64}"), kill_when=_killer(kind, arg))
        st = prepared_state(out)
        a = {**p.obs(), "latest": st["latest"], "versions": len(st["versions"]), "leftovers": len(st["leftovers"])}
        attempts.append(a)
        broken = {v: w for v, w in st["versions"].items() if w != "whole"}
        if broken or (st["latest"] is not None and not st["latest_whole"]) or (p.killed_at is None and p.rc != 0):
            bad.append({"attempt": len(attempts), "broken": broken, "latest": st["latest"], "exit": p.rc})
    final = run(s.prep_cmd(s.raw(), out))
    st = prepared_state(out)
    obs.update(kills=sum(a.get("killed_at_s") is not None for a in attempts), moments=_moments(attempts), attempts=attempts,
               rerun=final.obs(), after=st, broken_after_kill=bad)
    c.ok(obs["kills"] > 0, f"{obs['kills']} kills landed")
    c.ok(not bad, "after every kill: LATEST absent or whole, every visible version whole")
    c.ok(final.rc == 0 and st["latest_whole"], "the rerun completes and LATEST names a whole version")
    man = json.loads((out / st["latest"] / "manifest.json").read_text())
    c.ok(man["vocab"] == ref["vocab"] and {k: man["counts"][k] for k in ("users", "items", "events_kept")} ==
         {k: ref["counts"][k] for k in ("users", "items", "events_kept")}, "the data equals a clean run's")
    c.ok(not st["leftovers"], f"no hidden leftovers after the rerun ({st['leftovers']})")


@case("kill9_train", "4", "accelerate launch -m train SIGKILLed (whole process group) at random moments and while it "
      "saves a checkpoint, writes best/ or exports final/, --kills times, each attempt relaunching the same command "
      "(a fresh run once one finished), then relaunched to completion",
      "after every kill each step_N/ with COMPLETE is whole and final/ is absent or whole; the last relaunch completes, "
      "losses 1..6 once each, and final/ equals an uninterrupted run's weights bit for bit")
def kill9_train(s, c, d, obs):
    ref = s.trained()
    rd = d / "ck" / "base"

    def saving():
        had = {p.name for p in rd.glob("step_*")}  # a leftover of a killed save is not a save in progress
        return lambda: any(p.name not in had and not (p / "COMPLETE").exists() for p in rd.glob("step_*"))
    watch = [("a checkpoint is being saved", saving),
             ("best/ is being written", appears(lambda: list(rd.glob("best/.tmp-*")))),
             ("final/ is being exported", appears(lambda: list(rd.glob(".tmp-final-*"))))]
    plan = _kill_plan(s, "train", s._built.get("train_seconds", 10.0), watch)
    attempts, bad = [], []
    for kind, arg in plan:
        if (rd / "final").is_dir():  # the previous attempt finished the run: start it again from scratch
            left = sorted(p.relative_to(rd).as_posix() for p in rd.rglob(".*"))
            if left:  # what the killed launches before it left must be gone once it finished
                bad.append({"attempt": len(attempts), "leftovers_after_finish": left})
            shutil.rmtree(d / "ck")
        p = run(s.train_cmd(d / "ck"), kill_when=_killer(kind, arg))
        ck = {x.name: checkpoint_whole(x) for x in rd.glob("step_*") if (x / "COMPLETE").exists()} if rd.is_dir() else {}
        fin = final_whole(rd / "final") if (rd / "final").exists() else "absent"
        attempts.append({**p.obs(), "checkpoints": sorted(ck), "final": "whole" if fin is None else fin,
                         "resumed_from": _resumed_from(p)})
        if any(v is not None for v in ck.values()) or fin not in (None, "absent") or (p.killed_at is None and p.rc != 0):
            bad.append({"attempt": len(attempts), "checkpoints": ck, "final": fin, "exit": p.rc,
                        "tail": p.tail(800) if p.killed_at is None else None})
    if (rd / "final").is_dir():
        shutil.rmtree(d / "ck")
        last = run(s.train_cmd(d / "ck", "stop_after_steps=3"))  # one pre-emption at least, so the rerun resumes
        attempts.append({**last.obs(), "note": "pre-empted after step 3 (the kills had let the run finish)"})
    final = run(s.train_cmd(d / "ck"))
    obs.update(kills=sum(a.get("killed_at_s") is not None for a in attempts), moments=_moments(attempts),
               resumed=sum(1 for a in attempts if a.get("resumed_from")), attempts=attempts, rerun=final.obs(),
               rerun_resumed_from=_resumed_from(final), broken_after_kill=bad)
    c.ok(obs["kills"] > 0, f"{obs['kills']} kills landed")
    c.ok(not bad, "after every kill: checkpoints with COMPLETE whole, final/ absent or whole")
    c.ok(final.rc == 0 and final_whole(rd / "final") is None, "the relaunch completes with a whole final/")
    c.ok(losses_steps(rd) == list(range(1, BASE_STEPS + 1)), f"losses.jsonl holds steps 1..{BASE_STEPS} once each")
    left = sorted(p.relative_to(rd).as_posix() for p in rd.rglob(".*"))
    obs["leftovers_after"] = left
    c.ok(not left, f"no hidden leftovers after the relaunch ({left})")
    same = sha256(rd / "final" / "model.safetensors") == sha256(ref / "final" / "model.safetensors") if (rd / "final").is_dir() else False
    obs["final_equals_uninterrupted"] = same
    c.ok(same, "final/model.safetensors equals the uninterrupted run's (resume is exact)")


@case("kill9_inference", "2", "accelerate launch -m inference SIGKILLed (whole process group) at random moments and "
      "while it stages its part files, between placing its run folder and moving the link, and while the new link "
      "waits beside the old one, --kills times, then run to completion",
      "after every kill recs/dt=D is a whole table (the previous one, or the new one once the link moved); the rerun "
      "completes; no staging folder or stray link after it")
def kill9_inference(s, c, d, obs):
    recs = s.copy_recs(d)
    fin = s.trained() / "final"
    runs_dir = recs / "_runs" / NAME

    def placed():
        had = {p.name for p in runs_dir.iterdir()}
        return lambda: any(p.name not in had and os.path.basename(os.readlink(recs / NAME)) != p.name
                           for p in runs_dir.iterdir())
    watch = [("the staging folder exists", appears(lambda: list(recs.glob(".stage-*")))),
             ("a run folder is placed, the link not yet moved", placed),
             ("the new link waits beside the old one", appears(lambda: list(recs.glob(f".tmp-{NAME}*"))))]
    plan = _kill_plan(s, "inference", s._built.get("infer_seconds", 7.0), watch)
    attempts, bad = [], []
    for kind, arg in plan:
        p = run(s.infer_cmd(fin, recs), kill_when=_killer(kind, arg))
        st = table_state(recs)
        attempts.append({**p.obs(), "whole": st["whole"], "run_id": st.get("run_id"), "run_folders": len(st["run_folders"]),
                         "leftovers": len(st["leftovers"])})
        if not st["whole"] or (p.killed_at is None and p.rc != 0):
            bad.append({"attempt": len(attempts), "table": st, "exit": p.rc})
    final = run(s.infer_cmd(fin, recs))
    st = table_state(recs)
    obs.update(kills=sum(a.get("killed_at_s") is not None for a in attempts), moments=_moments(attempts), attempts=attempts,
               rerun=final.obs(), after={k: st[k] for k in ("whole", "rows", "leftovers")},
               run_folders_after=len(st["run_folders"]), broken_after_kill=bad)
    c.ok(obs["kills"] > 0, f"{obs['kills']} kills landed")
    c.ok(not bad, "after every kill: the table at recs/dt=D is whole")
    c.ok(final.rc == 0 and st["whole"] and st["rows"] == 60 * K, "the rerun completes with a whole table")
    c.ok(not st["leftovers"], "no staging folder or stray link after the rerun")


# ================================================================================================ item 8: the promotion gate
# The serving link d/serving names the incumbent (the shared 6-step run's final/), and tonight's candidate is a copy of
# the 60-step run's final/ at d/ck/nightly/final: a whole candidate is promoted (it beats most-popular and the incumbent).
def _gate_setup(s: Suite, d: Path, incumbent: Path | None = None) -> tuple[Path, Path, Path]:
    inc = incumbent or s.trained() / "final"
    cand = d / "ck" / "nightly" / "final"
    shutil.copytree(s.gate_final(), cand)
    link = d / "serving"
    os.symlink(inc.resolve(), link)
    return link, inc.resolve(), cand.resolve()


def link_state(link: Path) -> dict:
    """Where the serving link resolves, whether that is a whole final/ (hashes checked here), and stray new links."""
    target = os.path.realpath(link) if os.path.islink(link) else None
    return {"target": target, "whole": final_whole(Path(target)) is None if target else False,
            "leftovers": sorted(p.name for p in link.parent.iterdir() if p.name.startswith(f".tmp-{link.name}-"))}


def _gate_report(cand: Path) -> dict:
    try:
        return json.loads((cand.parent / "gate.json").read_text())
    except (OSError, ValueError):
        return {}


def _gate_unusable_candidate(s: Suite, c: Checks, obs: dict, link: Path, inc: Path, cand: Path, why: str,
                             *names: str) -> None:
    """As the chain runs it (keep_incumbent): exit 0, kept_incumbent with ``why`` in a reason, the link names the whole
    incumbent. By hand (the default): one error line naming ``names``, exit 2, the link unchanged."""
    p = run(s.gate_cmd(link, cand, "gate.unusable_candidate=keep_incumbent"))
    rep, st = _gate_report(cand), link_state(link)
    obs.update(chain=p.obs(), decision=rep.get("decision"), reasons=rep.get("reasons"), link=st)
    c.ok(p.rc == 0 and rep.get("decision") == "kept_incumbent", f"kept the incumbent, exit 0 (exit {p.rc})")
    c.ok(any(why in r for r in rep.get("reasons") or []), f"the report's reason says {why!r}")
    c.ok(st["target"] == str(inc) and st["whole"], "the link names the whole incumbent")
    c.ok("job" not in p.tracebacks(), "no traceback from lmrec's process")
    p = run(s.gate_cmd(link, cand))
    obs["by_hand"] = p.obs()
    c.refused(p, *names)
    c.ok(link_state(link)["target"] == str(inc), "the link unchanged")


@case("gate_candidate_training_failed", "8, 7", "tonight's fine-tune failed: its run folder holds checkpoints but no "
      "final/; the gate runs as the nightly chain runs it (gate.unusable_candidate=keep_incumbent), then as a user "
      "would by hand (the default)",
      "chain: exit 0, decision kept_incumbent naming the missing export, the link unchanged and whole; by hand: exit 2, "
      "one error line naming the candidate, the link unchanged")
def gate_candidate_training_failed(s, c, d, obs):
    link, inc, _ = _gate_setup(s, d)
    failed = d / "ck" / "failed" / "final"
    shutil.copytree(s.trained() / "step_2", failed.parent / "step_2")
    _gate_unusable_candidate(s, c, obs, link, inc, failed, "export.json missing", str(failed), "export.json missing")


@case("gate_candidate_damaged", "8, 3", "tonight's final/ has one bit flipped in model.safetensors (size kept)",
      "keep_incumbent: exit 0, kept_incumbent, the reason names model.safetensors, the link names the whole incumbent; "
      "default: exit 2 naming model.safetensors")
def gate_candidate_damaged(s, c, d, obs):
    link, inc, cand = _gate_setup(s, d)
    flip_byte(cand / "model.safetensors")
    _gate_unusable_candidate(s, c, obs, link, inc, cand, "model.safetensors", "model.safetensors", "sha256 differs")


@case("gate_incumbent_damaged", "8, 3", "the final/ the serving link names has one bit flipped in model.safetensors; "
      "then the link is left dangling (its target removed)",
      "the incumbent is left out (the report says why) and the whole candidate is promoted over most-popular: exit 0, "
      "the link moves to it, both times")
def gate_incumbent_damaged(s, c, d, obs):
    inc = d / "incumbent" / "final"
    shutil.copytree(s.trained() / "final", inc)
    flip_byte(inc / "model.safetensors")
    link, _, cand = _gate_setup(s, d, inc)
    p = run(s.gate_cmd(link, cand))
    rep, st = _gate_report(cand), link_state(link)
    obs.update(damaged=p.obs(), decision=rep.get("decision"), incumbent=rep.get("incumbent"), link=st)
    c.ok(p.rc == 0 and rep.get("decision") == "promoted", f"promoted, exit 0 (exit {p.rc})")
    c.ok("model.safetensors" in str((rep.get("incumbent") or {}).get("unusable")), "the report names the incumbent's damage")
    c.ok(st["target"] == str(cand) and st["whole"], "the link names the whole candidate")
    os.remove(link)
    os.symlink(d / "gone", link)
    (cand.parent / "gate.json").unlink()
    p = run(s.gate_cmd(link, cand))
    rep, st = _gate_report(cand), link_state(link)
    obs.update(dangling=p.obs(), decision_dangling=rep.get("decision"))
    c.ok(p.rc == 0 and rep.get("decision") == "promoted" and st["target"] == str(cand), "a dangling link: promoted")


@case("concurrent_gates", "8", "a second gate on the same serving link while the first holds its lock (the first is "
      "stopped with SIGSTOP once it holds .serving.gate.lock, then resumed)",
      "the second stops at once with one error naming the lock and moves nothing; the first completes and promotes")
def concurrent_gates(s, c, d, obs):
    link, inc, cand = _gate_setup(s, d)
    lock = link.parent / f".{link.name}.gate.lock"

    def second(held: bool) -> None:
        c.ok(held, "the first gate holds the link's lock")
        p = run(s.gate_cmd(link, cand))
        obs["second"] = p.obs()
        c.refused(p, str(lock))
        c.ok(link_state(link)["target"] == str(inc), "the second moved nothing")
    rc = _while_first_holds(s.gate_cmd(link, cand), lock, second)
    st = link_state(link)
    obs.update(first={"exit": rc}, link=st)
    c.ok(rc == 0 and st["target"] == str(cand) and st["whole"], "the first completes and promotes")


@case("kill9_gate", "8", "python -m inference.gate SIGKILLed (whole process group) at random moments and once it holds "
      "the serving link's lock, --kills times, and twice by itself after writing its report and before moving the link "
      "(each attempt starts from the incumbent serving), then run to completion",
      "after every kill the serving link names a whole final/ (the incumbent, or the candidate once it moved); the rerun "
      "promotes, its report says so, and no stray link remains")
def kill9_gate(s, c, d, obs):
    link, inc, cand = _gate_setup(s, d)
    lock = link.parent / f".{link.name}.gate.lock"

    def locked():
        return lambda: flock_held(lock)
    # the report-to-link window is microseconds wide, too narrow to hit from outside: two more attempts kill the gate
    # there from inside (LMREC_TEST_KILL_AT=gate_before_link: the process SIGKILLs itself at that point)
    watch = [("it holds the link's lock (loading data and models)", locked)]
    clean = run(s.gate_cmd(link, cand))
    if clean.rc != 0:
        raise RuntimeError(f"a clean gate failed\n{clean.tail()}")
    plan = _kill_plan(s, "gate", clean.seconds, watch) + [("planted", "gate_before_link")] * 2
    attempts, bad = [], []
    for kind, arg in plan:
        point_back = d / f".reset-{link.name}"  # the harness puts the incumbent back: every attempt decides afresh
        os.symlink(inc, point_back)
        os.replace(point_back, link)
        if kind == "planted":
            p = run(s.gate_cmd(link, cand), env={"LMREC_TEST_KILL_AT": arg})
            p.killed_at, p.kill_reason = (p.seconds, "after the report, before the link moves") if p.rc == -9 else (None, "")
        else:
            p = run(s.gate_cmd(link, cand), kill_when=_killer(kind, arg))
        st = link_state(link)
        attempts.append({**p.obs(), "link": "candidate" if st["target"] == str(cand) else
                         "incumbent" if st["target"] == str(inc) else st["target"], "whole": st["whole"],
                         "leftovers": len(st["leftovers"])})
        if st["target"] not in (str(inc), str(cand)) or not st["whole"] or (p.killed_at is None and p.rc != 0):
            bad.append({"attempt": len(attempts), "link": st, "exit": p.rc})
    os.symlink(inc, d / f".reset-{link.name}")
    os.replace(d / f".reset-{link.name}", link)
    final = run(s.gate_cmd(link, cand))
    st, rep = link_state(link), _gate_report(cand)
    obs.update(kills=sum(a.get("killed_at_s") is not None for a in attempts), moments=_moments(attempts), attempts=attempts,
               rerun=final.obs(), after=st, broken_after_kill=bad)
    c.ok(obs["kills"] > 0, f"{obs['kills']} kills landed")
    c.ok(not bad, "after every kill: the link names the whole incumbent or the whole candidate")
    c.ok(final.rc == 0 and st["target"] == str(cand) and st["whole"] and rep.get("decision") == "promoted"
         and rep.get("serving_before") == str(inc), "the rerun promotes and its report says so")
    c.ok(not st["leftovers"], "no stray link beside the serving link after the rerun")



def _check_cmd(s: Suite, recs: Path, prepared: Path, date: str, *extra: str) -> list:
    """The morning check of ``recs/dt=<date>`` with the table's settings (infer_cmd's K, the nightly config)."""
    return [PY, "-m", "inference.check", "--config", "configs/inference/nightly.yaml", f"prepared_dir={prepared}",
            f"output_dir={recs}", f"run_date={date}", f"k={K}", *extra]


def _check_report(recs: Path, date: str) -> dict:
    try:
        return json.loads((recs / "_checks" / f"dt={date}.json").read_text())
    except (OSError, ValueError):
        return {}


@case("table_unlike_last_night", "9", "tables that are whole and pass every structural check, but unlike last night's: "
      "one made from a data_prep that read a single day's partition of the log (events_path set one level too deep), "
      "one from a model trained one step; a control: the same model as last night again",
      "the morning check exits 1 on each, its problems 'content' only, naming the rule (users kept; top-10 overlap "
      "beyond chance), no traceback; the control passes (exit 0) with its comparison in the report")
def table_unlike_last_night(s, c, d, obs):
    prev_date = (_dt.date.fromisoformat(RUN_DATE) - _dt.timedelta(days=1)).isoformat()
    model = s.gate_final()  # last night's model (60 steps: better than most-popular)
    recs = d / "recs"
    first = run(s.infer_cmd(model, recs, f"run_date={prev_date}"))
    chk = run(_check_cmd(s, recs, s.prepared(), prev_date))
    c.ok(first.rc == 0 and chk.rc == 0 and _check_report(recs, prev_date).get("previous", 0) is None,
         "last night's table passes, with nothing before it to compare")
    last_day = sorted((s.raw() / "events").glob("dt=*"))[-1]
    one_day = d / "prepared_one_day"
    prep = run(s.prep_cmd(s.raw(), one_day, f"events_path={last_day}"))
    # tonight, three ways: a data_prep that read one day of the log; a model that learned nothing; the control
    untrained = run([PY, "-m", "train", *s.train_args(d / "ck", "untrained", "max_steps=1", "eval_every=1", "save_every=1")])
    nights = {"one_day_of_log": (model, one_day), "model_trained_one_step": (d / "ck" / "untrained" / "final", s.prepared()),
              "same_model_again": (model, s.prepared())}
    obs.update(last_night=first.obs(), last_night_check=chk.obs(), one_day_prep=prep.obs(), untrained_train=untrained.obs())
    c.ok(prep.rc == 0 and untrained.rc == 0, "the one-day data_prep and the one-step training ran")
    for name, (final, prepared) in nights.items():
        table = run(s.infer_cmd(final, recs, f"prepared_dir={prepared}"))
        chk = run(_check_cmd(s, recs, prepared, RUN_DATE))
        rep = _check_report(recs, RUN_DATE)
        probs = rep.get("problems") or []
        obs[name] = dict(table=table.obs(), check=chk.obs(), problems=[p["what"] for p in probs],
                         content=rep.get("content"), previous=rep.get("previous"))
        c.ok(table.rc == 0, f"{name}: the table is published (exit {table.rc})")
        c.ok("job" not in chk.tracebacks(), f"{name}: no traceback from the check")
        if name == "same_model_again":
            c.ok(chk.rc == 0 and rep.get("ok") and (rep.get("previous") or {}).get("compared"),
                 f"{name}: the check passes, its comparison in the report (exit {chk.rc})")
            continue
        want = "of the" if name == "one_day_of_log" else "beyond the"
        c.ok(chk.rc == 1 and probs and {p["check"] for p in probs} == {"content"} and any(want in p["what"] for p in probs),
             f"{name}: the check exits 1 (exit {chk.rc}), its problems all 'content', one naming {want!r}: "
             + "; ".join(p["what"][:90] for p in probs))


# ================================================================================================ main
def machine() -> str:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu or 'unknown CPU'}), {platform.system()} {platform.release()}"


def table(results: list[dict]) -> str:
    rows = [("case", "item", "exit", "tb", "first error line / note", "result")]
    for r in results:
        o = r["observed"]
        ex = o.get("exit")
        if ex is None and "runs" in o and isinstance(o["runs"], list):
            ex = ",".join(str(x.get("exit")) for x in o["runs"])
        elif ex is None and "runs" in o:
            ex = ",".join(str(x.get("exit")) for x in o["runs"].values())
        elif ex is None and "rerun" in o:
            ex = f"{o.get('kills')}k/{o['rerun'].get('exit')}"
        elif ex is None and "second" in o:
            ex = f"{o['first'].get('exit')},{o['second'].get('exit')}"
        elif ex is None and "exits" in o:
            ex = ",".join(map(str, o["exits"]))
        elif ex is None and "plain" in o:
            ex = f"{o['plain']['exit']},{o['quiet']['exit']}"
        tb = o.get("traceback") or (o.get("plain") or {}).get("traceback") or (o.get("second") or {}).get("traceback")
        note = (o.get("error_line") or (o.get("second") or {}).get("error_line") or o.get("warning")
                or (o.get("refused") or [None])[0] or (o.get("warnings") or [None])[0] or "")
        if "kills" in o:
            note = (f"{o['kills']} kills, {len(o.get('broken_after_kill') or [])} left a broken output; rerun exit "
                    f"{o['rerun'].get('exit')}")
        elif "runs" in o and isinstance(o["runs"], dict):
            note = next(iter(o["runs"].values())).get("error_line") or ""
        elif "summary" in o and isinstance(o["summary"], dict) and "runs" in o["summary"]:
            sm = o["summary"]["runs"]
            note = f"{sm['reruns']} reruns, {sum(sm['reads'].values())} reads, failures 0" if not any(
                v for f in sm["failures"].values() for v in f.values()) else "failures, see JSON"
        note = re.sub(r"/\S*/cases/[^/]+/", ".../", str(note))  # the case folder, not the machine's tmp path
        if r.get("error"):
            note = "HARNESS ERROR: " + r["error"]
        rows.append((r["name"], r["item"], str(ex), ",".join(tb) if tb else "-", _short(str(note), 70) or "",
                     "pass" if r["passed"] else "FAIL"))
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(x[i].ljust(w[i]) for i in range(len(x))) for x in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--only", action="append", default=[], help="case names (comma-separated; may repeat)")
    ap.add_argument("--fast", action="store_true", help="only the fast cases (no training run needed)")
    ap.add_argument("--work", help="working folder (default: a temporary folder, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--out", help="report path (default docs/results/fault_suite.json for a full run, else <work>/fault_suite.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    ap.add_argument("--kills", type=int, default=8, help="kill -9 moments per kill case")
    a = ap.parse_args(argv)

    if a.list:
        for cs in CASES.values():
            print(f"{cs.name}  [item {cs.item}{', fast' if cs.fast else ''}]\n    fault:    {cs.fault}\n    expected: {cs.expected}")
        print(f"{len(CASES)} cases ({sum(cs.fast for cs in CASES.values())} fast)")
        return 0
    names = [n for o in a.only for n in o.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; see --list")
    selected = [CASES[n] for n in names] if names else [cs for cs in CASES.values() if cs.fast or not a.fast]
    full = not names and not a.fast
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fault_suite-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else (ROOT / "docs" / "results" / "fault_suite.json" if full else work / "fault_suite.json")
    s = Suite(work, a.seed, a.kills)
    t_start = time.time()
    results = []
    try:
        for cs in selected:
            d = s.case_dir(cs.name)
            c, obs = Checks(), {}
            t = time.time()
            print(f"[fault_suite] {cs.name} ...", flush=True)
            err = None
            try:
                cs.fn(s, c, d, obs)
            except Exception as e:  # noqa: BLE001 - a harness failure fails the case, the suite goes on
                import traceback

                err = f"{type(e).__name__}: {_short(str(e), 300)}"
                obs["harness_traceback"] = traceback.format_exc()[-3000:]
            r = {"name": cs.name, "item": cs.item, "fault": cs.fault, "expected": cs.expected, "observed": obs,
                 "checks": c.items, "passed": c.passed and err is None, "seconds": round(time.time() - t, 1)}
            if err:
                r["error"] = err
            results.append(r)
            failed = [x["check"] for x in c.items if not x["ok"]]
            print(f"[fault_suite] {cs.name}: {'pass' if r['passed'] else 'FAIL'} in {r['seconds']}s"
                  + (f" (failed: {failed})" if failed else "") + (f" ({err})" if err else ""), flush=True)
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    n_pass = sum(r["passed"] for r in results)
    kills = {r["name"]: r["observed"].get("kills") for r in results if r["name"].startswith("kill9_")}
    report = {
        "bench": "fault_suite", "issue": 29,
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "python": platform.python_version(), "git_commit": git_commit(),
        "seed": a.seed, "kills_per_case": a.kills, "seconds": round(time.time() - t_start, 1),
        "fixtures": s.fixture_log,
        "summary": {"cases": len(results), "passed": n_pass, "failed": [r["name"] for r in results if not r["passed"]],
                    "kills_landed": kills,
                    "by_item": {it: f"{sum(r['passed'] for r in results if it in r['item'].split(', '))}/"
                                    f"{sum(1 for r in results if it in r['item'].split(', '))}"
                                for it in sorted({i for r in results for i in r["item"].split(", ")}, key=int)}},
        "cases": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table(results))
    print(f"[fault_suite] {n_pass}/{len(results)} cases pass in {time.time() - t_start:.0f}s; report {out}")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
