"""The wire contract: committed generated modules are fresh; no module on the wire path can unpickle."""

import ast
from pathlib import Path

from protos.generate import stale_outputs

ROOT = Path(__file__).resolve().parents[3]


FORBIDDEN = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def test_generated_modules_are_not_stale():
    assert stale_outputs() == [], "run `python -m protos.generate` and commit the result"


def test_no_pickle_anywhere_in_the_package():
    offenders = []
    for package in ("protos", "crypto", "aggregator", "silo_agent", "fcmoe"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in {"eval", "exec"}:
                    names = ["eval/exec"]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n in FORBIDDEN | {"eval/exec"}]
    assert offenders == []
