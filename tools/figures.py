"""Figures quoted in README and docs, checked against the JSON that produced them.

A measured figure in a Markdown file carries, right after it, a comment naming its source:
``152 requests/s<!-- from serve_load.json: results.bento.requests_per_s -->`` (a file under
``benchmarks/results/`` by its path there, such as ``history/serve_load-20261207T0320Z.json`` for
an earlier run's, or a path under ``docs/``; a dotted key path, list
items by index; an optional ``*100`` or ``/1e6`` after the key when the text quotes the value
scaled, as a percentage or in MB). A table is checked whole: between
``<!-- table from ood_scores.json: benchmarks.ood_scores:report_table -->`` and
``<!-- end table -->`` stands exactly what that function renders from the JSON. The comment is
invisible on the rendered page; the file's
name stays in the visible text next to the figure, and README's table "Where the figures come
from" gives each source's model md5 and time (:func:`sources_table`).

:func:`problems` lists every quoted number that is not its source's value as rounded in the text
(half a unit of the last digit quoted), every source or key that does not exist, and every
source that does not say on which machine, when and (for a model's figures) with which model.

Figures of the default recipe's run (the model card's) are quoted from
``docs/results/default-recipe/``: a copy of that run's evaluation figures, taken from the stage
outputs ``dvc.lock`` records (:func:`snapshot`, after ``make run``); :func:`problems` also checks
that the copy is of the run the committed ``dvc.lock`` records, so a rerun committed without a new
copy fails (a workspace's own uncommitted run does not).

    python -m tools.figures              # check README.md and docs/*.md; exit 1 listing problems
    python -m tools.figures --table      # write the sources table README carries
    python -m tools.figures --snapshot   # copy the evaluation of the run dvc.lock records
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results")
SNAPSHOT = Path("docs/results/default-recipe")
#: The train and evaluate stages' outputs copied whole (each with its md5 in dvc.lock).
SNAPSHOT_FILES = (
    "reports/evaluate/metrics.json", "reports/evaluate/gates.json", "reports/evaluate/lineage.json",
    "reports/train/run.json",
)  # fmt: skip
#: What of ``artifacts/evaluate/metrics_full.json``'s trust section the copy keeps (no per-image rows).
TRUST_DROP = ("scores", "groups")
MARK = re.compile(r"<!-- from (?P<file>[^\s:]+): (?P<key>[^\s]+)(?: (?P<scale>[*/][0-9.e]+))? -->")
TABLE = re.compile(
    r"<!-- table from (?P<file>[^\s:]+): (?P<func>[\w.]+:\w+) -->\n(?P<body>.*?)<!-- end table -->", re.S
)
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?")
#: Where a source says when it was measured, and with which model.
TIME_KEYS = ("created_at", "date", "measured_at")
MD5_KEYS = ("model_md5",)


@dataclass(frozen=True)
class Quote:
    """One quoted figure: where (file, line), the text's number and the source it names."""

    doc: str
    line: int
    text: str
    source: str
    key: str
    scale: str | None


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def quotes(path: Path, root: Path = ROOT) -> list[Quote]:
    """Every marked figure of one Markdown file; the number is the last one before its marker."""
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for m in MARK.finditer(line):
            before = MARK.sub("", line[: m.start()])[-40:]
            numbers = NUMBER.findall(before)
            found.append(
                Quote(
                    path.relative_to(root).as_posix(),
                    n,
                    numbers[-1] if numbers else "",
                    m["file"],
                    m["key"],
                    m["scale"],
                )  # fmt: skip
            )
    return found


