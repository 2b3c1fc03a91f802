"""Item catalogue: read + quarantine, render one text per item, tokenize each distinct text ONCE.

The catalogue is read with plain pyarrow, not HF Datasets: it is small (one row per item, not per
event), files may differ in columns, and the text template is applied per item in Python anyway.
Tokenisation results are cached per distinct text under output_dir/_cache/tokens/ so a nightly run
only tokenizes new or changed texts.
"""

from __future__ import annotations

import html
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.inputs import InputFile, check_id_column, check_id_values, is_string_like
from data_prep.schema import DataPrepError
from data_prep.validate import ID_LEADING_ZERO, ID_WHITESPACE, normalize_ids, stringify, to_utf8
from lmrec_common.log import Progress, print0
from lmrec_common.manifest import sha256_file, sha256_strings


@dataclass
class Catalogue:
    item_id: pa.Array  # string, unique, in first-seen (file, row) order
    text: list[str]  # rendered text per item ("" = no text)
    available: np.ndarray  # bool
    id_kind: str  # "int" if every catalogue file holds integer ids, else "string"
    rows_read: int = 0
    quarantine: pa.Table | None = None
    quarantined: dict[str, int] = field(default_factory=dict)
    decoded_latin1: int = 0  # text/id values that held non-UTF-8 bytes
    missing_fields: list[str] = field(default_factory=list)  # template fields absent from every file
    html_unescaped: int = 0  # items whose text held HTML entities (&amp;, &quot;, &reg; ...), decoded
    ids_whitespace: int = 0  # catalogue rows whose raw id had leading/trailing whitespace
    ids_leading_zero: int = 0  # catalogue rows whose raw id is all digits with a leading zero


class TextTemplate:
    """``"{title}. {genres}"`` rendered per item. Null/missing fields render empty and the literal
    text next to an empty field is dropped: a literal between two fields is kept only if some
    field before it and the field after it are non-empty; a leading literal only if the first field
    is non-empty; a trailing literal only if the last field is. Whitespace is collapsed.

    ``unescape_html``: field values are HTML-unescaped first (``&amp;`` -> ``&``, ``&quot;`` -> ``"``,
    ``&reg;`` -> ``®``): scraped catalogues (the Amazon review sets: 15% of toy titles) publish titles
    with entities, which the tokenizer would otherwise split into ``&``, ``amp``, ``;`` word pieces."""

    def __init__(self, template: str, unescape_html: bool = True):
        self.template = template
        self.unescape_html = unescape_html
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as e:
            raise DataPrepError(f"item_text_template {template!r} is not a valid format string: {e}") from None
        self.literals: list[str] = []
        self.fields: list[tuple[str, str]] = []  # (name, format_spec)
        for lit, name, spec, conv in parts:
            self.literals.append(lit or "")
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise DataPrepError(f"item_text_template {template!r}: field {{{name}}} must be a plain column name")
            self.fields.append((name, spec or ""))
        if len(self.literals) == len(self.fields):
            self.literals.append("")
        if not self.fields:
            raise DataPrepError(f"item_text_template {template!r} names no column (e.g. '{{title}}. {{genres}}')")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.fields]

    def render(self, values: list[str]) -> str:
        if self.unescape_html:
            values = [html.unescape(v) if "&" in v else v for v in values]
        vals = [format(v, spec) if spec else v for v, (_, spec) in zip(values, self.fields)]
        nonempty = [bool(v.strip()) for v in vals]
        out = [self.literals[0] if nonempty[0] else ""]
        seen = nonempty[0]
        for i, v in enumerate(vals):
            out.append(v)
            lit = self.literals[i + 1]
            if i + 1 < len(vals):
                if seen and nonempty[i + 1]:
                    out.append(lit)
                seen = seen or nonempty[i + 1]
            elif nonempty[i]:
                out.append(lit)
        return re.sub(r"\s+", " ", "".join(out)).strip()


def join_list_field(value: list) -> str:
    """A list-valued catalogue field as text: nested lists flattened (Amazon's category paths are a list of paths,
    ``[["Toys & Games", "Puzzles"], ["Toys & Games", "Kids"]]``), empty entries dropped, each value once in first-seen
    order, joined by ", " -> "Toys & Games, Puzzles, Kids" (not Python's repr of the inner lists)."""
    def flat(v):
        for x in v:
            if isinstance(x, (list, tuple)):
                yield from flat(x)
            elif x is not None:
                yield str(x).strip()

    return ", ".join(dict.fromkeys(x for x in flat(value) if x))


