"""Converters (data_prep/convert.py): MovieLens 100K/1M and generic CSV -> raw Parquet inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import convert
from data_prep.convert import ConvertError, convert_csv, convert_movielens

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ml1m(tmp: Path) -> Path:
    src = tmp / "ml1m"
    src.mkdir()
    (src / "ratings.dat").write_bytes(
        b"1::10::5::978300760\n"
        b"1::20::3::978302109\n"
        b"2::10::4::978301968\n"
        b"2::30\n"  # line 4: wrong field count
        b"3::x::4::978300000\n"  # line 5: not a number
        b"\n"  # line 6: empty
        b"3::20::1::978300001\n"
    )
    (src / "movies.dat").write_bytes(
        "10::Misérables, Les (1995)::Drama|Musical\n20::Toy Story (1995)::Animation|Children's|Comedy\n"
        "30::Café au lait (1993)::Comedy\n40::Never Rated (1999)::Drama\nbroken line\n".encode("latin-1")
    )
    return src


def _ml100k(tmp: Path) -> Path:
    src = tmp / "ml100k"
    src.mkdir()
    (src / "u.data").write_bytes(b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t242\t1\t878887116\n")
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
              "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    (src / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    flags_242 = ["0"] * 19
    flags_242[8] = flags_242[12] = "1"  # Drama, Musical
    flags_302 = ["0"] * 19
    flags_302[1] = "1"
    (src / "u.item").write_bytes(
        (f"242|Misérables, Les (1995)|01-Jan-1995||http://x|{'|'.join(flags_242)}\n"
         f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{'|'.join(flags_302)}\n").encode("latin-1")
    )
    return src


def test_movielens_1m_fixture(tmp_path):
    out = tmp_path / "raw"
    info = convert_movielens(_ml1m(tmp_path), out)
    assert info["format"] == "ml-1m"
    ev = pq.read_table(out / "events" / "part-00000.parquet")
    assert ev.schema == pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.timestamp("ms", tz="UTC")),
                                   ("event_type", pa.string()), ("value", pa.float64())])
    # source order kept, values exact
    assert ev.column("user_id").to_pylist() == [1, 1, 2, 3]
    assert ev.column("item_id").to_pylist() == [10, 20, 10, 20]
    assert ev.column("value").to_pylist() == [5.0, 3.0, 4.0, 1.0]
    assert ev.column("timestamp").cast(pa.int64()).to_pylist() == [978300760000, 978302109000, 978301968000, 978300001000]
    assert set(ev.column("event_type").to_pylist()) == {"rating"}
    items = pq.read_table(out / "items" / "items.parquet").to_pylist()
    assert items[0] == {"item_id": 10, "title": "Misérables, Les (1995)", "genres": "Drama, Musical"}
    assert items[1]["genres"] == "Animation, Children's, Comedy" and items[2]["title"] == "Café au lait (1993)"
    assert len(items) == 4  # the never-rated movie is kept (a cold-start item)
    # every unparsable line is quarantined with its line number and reason, and counted
    q = pq.read_table(out / "quarantine" / "events.parquet").to_pylist()
    assert [(r["source_line"], r["reason"]) for r in q] == [(4, "wrong_field_count:2_of_4"), (5, "not_a_number:item_id"), (6, "empty_line")]
    assert q[0]["raw"] == "2::30" and q[1]["raw"] == "3::x::4::978300000" and q[0]["source_file"].endswith("ratings.dat")
    qi = pq.read_table(out / "quarantine" / "items.parquet").to_pylist()
    assert [(r["source_line"], r["raw"]) for r in qi] == [(5, "broken line")]
    saved = json.loads((out / "convert.json").read_text())
    c = saved["counts"]
    assert c["events_written"] == 4 and c["events_lines_read"] == 7
    assert c["events_quarantined"] == {"wrong_field_count:2_of_4": 1, "not_a_number:item_id": 1, "empty_line": 1}
    assert c["users"] == 3 and c["items_with_events"] == 2 and c["items_written"] == 4 and c["items_quarantined"] == {"wrong_field_count": 1}
    assert {Path(i["path"]).name for i in saved["inputs"]} == {"ratings.dat", "movies.dat"} and all(len(i["sha256"]) == 64 for i in saved["inputs"])


def test_movielens_100k_fixture_and_epoch_seconds(tmp_path):
    out = tmp_path / "raw"
    info = convert_movielens(_ml100k(tmp_path), out, timestamp_format="epoch_s")
    assert info["format"] == "ml-100k"
    ev = pq.read_table(out / "events")
    assert ev.schema.field("timestamp").type == pa.int64()
    assert ev.column("timestamp").to_pylist() == [881250949, 891717742, 878887116]
    assert ev.column("user_id").to_pylist() == [196, 186, 22]
    items = pq.read_table(out / "items").to_pylist()
    assert items == [
        {"item_id": 242, "title": "Misérables, Les (1995)", "genres": "Drama, Musical"},
        {"item_id": 302, "title": "L.A. Confidential (1997)", "genres": "Action"},
    ]
    assert not (out / "quarantine").exists()


def test_movielens_rating_event_types(tmp_path):
    """--rating-event-types: the stars become the event type; events, order and values are unchanged."""
    src = _ml1m(tmp_path)
    plain = convert_movielens(src, tmp_path / "plain")
    info = convert.main(["movielens", "--src", str(src), "--out", str(tmp_path / "rt"), "--rating-event-types"])
    ev = pq.read_table(tmp_path / "rt" / "events")
    base = pq.read_table(tmp_path / "plain" / "events")
    assert ev.column("event_type").to_pylist() == ["rating_5", "rating_3", "rating_4", "rating_1"]
    assert ev.drop(["event_type"]).equals(base.drop(["event_type"]))
    assert info["event_types"] == ["rating_1", "rating_3", "rating_4", "rating_5"] and plain["event_types"] == ["rating"]
    assert info["counts"] == plain["counts"]


def test_movielens_cli_and_errors(tmp_path):
    src = _ml1m(tmp_path)
    out = tmp_path / "cli"
    info = convert.main(["movielens", "--src", str(src), "--out", str(out)])
    assert info["counts"]["events_written"] == 4
    # a failed conversion leaves the previous output in place
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        convert.main(["movielens", "--src", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(ConvertError, match="not a MovieLens folder"):
        convert_movielens(tmp_path / "empty", out)
    assert pq.read_table(out / "events").num_rows == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_csv_converter(tmp_path):
    (tmp_path / "ev.csv").write_text(
        "uid,sku,ts,kind,price\n"
        "007,A1,2026-10-01T10:00:00Z,view,\n"
        "008,A2,2026-10-01T11:00:00Z,purchase,9.5\n"
        "007,A2,2026-10-02T09:00:00Z,cart,9.5,extra\n"  # line 4: too many fields
        ",A3,2026-10-02T12:00:00Z,view,\n"  # null user: kept for data_prep to quarantine
    )
    (tmp_path / "it.csv").write_text("sku,name,brand,instock\nA1,Red mug,Acme,true\nA2,Blue cup,Acme,false\n", encoding="utf-8")
    out = tmp_path / "raw"
    info = convert_csv(tmp_path / "ev.csv", out, tmp_path / "it.csv", user_col="uid", item_col="sku", time_col="ts",
                       event_type_col="kind", value_col="price", text_cols=["name", "brand"], available_col="instock")
    ev = pq.read_table(out / "events")
    assert ev.column_names == ["user_id", "item_id", "timestamp", "event_type", "value"]
    assert ev.column("user_id").to_pylist() == ["007", "008", None]  # '007' keeps its leading zero -> strings
    assert ev.column("item_id").to_pylist() == ["A1", "A2", "A3"]
    assert pa.types.is_timestamp(ev.schema.field("timestamp").type)
    assert ev.column("event_type").to_pylist() == ["view", "purchase", "view"]
    assert ev.column("value").to_pylist() == [None, 9.5, None]
    items = pq.read_table(out / "items").to_pylist()
    assert items == [{"item_id": "A1", "name": "Red mug", "brand": "Acme", "available": True},
                     {"item_id": "A2", "name": "Blue cup", "brand": "Acme", "available": False}]
    q = pq.read_table(out / "quarantine" / "events.parquet").to_pylist()
    assert [(r["source_line"], r["reason"]) for r in q] == [(4, "wrong_field_count:6_of_5")]
    assert info["counts"]["events_lines_read"] == 4 and info["counts"]["events_written"] == 3


def test_csv_integer_ids_constant_event_type_and_errors(tmp_path):
    (tmp_path / "ev.tsv").write_text("u\ti\tt\n1\t10\t1700000000\n2\t11\t1700000060\n", encoding="latin-1")
    out = tmp_path / "raw"
    convert.main(["csv", "--events", str(tmp_path / "ev.tsv"), "--out", str(out), "--user-col", "u", "--item-col", "i",
                  "--time-col", "t", "--delimiter", "\t", "--event-type", "click"])
    ev = pq.read_table(out / "events")
    assert ev.schema.field("user_id").type == pa.int64() and ev.schema.field("timestamp").type == pa.int64()
    assert ev.column("event_type").to_pylist() == ["click", "click"] and "value" not in ev.column_names
    assert not (out / "items").exists()
    with pytest.raises(ConvertError, match=r"ev.tsv: column\(s\) \['ts'\] not found"):
        convert_csv(tmp_path / "ev.tsv", tmp_path / "x", user_col="u", item_col="i", time_col="ts", delimiter="\t")
    (tmp_path / "bad.csv").write_text("u,i,t\n1,10,5\nabc,11,6\n")
    with pytest.raises(ConvertError, match="non-integer id at data row 2: 'abc'"):
        convert_csv(tmp_path / "bad.csv", tmp_path / "x", user_col="u", item_col="i", time_col="t", id_type="int")
    assert not (tmp_path / "x").exists()


@pytest.mark.data
@pytest.mark.parametrize(
    "name,ratings,users,rated,movies",
    [("ml-1m", 1_000_209, 6_040, 3_706, 3_883), ("ml-100k", 100_000, 943, 1_682, 1_682)],
)
def test_real_movielens_counts(tmp_path, name, ratings, users, rated, movies):
    src = SHARED / name
    if not src.is_dir():
        pytest.skip(f"{src} absent (real MovieLens data is read at run time only, never shipped)")
    out = tmp_path / name
    info = convert_movielens(src, out)
    c = info["counts"]
    assert (c["events_written"], c["users"], c["items_with_events"], c["items_written"]) == (ratings, users, rated, movies)
    assert c["events_quarantined"] == {} and c["items_quarantined"] == {}
    ev = pq.read_table(out / "events", columns=["user_id", "value"])
    assert ev.num_rows == ratings and set(ev.column("value").to_pylist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    titles = pq.read_table(out / "items", columns=["title"]).column("title").to_pylist()
    assert any("Misérables" in t for t in titles)  # latin-1 decoded, not mojibake