def tables(path: Path, root: Path = ROOT) -> list[tuple[int, str, str, str]]:
    """Every checked table of one Markdown file: (line, source, ``module:function``, its text)."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m["file"], m["func"], m["body"]) for m in TABLE.finditer(text)]


def _check_table(doc_name: str, line: int, source: str, func: str, body: str, doc: Any) -> str | None:
    module, name = func.split(":")
    rendered = getattr(importlib.import_module(module), name)(doc)
    if rendered.strip() == body.strip():
        return None
    ours = next((a for a, b in zip(body.splitlines(), rendered.splitlines(), strict=False) if a != b), body)
    return f"{doc_name}:{line}: the table differs from {func} of {source}: {ours.strip()[:100]!r}"


def source_path(name: str, root: Path = ROOT) -> Path:
    """A source named in a marker: a path under ``docs/`` from the project root, any other under
    ``benchmarks/results/``."""
    return root / (name if name.startswith("docs/") else RESULTS / name)


def read_source(name: str, root: Path = ROOT) -> Any:
    """The JSON document a marker names."""
    return json.loads(source_path(name, root).read_text())


def lookup(doc: Any, key: str) -> Any:
    """The value at a dotted key path (list items by index; a key holding dots, such as
    ``mahalanobis_layers_s0.1``, matches whole); KeyError naming the missing part."""
    value, parts, i = doc, key.split("."), 0
    while i < len(parts):
        if isinstance(value, list) and parts[i].isdigit() and int(parts[i]) < len(value):
            value, i = value[int(parts[i])], i + 1
            continue
        ends = range(len(parts), i, -1) if isinstance(value, dict) else ()
        whole = next((j for j in ends if ".".join(parts[i:j]) in value), None)
        if whole is None:
            raise KeyError(parts[i])
        value, i = value[".".join(parts[i:whole])], whole
    return value


def _scaled(value: float, scale: str | None) -> float:
    if not scale:
        return value
    factor = float(scale[1:])
    return value * factor if scale[0] == "*" else value / factor


def agrees(text: str, value: float) -> bool:
    """Whether ``value`` rounds to the number quoted as ``text`` (half a unit of its last digit)."""
    quoted = float(text.replace(",", ""))
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(value - quoted) <= 0.5 * 10**-decimals + 1e-9


def find(doc: Any, keys: tuple[str, ...]) -> Any:
    """The first value of any of ``keys`` anywhere in a JSON document (depth first)."""
    if isinstance(doc, dict):
        for k in keys:
            if doc.get(k) not in (None, ""):
                return doc[k]
        for v in doc.values():
            if (hit := find(v, keys)) is not None:
                return hit
    return None


def _check(q: Quote, doc: Any) -> str | None:
    where = f"{q.doc}:{q.line}: {q.source}: {q.key}"
    try:
        value = lookup(doc, q.key)
    except KeyError as exc:
        return f"{where}: no key {exc.args[0]!r}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{where}: {value!r} is not a number"
    if not q.text:
        return f"{where}: no number before the marker"
    value = _scaled(float(value), q.scale)
    return None if agrees(q.text, value) else f"{where}: the text says {q.text}, the file {value:g}"


def problems(root: Path = ROOT) -> list[str]:
    """Every quoted figure that disagrees with its source, and every source without its machine
    or time; an empty list when all agree."""
    found, loaded = [], {}
    for path in documents(root):
        for line, source, func, body in tables(path, root):
            try:
                issue = _check_table(path.relative_to(root).as_posix(), line, source, func, body,
                                     read_source(source, root))  # fmt: skip
            except (OSError, ValueError, ImportError, AttributeError, KeyError) as exc:
                issue = f"{path.relative_to(root).as_posix()}:{line}: {source}: {func}: {exc!r}"
            if issue:
                found.append(issue)
        for q in quotes(path, root):
            if q.source not in loaded:
                try:
                    loaded[q.source] = read_source(q.source, root)
                except (OSError, ValueError) as exc:
                    loaded[q.source] = None
                    found.append(f"{q.doc}:{q.line}: {q.source}: unreadable ({exc})")
            if loaded[q.source] is not None and (issue := _check(q, loaded[q.source])):
                found.append(issue)
    for name, doc in loaded.items():  # a benchmark result names its machine and time (a stage output: lineage)
        benchmark = doc is not None and not name.startswith("docs/")
        if benchmark and (find(doc, ("machine",)) is None or find(doc, TIME_KEYS) is None):
            found.append(f"{RESULTS / name}: does not say on which machine and when it was measured")
    return found + snapshot_problems(root) + table_problems(root)


TABLE_HEADER = "| source | model md5 | measured | machine |"


def _readme_table(text: str) -> tuple[int, int] | None:
    """Where README's table of sources starts and ends, or None without one."""
    if TABLE_HEADER not in text:
        return None
    start = text.index(TABLE_HEADER)
    end = text.find("\n\n", start)
    return start, (len(text) if end < 0 else end + 1)


def table_problems(root: Path = ROOT) -> list[str]:
    """Whether README's table of sources is the one its sources give."""
    text = (root / "README.md").read_text()
    span = _readme_table(text)
    if span is None or text[span[0] : span[1]] == sources_table(root):
        return []
    return ["README.md: the table of sources differs from the files (python -m tools.figures --table)"]


def write_table(root: Path = ROOT) -> Path:
    """Rewrite README's table of sources from the files."""
    path = root / "README.md"
    text = path.read_text()
    span = _readme_table(text)
    if span is None:
        raise SystemExit(f"{path}: no table starting {TABLE_HEADER!r}")
    path.write_text(text[: span[0]] + sources_table(root) + text[span[1] :])
    return path