def read_catalogue(files: list[InputFile], id_col: str, available_col: str, template: TextTemplate, id_normalization: str = "exact") -> Catalogue:
    ids_parts, text_parts, avail_parts, q_parts = [], [], [], []
    kinds, rows_read, latin1, unescaped, n_ws, n_zero = set(), 0, 0, 0, 0, 0
    quarantined = {"null_item_id": 0, "duplicate_item_id": 0}
    seen: set[str] = set()
    present_fields: set[str] = set()
    for inp in files:
        kinds.add(check_id_column(inp, id_col, "items"))
        if available_col in inp.schema.names and not pa.types.is_boolean(inp.schema.field(available_col).type):
            raise DataPrepError(f"items file {inp.path}: column {available_col!r} has type {inp.schema.field(available_col).type}; expected bool")
        try:
            t = pq.read_table(inp.path)
        except (pa.ArrowException, OSError) as e:
            raise DataPrepError(f"items file {inp.path}: cannot read (corrupt?): {e}") from None
        check_id_values(t.column(id_col), inp.path, id_col, "items")
        n = t.num_rows
        rows_read += n
        if n == 0:
            print0(f"[data_prep] warning: items file {inp.path} has 0 rows")
            continue
        ids, bad = to_utf8(t.column(id_col))
        latin1 += bad
        ids, flags = normalize_ids(ids, id_normalization)  # the same rule as the events' ids
        n_ws += int(((flags & ID_WHITESPACE) > 0).sum())
        n_zero += int(((flags & ID_LEADING_ZERO) > 0).sum())
        cols = []
        for name in template.names:
            if name not in t.column_names:
                cols.append([""] * n)
                continue
            present_fields.add(name)
            c = t.column(name).combine_chunks()
            if is_string_like(c.type):
                c, bad = to_utf8(c)
                latin1 += bad
            elif pa.types.is_list(c.type) or pa.types.is_large_list(c.type):  # e.g. genres as a list of strings
                c = pa.array([None if v is None else join_list_field(v) for v in c.to_pylist()], pa.string())
            else:
                c = stringify(pa.table({name: c}), {name: name})[name]
            cols.append(c.fill_null("").to_pylist())
        avail = t.column(available_col).fill_null(True).to_numpy(zero_copy_only=False).astype(bool) if available_col in t.column_names else np.ones(n, bool)
        id_list = ids.to_pylist()
        reasons: list[str | None] = [None] * n
        keep = np.zeros(n, bool)
        for r, i in enumerate(id_list):  # per catalogue row (not per event): duplicates need first-seen order
            if i is None or i == "":
                reasons[r] = "null_item_id"
            elif i in seen:
                reasons[r] = "duplicate_item_id"
            else:
                seen.add(i)
                keep[r] = True
        kidx = np.flatnonzero(keep)
        ids_parts.append(ids.take(pa.array(kidx)))
        text_parts.extend(template.render([c[r] for c in cols]) for r in kidx)
        if template.unescape_html:
            unescaped += sum(1 for r in kidx if any("&" in c[r] and html.unescape(c[r]) != c[r] for c in cols))
        avail_parts.append(avail[kidx])
        if not keep.all():
            qidx = np.flatnonzero(~keep)
            qt = t.take(pa.array(qidx))
            q = stringify(qt, {c: c for c in qt.column_names})
            q["source_file"] = pa.array([str(inp.path)] * len(qidx), pa.string())
            q["source_row"] = pa.array(qidx.astype(np.int64))
            q["reason"] = pa.array([reasons[r] for r in qidx], pa.string())
            for r in qidx:
                quarantined[reasons[r]] += 1
            q_parts.append(pa.table(q))
    missing = [f for f in template.names if f not in present_fields]
    if missing:
        print0(f"[data_prep] warning: item_text_template field(s) {missing} are in no items file; they render empty")
    item_id = pa.concat_arrays(ids_parts) if ids_parts else pa.array([], pa.string())
    return Catalogue(
        item_id=item_id.cast(pa.string()),
        text=text_parts,
        available=np.concatenate(avail_parts) if avail_parts else np.zeros(0, bool),
        id_kind="int" if kinds == {"int"} else "string",
        rows_read=rows_read,
        quarantine=pa.concat_tables(q_parts, promote_options="default") if q_parts else None,
        quarantined=quarantined,
        decoded_latin1=latin1,
        missing_fields=missing,
        html_unescaped=unescaped,
        ids_whitespace=n_ws,
        ids_leading_zero=n_zero,
    )


