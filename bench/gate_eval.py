"""What the promotion gate (inference/gate.py) decides on real models: one incumbent, several candidates, each judged on
the same prepared data as a nightly run would judge it, into one JSON of aggregates.

    python bench/gate_eval.py --prepared bench/out/quality/amazon2014-toy/prepared \\
        --incumbent bench/out/quality/amazon2014-toy/runs-w384hybrid/hybrid_s0/final \\
        --candidate "hybrid, another seed=bench/out/quality/amazon2014-toy/runs-w384hybrid/hybrid_s1/final" \\
        --candidate "ids only=bench/out/quality/amazon2014-toy/runs-r6/id_s0/final" \\
        --out docs/results/gate_amazon2014-toy.json

Each candidate gets a fresh serving link to the incumbent in a scratch folder (the real link is never touched) and
one run_gate call with configs/inference/nightly.yaml's settings (the text feature cache in a scratch folder shared
by the candidates, as a nightly's is; ``--set key=value`` for others, e.g. --set gate.max_users=0). Written: per candidate the decision, reasons, the three models' figures, the
paired candidate - incumbent difference and the gate's wall time; machine, versions, date and command. Aggregates
only (safe for licensed data).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, help="tonight's prepared data (a root with LATEST or a version folder)")
    ap.add_argument("--incumbent", required=True, help="the final/ that serves now")
    ap.add_argument("--candidate", action="append", required=True, metavar="NAME=FINAL",
                    help="a candidate final/ and the name the report gives it (repeat)")
    ap.add_argument("--config", default=str(ROOT / "configs/inference/nightly.yaml"), help="the inference config to score as")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="inference/gate overrides")
    ap.add_argument("--out", required=True, help="the JSON to write")
    a = ap.parse_args(argv)

    from inference.config import InferenceConfig
    from inference.gate import GateRefused, run_gate
    from lmrec_common.config import load_config
    import quality  # bench/quality.py: machine()

    rows = []
    cache = tempfile.TemporaryDirectory(prefix="gate_eval-cache-")  # text features shared by the candidates, as a
    # nightly's text_feature_cache is (a frozen encoder's features are computed once, whichever model asks)
    for spec in a.candidate:
        if "=" not in spec:
            raise SystemExit(f"[gate_eval] --candidate {spec!r}: expected NAME=FINAL")
        name, final = spec.split("=", 1)
        with tempfile.TemporaryDirectory(prefix="gate_eval-") as tmp:
            link = Path(tmp) / "serving"
            os.symlink(Path(a.incumbent).resolve(), link)
            cfg = load_config(InferenceConfig, a.config, [f"prepared_dir={a.prepared}", f"model_dir={link}", f"text_feature_cache={cache.name}",
                                                          f"gate.candidate={final}", f"gate.report={Path(tmp) / 'gate.json'}",
                                                          *a.set])
            t0 = time.perf_counter()
            try:
                rep = run_gate(cfg)
            except GateRefused:
                rep = json.loads((Path(tmp) / "gate.json").read_text())
            wall = time.perf_counter() - t0
        keep = ("decision", "reasons", "split", "metric", "rule", "paired_vs_incumbent", "paired_vs_popular", "note")
        row = {"name": name, "wall_s": round(wall, 2), **{k: rep.get(k) for k in keep if k in rep}}
        for role in ("candidate", "incumbent", "most_popular"):
            if role in rep:
                r = rep[role]
                row[role] = {k: r.get(k) for k in ("model_version", "item_tower", "users_fallback", "seconds", "metrics", "beyond")
                             if k in r}
        row["candidate"]["path"] = final
        rows.append(row)
        d = row.get("paired_vs_incumbent") or {}
        print(f"[gate_eval] {name}: {row['decision']} | candidate {row['candidate']['metrics'][rep['metric']]:.4f} vs incumbent "
              f"{row['incumbent']['metrics'][rep['metric']]:.4f} | paired {d.get('mean', float('nan')):+.4f} "
              f"[{d.get('ci95', [float('nan')] * 2)[0]:+.4f}, {d.get('ci95', [float('nan')] * 2)[1]:+.4f}] | coverage@10 "
              f"{row['candidate']['beyond']['coverage@10']:.3f} vs {row['incumbent']['beyond']['coverage@10']:.3f} | {wall:.1f} s",
              flush=True)
    out = {
        "what": "promotion gate decisions: one incumbent, each candidate judged on the same users (bench/gate_eval.py)",
        "command": "python bench/gate_eval.py " + " ".join(
            f"'{x}'" if " " in x else x for x in (argv if argv is not None else sys.argv[1:])),
        "date": _dt.date.today().isoformat(),
        "machine": quality.machine(),
        "incumbent": a.incumbent,
        "prepared": a.prepared,
        "rows": rows,
    }
    cache.cleanup()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"[gate_eval] wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
