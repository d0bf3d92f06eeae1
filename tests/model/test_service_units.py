"""Units of the service without a server: request-field validation (pipeline.serving.requests) and
the adaptive batcher (pipeline.serving.batching)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from pipeline.core import params
from pipeline.serving import batching, requests
from tests.conftest import PROJECT_ROOT

#: What a model trained with this project's params.yaml records and the service accepts.
METADATA = params.load_section("metadata", PROJECT_ROOT / "params.yaml")
VOCAB = requests.vocabulary({"metadata_vocabulary": dataclasses.asdict(METADATA)})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({}, {"age": None, "sex": None, "localization": None}),
        (
            {"age": "45", "sex": " Female ", "localization": "Upper Extremity"},
            {"age": 45.0, "sex": "female", "localization": "upper extremity"},
        ),
        ({"age": 0, "sex": "unknown", "localization": ""}, {"age": 0.0, "sex": None, "localization": None}),
    ],
)
def test_validate_metadata_accepts(raw, expected):
    assert requests.validate_metadata(raw, VOCAB) == expected


@pytest.mark.parametrize(
    "raw, field, status",
    [
        ({"age": "abc"}, "age", 422),
        ({"age": "nan"}, "age", 422),
        ({"age": -1}, "age", 422),
        ({"age": 121}, "age", 422),
        ({"age": True}, "age", 422),
        ({"sex": "robot"}, "sex", 422),
        ({"sex": 3}, "sex", 422),
        ({"localization": "elbow"}, "localization", 422),
    ],
)
def test_validate_metadata_refuses_naming_the_field(raw, field, status):
    with pytest.raises(requests.ApiError) as err:
        requests.validate_metadata(raw, VOCAB, "[2]")
    assert err.value.field == f"{field}[2]" and err.value.status == status
    assert f"field '{field}[2]'" in err.value.response().body.decode()


def test_vocabulary_is_the_one_the_model_was_trained_with():
    assert VOCAB.values("sex") == tuple(METADATA.sexes) and VOCAB.values("localization") == tuple(
        METADATA.localizations
    )
    assert (VOCAB.age_min, VOCAB.age_max) == (METADATA.age_min, METADATA.age_max)
    # an older model records only its encoder's vocabulary (plus "unknown"); a model without
    # metadata accepts any text
    old = requests.vocabulary(
        {"architecture": {"metadata": {"sexes": ["f", "m"], "localizations": ["arm"], "age_scale": 100}}}
    )
    assert old.values("sex") == ("f", "m", "unknown") and old.values("localization") == ("arm", "unknown")
    anything = requests.vocabulary({"architecture": {"metadata": None}})
    assert requests.validate_metadata({"sex": "Robot"}, anything)["sex"] == "robot"


def test_age_range_comes_from_the_vocabulary():
    narrow = requests.vocabulary({"metadata_vocabulary": {**dataclasses.asdict(METADATA), "age_max": 90}})
    with pytest.raises(requests.ApiError, match="between 0 and 90"):
        requests.validate_metadata({"age": 95}, narrow)


def test_batcher_batches_while_busy_and_isolates_failures():
    calls: list[list[int]] = []
    gate = threading.Event()

    def fn(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)  # the model is busy with the first request while the others queue up
        if any(i < 0 for i in items):
            raise RuntimeError("boom")
        return [i * 10 for i in items]

    async def main():
        b = batching.Batcher(fn, max_batch=4)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 8)]
        await asyncio.sleep(0.1)
        gate.set()
        out = await asyncio.gather(first, *rest)
        bad = await asyncio.gather(b.submit(-1), return_exceptions=True)
        ok = await b.submit(9)
        return b, out, bad, ok

    b, out, bad, ok = asyncio.run(main())
    assert out == [10, 20, 30, 40, 50, 60, 70]
    assert calls[:3] == [[1], [2, 3, 4, 5], [6, 7]]  # queued requests batched, at most 4 at a time
    assert isinstance(bad[0], RuntimeError) and ok == 90  # a failed batch does not stop the batcher
    assert b.stats()["largest_batch"] == 4 and b.stats()["images"] == 9


def _targets(node) -> list:
    """The names an assignment binds, tuples unpacked (``self.a, self.b = ...``)."""
    import ast

    found = []
    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        found += target.elts if isinstance(target, ast.Tuple) else [target]
    return found


def test_every_name_the_routes_use_on_the_classifier_exists():
    """The routes reach the worker's Classifier typed (routes.classifier()); every attribute they
    use on it is one Classifier has (a method, a property, a class attribute or one its __init__
    sets), so a renamed attribute fails here rather than as a 500 in production."""
    import ast
    import inspect

    from pipeline.serving import engine, routes

    cls = next(n for n in ast.parse(inspect.getsource(engine)).body if isinstance(n, ast.ClassDef))
    defined = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in _targets(n)}
    defined |= {
        t.attr
        for n in ast.walk(cls)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in _targets(n)
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    tree = ast.parse(inspect.getsource(routes))
    holders = {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", "") == "classifier"
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    holders |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) for a in n.args.args
                if isinstance(a.annotation, ast.Name) and a.annotation.id == "Classifier"}  # fmt: skip
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in holders
    }
    assert holders and used, "the routes reach the classifier through routes.classifier()"
    assert used <= defined, f"routes use names Classifier does not have: {sorted(used - defined)}"