# ----------------------------------------------------------------------------- tokenisation


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from lmrec_common.models import resolve_model_path

    path = resolve_model_path(spec)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if not getattr(tok, "is_fast", False):
        raise DataPrepError(f"tokenizer {spec} ({path}) has no fast (Rust) tokenizer; data_prep needs one (tokenizer.json)")
    return tok, path


def tokenizer_fingerprint(tok, path: Path, max_text_tokens: int) -> dict:
    vocab_file = next((path / f for f in ("tokenizer.json", "vocab.txt", "spiece.model") if (path / f).is_file()), None)
    vocab_sha = sha256_file(vocab_file) if vocab_file else sha256_strings(sorted(tok.get_vocab()))
    return {"path": str(path), "name": getattr(tok, "name_or_path", str(path)), "class": type(tok).__name__, "vocab_sha256": vocab_sha, "max_text_tokens": max_text_tokens}


def tokenize_texts(tok, texts: list[str], max_text_tokens: int, num_proc: int = 1) -> list[list[int]]:
    """Tokenize (special tokens included, truncated to max_text_tokens). Called once per DISTINCT text.

    Up to 50k texts the Rust batch tokenizer in this process is fastest (it is multi-threaded already);
    beyond that HF Datasets.map(num_proc) splits the work across processes."""
    if not texts:
        return []
    if num_proc <= 1 or len(texts) < 50_000:
        out = []
        prog = Progress("tokenize", total=len(texts), unit="texts")
        for s in range(0, len(texts), 10_000):
            chunk = texts[s : s + 10_000]
            out.extend(tok(chunk, truncation=True, max_length=max_text_tokens, add_special_tokens=True)["input_ids"])
            prog.update(len(chunk))
        prog.close()
        return out
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(
        lambda b: {"input_ids": tok(b["text"], truncation=True, max_length=max_text_tokens, add_special_tokens=True)["input_ids"]},
        batched=True,
        batch_size=2_000,
        num_proc=num_proc,
        remove_columns=["text"],
        desc="tokenize",
    )
    return ds["input_ids"]


class TokenCache:
    """Distinct text -> input_ids, one Parquet per tokenizer fingerprint under output_dir/_cache/tokens/."""

    def __init__(self, cache_dir: Path, fingerprint: dict, enabled: bool):
        key = sha256_strings([json.dumps(fingerprint, sort_keys=True)])[:16]
        self.path = cache_dir / "tokens" / f"{key}.parquet"
        self.enabled = enabled
        self.map: dict[str, list[int]] = {}
        if enabled and self.path.is_file():
            try:
                t = pq.read_table(self.path)
                self.map = dict(zip(t.column("text").to_pylist(), t.column("input_ids").to_pylist()))
            except (pa.ArrowException, OSError, KeyError) as e:  # a damaged cache is only a lost optimisation
                print0(f"[data_prep] warning: ignoring unreadable token cache {self.path}: {e}")
                self.map = {}

    def save(self, texts: list[str], ids: list[list[int]]) -> None:
        if not self.enabled:
            return
        from lmrec_common.publish import atomic_write_bytes

        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "input_ids": pa.array(ids, pa.list_(pa.int32()))}), sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())


def tokenize_items(tok, texts: list[str], max_text_tokens: int, cache: TokenCache, num_proc: int) -> tuple[pa.Array, dict]:
    """input_ids per item (list<int32>), each distinct text tokenized at most once (and not at all if cached)."""
    uniq = sorted(set(texts))
    todo = [t for t in uniq if t not in cache.map]
    new = tokenize_texts(tok, todo, max_text_tokens, num_proc)
    table = dict(cache.map)
    table.update(zip(todo, new))
    # the cache keeps exactly this run's texts: it never grows past the catalogue
    cache.save(uniq, [table[t] for t in uniq])
    by_text = {t: table[t] for t in uniq}
    ids = pa.array([by_text[t] for t in texts], pa.list_(pa.int32()))
    stats = {"distinct_texts": len(uniq), "texts_tokenized": len(todo), "texts_reused": len(uniq) - len(todo)}
    return ids, stats
