"""The layout the README describes: smol.py, train.py and sample.py at the top and every
other part in a room named for its job (smolkit/, server/, tools/, bench/); imports run one
way (the three files, server/ and tools/ -> smolkit/ -> smol.py) with no cycle; smol.py is
the model and nothing else; every command runs from the repository root as written."""
import ast
import os
import re
import subprocess
import sys

from smolkit.common import ROOT

TOP_FILES = {"smol.py", "train.py", "sample.py", "input.txt", "README.md", "tokenizer.json", "requirements.txt",
             "requirements-dev.txt", "requirements-serve.txt"}
ROOMS = ("smolkit", "server", "tools", "bench")
# the commands besides train.py and sample.py, as the docs run them: python -m NAME
COMMANDS = ["server", "tools.export", "tools.prepare", "tools.plot", "tools.build_tokenizer", "bench.bench",
            "bench.bench_serve", "bench.bench_prepare", "bench.bench_llama_cpp", "bench.profile_decode",
            "bench.quantize_quality"]


def tracked_top_level():
    """The files at the top of the repository: what git tracks there (a fresh clone's), or the
    folder's files where there is no git."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return {path for path in out.splitlines() if "/" not in path}
    except (OSError, subprocess.CalledProcessError):
        return {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name))}


def modules():
    """{dotted module name: path} of the project's Python files outside tests/."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in ("smol.py", "train.py", "sample.py")}
    for room in ROOMS:
        for name in sorted(os.listdir(os.path.join(ROOT, room))):
            if name.endswith(".py"):
                found[f"{room}.{name[:-3]}"] = os.path.join(ROOT, room, name)
    return found


def imports(path):
    """The dotted names a file imports (absolute imports only), wherever in the file they stand."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; the project imports by absolute names"
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def project_imports(module):
    """The project's modules (and rooms) a module imports."""
    mods = modules()
    names = imports(mods[module])
    return {n for n in names if n in mods or n in ROOMS}


def room(name):
    return name.split(".")[0]


def test_the_top_level_holds_the_three_files_and_rooms():
    assert tracked_top_level() - {n for n in tracked_top_level() if n.startswith(".")} == TOP_FILES
    assert sorted(n for n in os.listdir(ROOT) if n.endswith(".py")) == ["sample.py", "smol.py", "train.py"]
    for name in ROOMS:
        assert os.path.isfile(os.path.join(ROOT, name, "__init__.py")), f"{name}/ is not a package"


def test_smol_py_is_the_model_only():
    # no project file, no hub, no tokenizer
    assert {n.split(".")[0] for n in imports(os.path.join(ROOT, "smol.py"))} <= {"dataclasses", "math", "torch"}
    source = open(os.path.join(ROOT, "smol.py"), encoding="utf-8").read()
    assert "open(" not in source and "torch.load" not in source and "torch.save" not in source


def test_imports_run_downward_only():
    allowed = {  # the rooms each room may import
        "smol": set(),
        "smolkit": {"smol", "smolkit"},
        "train": {"smol", "smolkit"}, "sample": {"smol", "smolkit"},
        "server": {"smol", "smolkit", "server"},
        "tools": {"smol", "smolkit"},  # no tool imports another tool, the server or the commands
        "bench": {"smol", "smolkit", "server", "tools", "train", "sample", "bench"},  # it measures them
    }
    wrong = {m: sorted(room(n) for n in project_imports(m) if room(n) not in allowed[room(m)])
             for m in modules()}
    assert {m: w for m, w in wrong.items() if w} == {}


def test_project_imports_have_no_cycle():
    mods = modules()
    graph = {m: {n for n in project_imports(m) if n in mods and n != m} for m in mods}
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
    for m in mods:
        visit(m)


def test_only_bench_imports_the_training_loop():
    assert sorted(m for m in modules() if "train" in project_imports(m)) == ["bench.bench"]


def test_every_command_runs_from_the_root_with_python_m_and_refuses_its_file_form_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell has it
    runs = {name: subprocess.Popen([sys.executable, "-m", name, "--help"], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in COMMANDS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith("usage: "), f"python -m {name} --help: {err}"
    for name in COMMANDS:
        path = os.path.join(*name.split(".")) + (os.sep + "__main__.py" if "." not in name else ".py")
        proc = subprocess.run([sys.executable, path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            1, "", f"error: run it from the repository root as: python -m {name}\n"), path


def test_every_skip_goes_through_conftest_missing():
    # one way to skip, which SMOL_NO_SKIP=1 turns into a failure: no other skip call or
    # marker anywhere in the tests (conftest.missing itself is the one pytest.skip)
    words = ("importor" + "skip", "pytest." + "skip(", "mark." + "skip", "skip" + "if(", "x" + "fail")
    tests = os.path.join(ROOT, "tests")
    for name in sorted(os.listdir(tests)):
        if name.endswith(".py") and name != "conftest.py":
            source = open(os.path.join(tests, name), encoding="utf-8").read()
            assert not [w for w in words if w in source], f"tests/{name} skips without conftest.missing"


def test_each_room_lists_what_it_holds():
    # smolkit/__init__.py and server/__init__.py name each module (and the page) with its job
    for name in ("smolkit", "server"):
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, name, "__init__.py"), encoding="utf-8").read()))
        listed = set(re.findall(r"^ {4}(\w+)(?:\.py|\.html)? ", doc, re.M))
        held = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, name))
                if f.endswith((".py", ".html")) and not f.startswith("__")}
        assert listed == held, f"{name}/__init__.py lists {sorted(listed)}, the folder holds {sorted(held)}"