def sources_table(root: Path = ROOT) -> str:
    """README's table of the benchmark results it and docs quote: file, model md5, time, machine."""
    names = sorted({q.source for p in documents(root) for q in quotes(p, root) if not q.source.startswith("docs/")})
    rows = ["| source | model md5 | measured | machine |", "|---|---|---|---|"]
    for name in names:
        doc = read_source(name, root)
        machine = find(doc, ("machine",))
        where = machine
        if isinstance(machine, dict):
            cores = machine.get("cpu_count") or machine.get("cores")
            where = f"{machine.get('cpu')}" + (f", {cores} cores" if cores else "")
        rows.append(
            f"| `{RESULTS / name}` | "
            f"{find(doc, MD5_KEYS) or 'none (no model involved)'} | {find(doc, TIME_KEYS)} | {where} |"
        )
    return "\n".join(rows) + "\n"


def _locked(root: Path, committed: bool = False) -> dict[str, str]:
    """``{path: md5}`` of every stage output ``dvc.lock`` records: the workspace's, or with
    ``committed`` the one of the last commit (a workspace's own ``make run`` changes nothing quoted)."""
    text = None
    if committed:
        res = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=root, capture_output=True, text=True)
        text = res.stdout if res.returncode == 0 else None
    lock = yaml.safe_load(text if text is not None else (root / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for st in lock["stages"].values() for o in st.get("outs") or []}


def snapshot(root: Path = ROOT) -> Path:
    """Copy the evaluation figures of the run ``dvc.lock`` records into :data:`SNAPSHOT`: the
    files of :data:`SNAPSHOT_FILES` whole, the trust section of ``metrics_full.json`` (calibration,
    OOD and image-quality figures, without per-image rows; the quality checks' refused shares
    of the model's ``config.json``) and ``source.json`` (their md5s in
    ``dvc.lock``, the model md5, when; the run's commit and data are in ``lineage.json``). Refuses
    when the workspace's outputs are not that run's."""
    from pipeline.core import lineage
    from pipeline.core.fsutil import write_json

    locked, dest = _locked(root), root / SNAPSHOT
    for rel in SNAPSHOT_FILES:
        if lineage.file_md5(root / rel) != locked.get(rel):
            raise SystemExit(f"{rel}: not the output dvc.lock records (run `dvc repro` or `dvc checkout` first)")
    for rel in SNAPSHOT_FILES:
        (dest / Path(rel).name).parent.mkdir(parents=True, exist_ok=True)
        (dest / Path(rel).name).write_bytes((root / rel).read_bytes())
    full = json.loads((root / "artifacts/evaluate/metrics_full.json").read_text())
    trust = {k: v for k, v in full["trust"]["ood"].items() if k not in TRUST_DROP}
    quality = json.loads((root / "artifacts/model/config.json").read_text()).get("quality") or {}
    fitted = {k: v for k, v in quality.items() if k.endswith("_refused_share")}
    write_json(dest / "trust.json", {"ood": trust, "calibration": full["trust"]["calibration"], "quality_fit": fitted})
    write_json(dest / "source.json", {
        "dvc_lock_md5": {rel: locked[rel] for rel in SNAPSHOT_FILES},
        "evaluate_dir_md5": locked.get("artifacts/evaluate"),
        "model_md5": lineage.file_md5(root / "artifacts/model/model.pt"),
        "created_at": json.loads((root / "reports/evaluate/lineage.json").read_text()).get("created_at"),
    })  # fmt: skip
    return dest


def snapshot_problems(root: Path = ROOT) -> list[str]:
    """Whether :data:`SNAPSHOT` is a verbatim copy of the run ``dvc.lock`` records."""
    try:
        source = json.loads((root / SNAPSHOT / "source.json").read_text())
    except (OSError, ValueError):
        return [f"{SNAPSHOT}/source.json: missing (python -m tools.figures --snapshot after make run)"]
    found, locked = [], _locked(root, committed=True)
    for rel, md5 in source["dvc_lock_md5"].items():
        copy = root / SNAPSHOT / Path(rel).name
        if hashlib.md5(copy.read_bytes()).hexdigest() != md5:
            found.append(f"{copy.relative_to(root)}: not the copy of {rel} it says it is ({md5})")
        if locked.get(rel) != md5:
            found.append(
                f"{SNAPSHOT}: a copy of another run than the committed dvc.lock's ({rel}: {md5} vs "
                f"{locked.get(rel)}); python -m tools.figures --snapshot"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the sources table (``--table``) or the problems found (exit 1 when any)."""
    args = sys.argv[1:] if argv is None else argv
    if "--snapshot" in args:
        print(f"wrote {snapshot()}")
        return 0
    if "--table" in args:
        print(f"wrote {write_table()}")
        return 0
    found = problems()
    print("\n".join(found) if found else "every quoted figure agrees with its source")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
