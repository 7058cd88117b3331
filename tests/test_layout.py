"""The layout the README describes: smol.py is the model and nothing else, imports run
one way (scripts -> helpers -> smol.py) with no cycle, and only bench.py, which times
train.py's own step, imports the training loop."""
import ast
import os

from common import HERE

MODULES = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py"))


def imports(name):
    """The top-level names a file imports, wherever in the file the import stands."""
    tree = ast.parse(open(os.path.join(HERE, name + ".py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_smol_py_is_the_model_only():
    assert imports("smol") <= {"dataclasses", "math", "torch"}  # no project file, no hub, no tokenizer
    source = open(os.path.join(HERE, "smol.py"), encoding="utf-8").read()
    assert "open(" not in source and "torch.load" not in source and "torch.save" not in source


def test_only_bench_imports_the_training_loop():
    assert [m for m in MODULES if "train" in imports(m)] == ["bench"]


def test_project_imports_have_no_cycle():
    graph = {m: imports(m) & set(MODULES) for m in MODULES}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        path.pop()
        done.add(m)
    for m in MODULES:
        visit(m)


def test_every_skip_goes_through_conftest_missing():
    # one way to skip, which SMOL_NO_SKIP=1 turns into a failure: no other skip call or
    # marker anywhere in the tests (conftest.missing itself is the one pytest.skip)
    words = ("importor" + "skip", "pytest." + "skip(", "mark." + "skip", "skip" + "if(", "x" + "fail")
    tests = os.path.join(HERE, "tests")
    for name in sorted(os.listdir(tests)):
        if name.endswith(".py") and name != "conftest.py":
            source = open(os.path.join(tests, name), encoding="utf-8").read()
            assert not [w for w in words if w in source], f"tests/{name} skips without conftest.missing"
