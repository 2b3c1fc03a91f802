"""The online service (issue 32) as a real server process, spoken to by a real HTTP client.

    python -m pytest tests/test_serve.py -q          # ~30-60 s on 2 busy cores

The bundled sample's generator (data_prep.synthetic, small and with its dirt: users whose only events are on items
missing from the catalogue get fallback rows) goes through the real data_prep; an untrained tiny hybrid model
is exported on its catalogue; the nightly job writes tonight's table; then ``python -m inference.serve`` follows it:
- consistency: every user of the table, asked with their prepared history, gets exactly the table's items in the
  same order (scores within float tolerance), model and fallback rows alike;
- bad input gets a 4xx naming the field (never a crash), unknown items are counted;
- search: w = 1 ranks as /v1/recommend, w = 0 ignores the history; a query equal to an item's text encodes to that
  item's text vector (in-process);
- /healthz, /v1/model, /metrics;
- a newer table with another model is picked up while requests keep flowing: none fails, and the answers move from
  the old model to the new one; in model_dir + prepared_dir mode, a new final/ exported to the served path is
  picked up the same way, and SIGHUP (with an hour's reload_poll_s) makes the service look at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from fixtures_prepared import write_tiny_text_model  # noqa: E402
from inference.config import CheckConfig, InferenceConfig  # noqa: E402
from inference.serve.config import SHARED_WITH_INFERENCE, ServeConfig  # noqa: E402
from lmrec_common.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATE, DATE2 = "2026-11-27", "2026-11-28"
K = 10
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _export(prep, tiny: Path, dest: Path, seed: int, **model) -> Path:
    from train.export import export_final
    from train.model import RecModelConfig, SeqRecModel

    torch.manual_seed(seed)
    mcfg = RecModelConfig(num_items=len(prep.items), num_event_types=len(prep.event_types), item_tower="hybrid",
                          text_model_path=str(tiny), d_model=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0, **model)
    export_final(dest, SeqRecModel(mcfg, text_model_path=str(tiny)).state_dict(), mcfg, tiny, {"test": True},
                 prep.manifest, {}, item_ids=prep.items["item_id"])
    return dest


def _nightly(final: Path, prepared: Path, recs: Path, date: str) -> Path:
    from inference.run import run

    return run(InferenceConfig(model_dir=str(final), prepared_dir=str(prepared), output_dir=str(recs), run_date=date, k=K,
                               user_batch_size=16, num_threads=1))


def _extra_users(path: Path) -> None:
    """Users the nightly table serves without the model: three whose only events are on items missing from the
    catalogue (fallback rows) and two with a single event (served from it, never trained on)."""
    import pyarrow as pa

    rows = [(9000 + u, 99_999 - j, j) for u in range(3) for j in range(2)] + [(9100 + u, 5 + u, 0) for u in range(2)]
    import datetime as dt

    t0 = int(dt.datetime(2026, 10, 5, 12, tzinfo=dt.timezone.utc).timestamp() * 1000)  # inside the log's window
    pq.write_table(pa.table({"user_id": pa.array([r[0] for r in rows], pa.int64()),
                             "item_id": pa.array([r[1] for r in rows], pa.int64()),
                             "timestamp": pa.array([t0 + 60_000 * r[2] for r in rows], pa.timestamp("ms", tz="UTC")),
                             "event_type": ["view"] * len(rows), "value": pa.array([1.0] * len(rows), pa.float64())}), path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_prep.config import DataPrepConfig
    from data_prep.pipeline import run as prep_run
    from data_prep.schema import load_prepared
    from data_prep.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("serve")
    generate(root / "raw", SyntheticConfig(n_users=120, n_items=80, n_events=2400, n_topics=8, n_days=10,
                                           max_user_events=30, dirty=True, dirty_frac=0.01))
    _extra_users(root / "raw" / "events" / "dt=2026-10-05" / "part-extra.parquet")
    prepared = prep_run(load_config(DataPrepConfig, ROOT / "configs/data_prep/sample.yaml", [
        f"events_path={root / 'raw/events'}", f"items_path={root / 'raw/items'}", f"output_dir={root / 'prepared'}",
        "num_shards=2", "num_proc=1"]))
    prep = load_prepared(prepared)
    tiny = write_tiny_text_model(root / "tiny_bert")
    final_a = _export(prep, tiny, root / "final_a", seed=0)
    final_b = _export(prep, tiny, root / "final_b", seed=1)
    recs = root / "recs"
    table = _nightly(final_a, prepared, recs, DATE)
    return dict(root=root, prepared=prepared, prep=prep, final_a=final_a, final_b=final_b, recs=recs, table=table)


@contextlib.contextmanager
def _serving(log_path: Path, *args: str):
    """``python -m inference.serve <args> port=<free>`` as a process, up once /healthz answers; SIGTERM at the end."""
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "inference.serve", *args, f"port={port}"], cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=30)
    try:
        t0 = time.time()
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() - t0 > 300:  # a loaded 2-core machine: imports alone take a while
                log.flush()
                raise AssertionError(f"server did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield dict(proc=proc, client=client, base=base, log=log_path)
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(world):
    with _serving(world["root"] / "server.log", "--config", "configs/serve/sample.yaml", f"follow_recs={world['recs']}",
                  "text_feature_cache=", "reload_poll_s=0.5", "max_body_bytes=8192", "max_k=200",
                  "max_history_items=500", "default_event_type=") as srv:
        yield srv


class _Hammer:
    """Client threads sending the same /v1/recommend request until stopped; ``results``: (status, body or error)."""

    def __init__(self, base: str, body: dict, n: int = 2):
        self.base, self.body, self.results, self.stop = base, body, [], threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self):
        with httpx.Client(base_url=self.base, timeout=30) as cl:
            while not self.stop.is_set():
                try:
                    r = cl.post("/v1/recommend", json=self.body)
                    self.results.append((r.status_code, r.json()))
                except Exception as e:  # a dropped connection would land here
                    self.results.append((0, repr(e)))

    def join(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.results


def _version(final: Path) -> str:
    return json.loads((final / "export.json").read_text())["model_version"]


def _wait_for_version(client, version: str, timeout: float) -> float:
    """Poll /v1/model until it serves ``version`` (or ``timeout`` s pass); the seconds it took."""
    t0 = time.time()
    while client.get("/v1/model").json()["model_version"] != version and time.time() - t0 < timeout:
        time.sleep(0.1)
    return time.time() - t0


def _table(folder: Path):
    t = pq.read_table(sorted(Path(folder).resolve().glob("part-*.parquet")), partitioning=None).to_pandas()
    return {str(u): g.sort_values("rank") for u, g in t.groupby("user_id")}


def _users(prep):
    """user_id -> (history item ids, event type names), as the prepared data holds them (sequences + serving)."""
    from inference.run import serving_users

    ids = prep.items.data.table.column("item_id").to_pylist()
    names = prep.event_types
    return {r["user_id"]: ([ids[i] for i in r["item_idx"]], [names[e] for e in r["event_type"]])
            for r in serving_users(prep).to_pylist()}


# ============================================================================================ consistency
def test_recommend_matches_the_nightly_table(world, server):
    c = server["client"]
    table, users = _table(world["table"]), _users(world["prep"])
    assert set(table) == set(users) and len(users) > 100
    sources = {"model": 0, "fallback": 0}
    for uid, (hist, ets) in users.items():
        r = c.post("/v1/recommend", json={"user_id": uid, "history": hist, "event_types": ets, "k": K})
        assert r.status_code == 200, r.text
        out, ref = r.json(), table[uid]
        assert out["items"] == ref["item_id"].tolist(), uid
        np.testing.assert_allclose(out["scores"], ref["score"].to_numpy(), rtol=1e-5, atol=1e-5)
        assert {out["source"]} == set(ref["source"]) and out["user_id"] == uid
        sources[out["source"]] += 1
    assert sources["model"] > 100 and sources["fallback"] >= 1, sources  # the dirty log's users without usable history


def test_unknown_items_are_counted_not_fatal(world, server):
    c = server["client"]
    hist, _ = next(iter(_users(world["prep"]).values()))
    r = c.post("/v1/recommend", json={"history": hist + ["no-such-item", 987654321], "k": 5})
    assert r.status_code == 200 and r.json()["unknown_items"] == 2 and r.json()["source"] == "model"
    r = c.post("/v1/recommend", json={"history": ["no-such-item"], "k": 5})
    assert r.status_code == 200 and r.json()["source"] == "fallback" and r.json()["unknown_items"] == 1
    assert len(r.json()["items"]) == 5
    r = c.post("/v1/recommend", json={"history": [], "exclude": [r.json()["items"][0]], "k": 5})  # exclude holds for fallback
    assert r.status_code == 200 and r.json()["source"] == "fallback"
    assert r.json()["items"][:4] == c.post("/v1/recommend", json={"k": 5}).json()["items"][1:]
    m = c.get("/metrics").text
    assert 'lmrec_serve_unknown_items_total{endpoint="recommend"}' in m and "lmrec_serve_fallback_responses_total" in m


def test_exclude_and_k(world, server):
    c = server["client"]
    hist, ets = next(iter(_users(world["prep"]).values()))
    base = c.post("/v1/recommend", json={"history": hist, "event_types": ets, "k": 20}).json()
    assert len(base["items"]) == 20 and not set(base["items"]) & set(hist)
    out = c.post("/v1/recommend", json={"history": hist, "event_types": ets, "k": 5, "exclude": base["items"][:2]}).json()
    assert out["items"] == base["items"][2:7]


# ============================================================================================ bad input
BAD = [
    ("/v1/recommend", b'{"history": [1, 2', 400, "body"),
    ("/v1/recommend", b'', 400, "body"),
    ("/v1/recommend", b'{"history": [NaN]}', 400, "body"),
    ("/v1/recommend", b'[1, 2]', 422, "body"),
    ("/v1/recommend", b'{"history": "i1"}', 422, "history"),
    ("/v1/recommend", b'{"history": [1, true]}', 422, "history[1]"),
    ("/v1/recommend", b'{"history": [1, {"a": 1}]}', 422, "history[1]"),
    ("/v1/recommend", b'{"history": [1], "k": "ten"}', 422, "k"),
    ("/v1/recommend", b'{"history": [1], "k": 0}', 422, "k"),
    ("/v1/recommend", b'{"history": [1], "k": 201}', 422, "k"),
    ("/v1/recommend", b'{"history": [1], "k": 2.5}', 422, "k"),
    ("/v1/recommend", b'{"history": [1], "exclude": 3}', 422, "exclude"),
    ("/v1/recommend", b'{"history": [1], "histroy": [2]}', 422, "histroy"),
    ("/v1/recommend", b'{"history": [1, 2], "event_types": ["view"]}', 422, "event_types"),
    ("/v1/recommend", b'{"history": [1], "event_types": ["teleport"]}', 422, "event_types[0]"),
    ("/v1/recommend", b'{"user_id": [1]}', 422, "user_id"),
    ("/v1/recommend", json.dumps({"history": list(range(501))}).encode(), 422, "history"),
    ("/v1/recommend", json.dumps({"history": ["x" * 9000]}).encode(), 413, "body"),
    ("/v1/search", b'{"history": [1]}', 422, "query"),
    ("/v1/search", b'{"query": "  "}', 422, "query"),
    ("/v1/search", b'{"query": 3}', 422, "query"),
    ("/v1/search", b'{"query": "red", "history_weight": 2}', 422, "history_weight"),
    ("/v1/search", b'{"query": "red", "k": -1}', 422, "k"),
]


@pytest.mark.parametrize("path, body, status, field", BAD)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, field):
    r = server["client"].post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(f"{field}:"), err


def test_the_service_survives_bad_input(server):
    c = server["client"]
    assert c.get("/v1/recommend").status_code == 405
    assert c.get("/nowhere").status_code == 404
    # a body larger than the limit, sent without Content-Length (chunked): refused while reading
    r = c.post("/v1/recommend", content=iter([b'{"history": [' + b"1," * 5000, b'1]}']))
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert server["proc"].poll() is None and c.get("/healthz").json()["status"] == "ok"
    m = c.get("/metrics").text
    assert 'lmrec_serve_errors_total{endpoint="recommend",kind="client"}' in m


# ============================================================================================ search
def test_search_blend_ends(world, server):
    c = server["client"]
    hist, ets = list(_users(world["prep"]).values())[3]
    rec = c.post("/v1/recommend", json={"history": hist, "event_types": ets, "k": 10}).json()
    s1 = c.post("/v1/search", json={"query": "anything", "history": hist, "event_types": ets, "k": 10, "history_weight": 1}).json()
    assert s1["items"] == rec["items"] and s1["personalised"] is True  # w = 1: the history alone, as recommended
    s0 = c.post("/v1/search", json={"query": "blue thing", "history": hist, "k": 10, "history_weight": 0}).json()
    t0 = c.post("/v1/search", json={"query": "blue thing", "k": 10}).json()
    assert s0["personalised"] is False and t0["personalised"] is False
    # w = 0: plain text search (only the history's own items are left out)
    seen = {str(i) for i in hist}  # the history's ids are the prepared strings, answers carry the table's id type
    assert s0["items"] == [i for i in c.post("/v1/search", json={"query": "blue thing", "k": 10 + len(hist)}).json()["items"]
                           if str(i) not in seen][:10]
    mid = c.post("/v1/search", json={"query": "blue thing", "history": hist, "event_types": ets, "k": 10}).json()
    assert mid["personalised"] is True and mid["history_weight"] == 0.4 and len(mid["items"]) == 10
    assert mid["scores"] == sorted(mid["scores"], reverse=True) and isinstance(mid["query_sharpness"], float)
    fixed = c.post("/v1/search", json={"query": "blue thing", "history": hist, "event_types": ets, "k": 10,
                                       "history_weight": mid["history_weight"]}).json()
    assert fixed["history_weight"] == mid["history_weight"] and fixed["items"] == mid["items"]


def test_search_weight_follows_the_querys_sharpness(world):
    """With search_broad_history_weight set, a query that many items meet about equally (low sharpness: its best item's
    z-score minus its tenth best's) gets that weight, one that names an item search_history_weight, linear between;
    unset (the default), every query gets search_history_weight."""
    from inference.serve.engine import Engine

    eng = Engine.load(ServeConfig(follow_recs=str(world["recs"]), search_broad_history_weight=0.75).checked(),
                      log=lambda s: None)
    w = eng.adaptive_weight(torch.tensor([0.0, 1.0, 1.25, 1.5, 2.0, 7.0]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.75, 0.6625, 0.575, 0.4, 0.4]))
    torch.testing.assert_close(eng.adaptive_weight(torch.tensor([0.5, 3.0]), 0.9, (0.5, 1.5)), torch.tensor([0.9, 0.4]))
    # the sharpness is read over the candidates: an item's z-score and the tenth best's, by hand
    q = eng.encode_queries(["blue thing", world["prep"].items["text"][0]])
    z, zu, sharp = eng.search_parts(q, None)
    assert zu is None
    cand = torch.from_numpy(~eng.cat.excluded)
    top = z[:, cand].sort(dim=1, descending=True).values
    torch.testing.assert_close(sharp, top[:, 0] - top[:, 9])
    torch.testing.assert_close(z[:, cand].mean(1), torch.zeros(2), atol=1e-4, rtol=0)  # standardised over candidates
    torch.testing.assert_close(z[:, cand].std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    hist, ets = list(_users(world["prep"]).values())[5]
    got = eng.search("blue thing", hist, ets, k=10)
    assert got["history_weight"] == pytest.approx(float(eng.adaptive_weight(torch.tensor([got["query_sharpness"]]))), abs=2e-4)
    one = Engine.load(ServeConfig(follow_recs=str(world["recs"])).checked(), log=lambda s: None)
    assert one.search("blue thing", hist, ets, k=10)["history_weight"] == 0.4
    text_only = Engine.load(ServeConfig(follow_recs=str(world["recs"]), search_history_weight=0.0).checked(),
                            log=lambda s: None)
    got = text_only.search("blue thing", hist, ets, k=10)  # weight 0 everywhere: the history is not even encoded
    assert got["personalised"] is False and got["history_weight"] == 0.0
    torch.testing.assert_close(one.adaptive_weight(torch.tensor([0.0, 1.5, 9.0])), torch.full((3,), 0.4))
    assert one.describe()["search"]["broad_history_weight"] is None
    assert eng.describe()["search"] | {"text_space": None} == {"available": True, "history_weight": 0.4,
                                                               "broad_history_weight": 0.75, "sharpness_range": [1.0, 2.0],
                                                               "text_space": None}


@pytest.mark.parametrize("space", ["encoder", "model"])
def test_query_of_an_item_text_is_that_items_text_vector(world, space):
    from inference.serve.engine import Engine

    eng = Engine.load(ServeConfig(follow_recs=str(world["recs"]), search_text_space=space).checked(), log=lambda s: None)
    texts = world["prep"].items["text"][:6]
    q = eng.encode_queries(texts)  # (6, H) or (6, d)
    t = eng.search_text[:6]  # the items' text vectors in the search's space
    assert eng.search_space == space and q.shape[1] == eng.search_text.shape[1]
    torch.testing.assert_close(q, t, rtol=1e-4, atol=1e-5)


def test_search_text_space_is_the_encoders_own_even_when_the_model_whitens(world):
    """auto = the frozen encoder's space: unit-length pooled outputs of the raw encoder, not the model's whitened
    coordinates or text vectors; a query equal to an item's text finds that item first. A fine-tuned encoder (text_mode
    full) has no frozen space: auto falls back to the model's, and asking for encoder is one error naming the key."""
    import torch.nn.functional as F

    from inference.serve.engine import Engine, ServeError
    from train.model import pool_hidden

    prep, root = world["prep"], world["root"]
    tiny = root / "tiny_bert"
    white = _export(prep, tiny, root / "final_whiten", seed=2, text_whiten=8)
    eng = Engine.load(ServeConfig(model_dir=str(white), prepared_dir=str(world["prepared"])).checked(), log=lambda s: None)
    assert eng.search_space == "encoder" and eng.describe()["search"]["text_space"] == "encoder"
    assert eng.cat.items.whitened and eng.cat.items.features.shape[1] == 8  # the model's own input stays whitened
    texts = prep.items["text"]
    tok = eng.tokenizer(texts[:6], padding=True, truncation=True, max_length=eng.max_text_tokens, return_tensors="pt")
    with torch.inference_mode():
        h = eng.model.text_encoder(**tok).last_hidden_state.float()
        raw = F.normalize(pool_hidden(h, tok["attention_mask"], "mean"), dim=-1)
    H = eng.model.text_hidden
    torch.testing.assert_close(eng.encode_queries(texts[:6]), raw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eng.search_text[:6], raw, rtol=1e-4, atol=1e-5)
    unique = [i for i, t in enumerate(texts) if texts.count(t) == 1 and eng.cat.to_model[i] >= 0
              and not eng.cat.excluded[i]][:5]
    ids = prep.items["item_id"]
    for i in unique:
        assert str(eng.search(texts[i], [], None, k=1, history_weight=0)["items"][0]) == str(ids[i])

    pool = _export(prep, tiny, root / "final_pool", seed=4, text_mode="pool", pool_rank=4, pool_heads=1)
    eng = Engine.load(ServeConfig(model_dir=str(pool), prepared_dir=str(world["prepared"])).checked(), log=lambda s: None)
    assert eng.search_space == "encoder"  # pool: the encoder's mean-pooled states, as the frozen mode's
    torch.testing.assert_close(eng.encode_queries(texts[:6]), raw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eng.search_text[:6], raw, rtol=1e-4, atol=1e-5)

    full = _export(prep, tiny, root / "final_full", seed=3, text_mode="full")
    eng = Engine.load(ServeConfig(model_dir=str(full), prepared_dir=str(world["prepared"])).checked(), log=lambda s: None)
    assert eng.search_space == "model" and eng.search_text.shape[1] == eng.cat.vectors.shape[1]
    with pytest.raises(ServeError, match="search_text_space: encoder needs a frozen text encoder"):
        Engine.load(ServeConfig(model_dir=str(full), prepared_dir=str(world["prepared"]),
                                search_text_space="encoder").checked(), log=lambda s: None)


