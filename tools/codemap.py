"""The project's import map: what each DVC stage runs, and whether the layers hold.

    python tools/codemap.py deps            # each stage's code closure vs its deps in dvc.yaml
    python tools/codemap.py deps --write    # rewrite the code deps of dvc.yaml from the closure
    python tools/codemap.py layers          # imports that go up a layer, and import circles
    python tools/codemap.py bento --write   # bentofile.yaml ships exactly the service's modules

A stage's **closure** is every project file its command runs: the stage module, the transitive
closure of its project imports (static, read from the source: top-level *and* inside functions,
``from pipeline.x import y`` counting ``pipeline/x/y.py`` when that is a module), the
``__init__.py`` of every package on the way (Python runs them on import) and the ``templates/``
folder of a module that renders templates. DVC must see all of them as deps, or a change to one
would leave the stage "up to date" and a model's lineage would name a commit whose code did not
produce it. ``dvc.yaml`` lists them as files, so that touching one file re-runs exactly the stages
that import it.

The **layers** (lowest first; a package may import only packages of lower layers, and its own):
``core`` < ``data``, ``features`` < ``model`` < ``evaluation``, ``monitoring`` < ``registry`` <
``serving``, ``audit`` < ``stages`` < ``flows`` < ``cli``. Standard library only (plus ruamel.yaml,
which DVC installs, to rewrite dvc.yaml without losing its comments) and :mod:`pipeline.core.stages`,
the one list of stages.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python tools/codemap.py
    sys.path.insert(0, str(ROOT))

from pipeline.core import stages as core_stages  # noqa: E402

PACKAGES = ("pipeline", "flows")
#: Layer of each package (``pipeline.<name>`` or ``flows``); lower numbers are lower layers.
LAYERS: dict[str, int] = {
    "pipeline.core": 0,
    "pipeline.data": 1,
    "pipeline.features": 1,
    "pipeline.model": 2,
    "pipeline.evaluation": 3,
    "pipeline.monitoring": 3,
    "pipeline.registry": 4,
    "pipeline.serving": 5,
    "pipeline.audit": 5,
    "pipeline.labelling": 5,
    "pipeline.stages": 6,
    "flows": 7,
    "pipeline.cli": 8,
}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a dotted project module (a ``.py`` file or a package's ``__init__.py``)."""
    base = root / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """The project modules a file imports, anywhere in it (including inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_of(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_file(name, root) is not None:
                found.add(name)
    return found


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(module: str, root: Path = ROOT) -> set[str]:
    """Every project module that running ``module`` imports, transitively (its packages included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        for name in _with_parents(m):
            if name in seen or module_file(name, root) is None:
                continue
            seen.add(name)
            todo.extend(imports(module_file(name, root), root))
    return seen


def closure_files(module: str, root: Path = ROOT) -> list[str]:
    """The files (and template folders) of :func:`closure`, relative to ``root``, sorted."""
    files: set[str] = set()
    for m in closure(module, root):
        path = module_file(m, root)
        files.add(path.relative_to(root).as_posix())
        templates = path.parent / "templates"
        if templates.is_dir() and '"templates"' in path.read_text():
            files.add(templates.relative_to(root).as_posix())
    return sorted(files)


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def stages(root: Path = ROOT) -> dict[str, dict]:
    """The stages of dvc.yaml, in file order (:func:`pipeline.core.stages.specs`: the one list)."""
    return core_stages.specs(root)


def stage_module(stage: dict) -> str:
    return core_stages.module(stage)


def declared(stage: dict) -> list[str]:
    """A stage's deps as paths (``deps`` entries may be strings or one-key mappings)."""
    return core_stages.entries(stage, "deps")


def covered(path: str, deps: list[str]) -> bool:
    """Whether ``path`` is a declared dep or lies under a declared folder."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def dep_problems(root: Path = ROOT) -> list[str]:
    """For every stage: closure files not covered by its deps, and code deps it does not run."""
    problems = []
    for name, stage in stages(root).items():
        deps, needed = declared(stage), closure_files(stage_module(stage), root)
        problems += [
            f"stage {name}: {f} is run by the stage but is not among its deps in dvc.yaml"
            for f in needed
            if not covered(f, deps)
        ]
        problems += [
            f"stage {name}: {d} is a dep in dvc.yaml but the stage does not run it"
            for d in deps
            if _is_code(d) and not any(covered(f, [d]) for f in needed)
        ]
    return problems


def write_deps(root: Path = ROOT) -> None:
    """Rewrite every stage's code deps in dvc.yaml (kept: the data and artefact deps, comments)."""
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = y.load(path.read_text())
    for stage in doc["stages"].values():
        keep = [d for d in stage["deps"] if not _is_code(d if isinstance(d, str) else next(iter(d)))]
        stage["deps"] = keep + closure_files(stage_module(stage), root)
    with open(path, "w") as fh:
        y.dump(doc, fh)


#: The module a Bento serves, and the files it reads besides its code: the web page, and params.yaml
#: (where the inference log goes: pipeline.monitoring.logstore.location).
SERVICE = "pipeline.serving.service"
SERVICE_STATIC = ("pipeline/serving/web/*", "/params.yaml")  # "/": the root's only (gitignore patterns)


def bento_include(root: Path = ROOT) -> list[str]:
    """What a Bento must ship: the service's code closure, its web page and params.yaml."""
    return [f for f in closure_files(SERVICE, root) if f.endswith(".py")] + list(SERVICE_STATIC)


def bento_problems(root: Path = ROOT) -> list[str]:
    """What bentofile.yaml gets wrong: the service module, a service module not included, or an
    included module the service does not import."""
    import yaml

    doc = yaml.safe_load((root / "bentofile.yaml").read_text()) or {}
    declared = doc.get("include") or []
    want = bento_include(root)
    problems = []
    if str(doc.get("service", "")).split(":")[0] != SERVICE:
        problems.append(f"bentofile.yaml: service {doc.get('service')!r} is not in module {SERVICE}")
    problems += [f"bentofile.yaml: {f} is imported by the service but not included" for f in want if f not in declared]
    problems += [f"bentofile.yaml: {f} is included but the service never imports it" for f in declared if f not in want]
    return problems


def write_bento_include(root: Path = ROOT) -> None:
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    path = root / "bentofile.yaml"
    doc = y.load(path.read_text())
    doc["include"] = bento_include(root)
    with open(path, "w") as fh:
        y.dump(doc, fh)


def _layer(module: str) -> tuple[str, int] | None:
    for pkg in sorted(LAYERS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg, LAYERS[pkg]
    return None


def all_modules(root: Path = ROOT) -> list[str]:
    return sorted(_module_of(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def layer_problems(root: Path = ROOT) -> list[str]:
    """Imports from a package to a higher layer, or across packages of the same layer."""
    problems = []
    for mod in all_modules(root):
        here = _layer(mod)
        if here is None:
            if mod not in PACKAGES:
                problems.append(f"{mod}: in no layer of tools/codemap.py LAYERS")
            continue
        for target in sorted(imports(module_file(mod, root), root)):
            there = _layer(target)
            if there is None or there[0] == here[0]:
                continue
            if there[1] >= here[1]:
                problems.append(f"{mod} (layer {here[1]}, {here[0]}) imports {target} (layer {there[1]}, {there[0]})")
    return problems


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Import circles between project modules (strongly connected components of size > 1)."""
    graph = {m: sorted(t for t in imports(module_file(m, root), root) if t != m) for m in all_modules(root)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["deps", "layers", "bento"])
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps / bentofile.yaml's include")
    a = ap.parse_args(argv)
    if a.what == "deps":
        if a.write:
            write_deps()
        problems = dep_problems()
    elif a.what == "bento":
        if a.write:
            write_bento_include()
        problems = bento_problems()
    else:
        problems = layer_problems() + [f"import circle: {' -> '.join(c)}" for c in cycles()]
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