def test_search_eval_measures_both_spaces_and_picks_the_weight_on_validation(world, tmp_path):
    """bench/search_eval.py through the service's own Engine: both text spaces, both kinds of query (words of the
    target's title; one short field after it, such as its category), the fixed weight and the adaptive rule chosen on
    validation, every ranking checked against Engine.search (fixed and adaptive weights); w = 1 (history only) cannot
    depend on the text space or the query."""
    sys.path.insert(0, str(ROOT / "bench"))
    import search_eval

    assert search_eval.attributes("Toy Story (1995). Animation, Children's, Comedy", ". ", 3) == ["Animation", "Children's", "Comedy"]
    assert search_eval.attributes("Miku vuze. Garden. Suvela. A long text of many words here.", ". ", 3) == ["Garden", "Suvela"]
    assert search_eval.attributes("A title only", ". ", 3) == [] and search_eval.attributes("A. b, c", "", 3) == []
    out = tmp_path / "search.json"
    res = search_eval.main(["--model-dir", str(world["final_a"]), "--prepared-dir", str(world["prepared"]),
                            "--query-from", "title,attribute", "--weights", "0,0.5,1", "--latency", "3", "--broad-weight", "0.75",
                            "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for kind in ("title", "attribute"):
        enc, mod = res["queries"][kind]["spaces"]["encoder"], res["queries"][kind]["spaces"]["model"]
        for e in (enc, mod):
            assert min(e["users"].values()) >= 20
            assert e["checked_against_engine_search"] == 2 * 20 * 3  # 20 users x (0, 0.5, adaptive) x (valid, test)
            v = e["valid_ndcg10_by_history_weight"]
            assert e["best_weight_on_valid"] == max((0.0, 0.5, 1.0), key=lambda w: v[str(w)])
            assert {"adaptive", "adaptive (chosen on validation)"} <= set(e["by_history_weight"])
            assert e["paired_service_rule_vs_one_weight"]["NDCG@10"]["n"] == e["users"]["test"]  # --broad-weight set
            assert e["sharpness_test"]["p10"] <= e["sharpness_test"]["p50"] <= e["sharpness_test"]["p90"]
        assert enc["by_history_weight"]["1.0"] == mod["by_history_weight"]["1.0"]
        assert "query_vs_item_vectors" in mod["by_history_weight"] and "query_vs_item_vectors" not in enc["by_history_weight"]
        pair = res["queries"][kind]["paired_first_space_over_second"]
        assert pair["a"] == "model" and pair["b"] == "encoder"
    # the attribute queries' users: the title queries' less those whose target's text has no short field after the
    # title (the dirty sample has items without text), counted
    t_users, a_spaces = res["queries"]["title"]["spaces"]["encoder"]["users"], res["queries"]["attribute"]["spaces"]
    left = a_spaces["encoder"]["users_left_out_no_attribute"]
    assert all(left[s] > 0 and a_spaces["encoder"]["users"][s] + left[s] == t_users[s] for s in ("valid", "test"))
    for a in res["adaptive"].values():
        assert a["service_default"]["broad_history_weight"] == 0.75
        grid = a["valid_ndcg10_mean_over_kinds_by_rule"]
        assert grid["adaptive"] == grid["adaptive broad 0.75 range 1-2"]  # the service's settings are in the grid
        best = max((g for g in grid if g != "adaptive"), key=grid.get)
        assert a["chosen_on_valid"]["rule"] == best and a["chosen_on_valid"]["valid_ndcg10_mean_over_kinds"] == grid[best]
        assert a["latency_ms"]["calls"] == 3 and 0 < a["latency_ms"]["p50"] <= a["latency_ms"]["p99"]
    # a catalogue without attributes is one clear message
    with pytest.raises(SystemExit, match="--query-from attribute: no valid target's text has a short field"):
        search_eval.main(["--model-dir", str(world["final_a"]), "--prepared-dir", str(world["prepared"]), "--title-sep", "",
                          "--query-from", "attribute", "--weights", "0,1", "--max-users", "5", "--spaces", "encoder"])


# ============================================================================================ model, metrics
def test_model_and_metrics(world, server):
    c = server["client"]
    m = c.get("/v1/model").json()
    assert m["model_version"] == json.loads((world["final_a"] / "export.json").read_text())["model_version"]
    assert m["catalogue"]["items"] == len(world["prep"].items) and m["loaded_at"] and m["search"]["available"]
    assert m["table"] == str(Path(world["table"]).resolve())
    text = c.get("/metrics").text
    for name in ("lmrec_serve_requests_total", "lmrec_serve_request_duration_seconds_bucket", "lmrec_serve_errors_total",
                 "lmrec_serve_model_info", "lmrec_serve_catalogue_items", "lmrec_serve_in_flight_requests"):
        assert name in text, name


# ============================================================================================ reload
def test_new_table_is_picked_up_without_dropping_requests(world, server):
    """Last in this module: it moves the server to model b."""
    c = server["client"]
    users = _users(world["prep"])
    uid = next(u for u in users if len(users[u][0]) > 3)
    hist, ets = users[uid]
    old = c.get("/v1/model").json()["model_version"]
    hammer = _Hammer(server["base"], {"history": hist, "event_types": ets, "k": K})
    time.sleep(1.0)
    table_b = _nightly(world["final_b"], world["prepared"], world["recs"], DATE2)  # the next night, another model
    new = _version(world["final_b"])
    _wait_for_version(c, new, 90)
    time.sleep(0.5)
    results = hammer.join()
    assert c.get("/v1/model").json()["model_version"] == new, server["log"].read_text()[-3000:]
    bad = [r for r in results if r[0] != 200]
    assert not bad, bad[:3]
    versions = [r[1]["model_version"] for r in results]
    assert versions[0] == old and versions[-1] == new and set(versions) == {old, new}
    # after the switch the answers are the new table's
    ref = _table(table_b)[uid]
    out = c.post("/v1/recommend", json={"history": hist, "event_types": ets, "k": K}).json()
    assert out["items"] == ref["item_id"].tolist()
    m = c.get("/v1/model").json()
    assert m["reload"]["reloads"] == 1 and m["table"] == str(Path(table_b).resolve())
    assert 'lmrec_serve_reloads_total{result="ok"} 1.0' in c.get("/metrics").text


def test_a_damaged_model_keeps_the_old_one_serving(world, server):
    """After the reload test: a newer table whose model folder was damaged after publishing is refused (the export's
    hashes), the previous model keeps answering, and the failure is reported, not retried."""
    c = server["client"]
    before = c.get("/v1/model").json()
    bad_final = world["root"] / "final_bad"
    shutil.copytree(world["final_b"], bad_final)
    w = bad_final / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    run = world["recs"] / "_runs" / "dt=2026-11-29" / "run=manual"
    shutil.copytree(Path(before["table"]), run)
    man = json.loads((run / "_manifest.json").read_text())
    man["model"]["path"] = str(bad_final)
    (run / "_manifest.json").write_text(json.dumps(man))
    os.symlink(os.path.relpath(run, world["recs"]), world["recs"] / "dt=2026-11-29")
    t0 = time.time()
    while not c.get("/v1/model").json()["reload"]["last_error"] and time.time() - t0 < 60:
        time.sleep(0.2)
    m = c.get("/v1/model").json()
    assert "sha256 differs" in m["reload"]["last_error"], m["reload"]
    assert m["model_version"] == before["model_version"] and m["reload"]["reloads"] == before["reload"]["reloads"]
    assert c.post("/v1/recommend", json={"history": [], "k": 3}).status_code == 200
    assert 'lmrec_serve_reloads_total{result="failed"} 1.0' in c.get("/metrics").text
    time.sleep(1.5)  # a few polls later: not retried
    assert 'lmrec_serve_reloads_total{result="failed"} 1.0' in c.get("/metrics").text


# ============================================================================================ reload, model_dir mode
def _publish_final(src: Path, final: Path) -> None:
    """Put the export ``src`` at ``final`` as training publishes one (train/export.py export_final: built in a hidden
    sibling, then swapped in whole with renames, lmrec_common.publish.staged_dir): a new export.json at the same path."""
    from lmrec_common.publish import staged_dir

    with staged_dir(final) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _prepared_root(world, dest: Path, *names: str) -> Path:
    """A prepared root under ``dest`` holding the world's prepared version under each of ``names`` (LATEST names the
    first), as data_prep's output_dir holds one version per run."""
    for name in names:
        shutil.copytree(world["prepared"], dest / name)
    (dest / "LATEST").write_text(names[0] + "\n")
    return dest


def test_model_dir_mode_picks_up_a_new_export_without_dropping_requests(world):
    """model_dir + prepared_dir (a root with LATEST): the nightly chain exports a new final/ to the served path; within
    reload_poll_s the service serves it, while client threads keep asking and every request is answered."""
    d = world["root"] / "md_poll"
    live = d / "final"
    shutil.copytree(world["final_a"], live)
    prepared = _prepared_root(world, d / "prepared", "v1")
    old, new = _version(world["final_a"]), _version(world["final_b"])
    users = _users(world["prep"])
    hist, ets = next(v for v in users.values() if len(v[0]) > 3)
    with _serving(d / "server.log", f"model_dir={live}", f"prepared_dir={prepared}", "reload_poll_s=0.3") as srv:
        c = srv["client"]
        m = c.get("/v1/model").json()
        assert m["model_version"] == old and m["table"] is None and m["prepared_dir"] == str(prepared / "v1"), m
        hammer = _Hammer(srv["base"], {"history": hist, "event_types": ets, "k": K})
        time.sleep(1.0)
        _publish_final(world["final_b"], live)
        _wait_for_version(c, new, 60)
        time.sleep(0.5)
        results = hammer.join()
        m = c.get("/v1/model").json()
        assert m["model_version"] == new, srv["log"].read_text()[-3000:]
        assert m["reload"]["reloads"] == 1 and m["model_dir"] == str(live.resolve()), m["reload"]
        assert 'lmrec_serve_reloads_total{result="ok"} 1.0' in c.get("/metrics").text
        bad = [r for r in results if r[0] != 200]
        assert not bad, bad[:3]
        versions = [r[1]["model_version"] for r in results]
        assert versions[0] == old and versions[-1] == new and set(versions) == {old, new}
        assert srv["proc"].poll() is None


def test_sighup_reloads_at_once(world):
    """reload_poll_s of an hour: a model_dir symlink moved to another final/ and a new LATEST are not looked at until
    SIGHUP, which makes the service check and switch to both at once (one reload)."""
    d = world["root"] / "md_hup"
    d.mkdir()
    current = d / "current"
    os.symlink(world["final_a"], current)
    prepared = _prepared_root(world, d / "prepared", "v1", "v2")
    old, new = _version(world["final_a"]), _version(world["final_b"])
    with _serving(d / "server.log", f"model_dir={current}", f"prepared_dir={prepared}", "reload_poll_s=3600") as srv:
        c = srv["client"]
        m = c.get("/v1/model").json()
        assert m["model_version"] == old and m["prepared_dir"] == str(prepared / "v1") and m["reload"]["last_check"] is None
        # the deploy: the link repointed with one rename, LATEST rewritten
        tmp = d / ".current.tmp"
        os.symlink(world["final_b"], tmp)
        os.replace(tmp, current)
        from lmrec_common.publish import atomic_write_text

        atomic_write_text(prepared / "LATEST", "v2\n")
        time.sleep(1.5)
        m = c.get("/v1/model").json()
        assert m["model_version"] == old and m["reload"]["last_check"] is None  # nothing looks before the signal
        assert m["model_dir"] == str(world["final_a"].resolve())  # the folder it loaded, not where the link points now
        srv["proc"].send_signal(signal.SIGHUP)
        took = _wait_for_version(c, new, 60)
        m = c.get("/v1/model").json()
        assert m["model_version"] == new, (took, srv["log"].read_text()[-3000:])
        assert m["prepared_dir"] == str(prepared / "v2") and m["model_dir"] == str(world["final_b"].resolve())
        assert m["reload"]["reloads"] == 1 and m["reload"]["last_check"] and m["reload"]["last_error"] is None
        assert c.post("/v1/recommend", json={"history": [], "k": 3}).status_code == 200
        assert srv["proc"].poll() is None


# ============================================================================================ config and start-up
def test_configs_and_shared_defaults(tmp_path):
    for p in sorted((ROOT / "configs" / "serve").glob("*.yaml")):
        load_config(ServeConfig, p).checked()
    serve, nightly = ServeConfig(), InferenceConfig()
    for k in SHARED_WITH_INFERENCE:
        assert getattr(serve, k) == getattr(nightly, k), k
    with pytest.raises(ConfigError, match="follow_recs"):
        ServeConfig().checked()
    with pytest.raises(ConfigError, match="not both"):
        ServeConfig(follow_recs="a", model_dir="b", prepared_dir="c").checked()
    with pytest.raises(ConfigError, match="prepared_dir"):
        ServeConfig(model_dir="b").checked()
    with pytest.raises(ConfigError, match="search_history_weight"):
        ServeConfig(follow_recs="a", search_history_weight=1.5).checked()
    with pytest.raises(ConfigError, match="search_broad_history_weight must be in"):
        ServeConfig(follow_recs="a", search_broad_history_weight=-0.1).checked()
    with pytest.raises(ConfigError, match=r"search_sharpness_range must be \[low, high\]"):
        ServeConfig(follow_recs="a", search_sharpness_range=(2.0, 1.0)).checked()


def test_nothing_to_serve_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "inference.serve", f"follow_recs={tmp_path}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "follow_recs: no published table" in p.stderr, p.stderr[-2000:]


def test_follow_checked_serves_only_tables_whose_morning_check_passed(world, tmp_path):
    """follow_checked: an unchecked table is not served (an error naming why while nothing passed); a table whose
    check passed is; a newer table is taken once its own check passes, and left again if a rerun of its check fails."""
    from inference.check import check_table
    from inference.serve.engine import ServeError, resolve_source

    recs = tmp_path / "recs"
    first = os.path.realpath(_nightly(world["final_a"], world["prepared"], recs, DATE))  # the run folder served
    cfg = ServeConfig(follow_recs=str(recs), follow_checked=True).checked()
    with pytest.raises(ServeError, match=r"no table under .* passed its morning check \(dt=2026-11-27: not checked"):
        resolve_source(cfg)

    def check(date: str) -> dict:
        return check_table(InferenceConfig(prepared_dir=str(world["prepared"]), output_dir=str(recs), run_date=date, k=K,
                                           check=CheckConfig(compare_previous=False)))
    assert check(DATE)["ok"]
    assert resolve_source(cfg).table == str(first)
    second = os.path.realpath(_nightly(world["final_b"], world["prepared"], recs, "2026-11-28"))
    assert resolve_source(cfg).table == str(first)  # not checked yet
    assert resolve_source(ServeConfig(follow_recs=str(recs)).checked()).table == str(second)  # the default follows it
    assert check("2026-11-28")["ok"]
    assert resolve_source(cfg).table == str(second)
    report = recs / "_checks" / "dt=2026-11-28.json"
    rep = json.loads(report.read_text())
    report.write_text(json.dumps({**rep, "ok": False, "problems": [{"check": "content", "what": "x"}]}))
    assert resolve_source(cfg).table == str(first)  # tonight's check failed: back to the last table that passed
    report.write_text(json.dumps({**rep, "run_folder": str(first)}))
    assert resolve_source(cfg).table == str(first)  # a report of another run of that date does not count
    with pytest.raises(ConfigError, match="follow_checked needs follow_recs"):
        ServeConfig(model_dir="a", prepared_dir="b", follow_checked=True).checked()
