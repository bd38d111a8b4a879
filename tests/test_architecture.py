"""The package's shape: imports flow one way (no cycle, imports inside functions included), modules
stay small, a method file holds its paper and none of the loop's plumbing, and a config error
answers before torch is imported."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "promptdg_cli"


def _modules() -> dict:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def import_graph() -> dict:
    """module -> the package modules it imports anywhere in its file (functions included)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            hit = next((c for c in candidates if c in mods and c != m), None)
            if hit:
                graph[m].add(hit)
    return graph


def find_cycle(graph: dict) -> list:
    """One cycle of ``graph`` as a list of modules (first == last), or [] (depth-first search)."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "promptdg_cli.runner" in graph["promptdg_cli.commands"] | {"promptdg_cli.runner"}
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) == []
    graph = import_graph()
    graph["promptdg_cli.schema"].add("promptdg_cli.runner")  # runner imports (via config) schema
    assert find_cycle(graph)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))
def test_no_module_is_over_450_lines(path):
    n = len((PACKAGE / path).read_text().splitlines())
    assert n <= 450, f"{path} has {n} lines"


# what the loop and the runner own: ranks, shards, global counts, checkpoint files, atomic writes, signals
PLUMBING = (
    "torch.save",
    "torch.load",
    "save_checkpoint",
    "load_checkpoint",
    "stop_point",
    "preempt",
    "dist.",
    "rank",
    "shard",
    "global",
    "all_sum",
    "broadcast",
    "sync_grads",
    "DistributedDataParallel",
    "signal",
    "os.replace",
    "write_atomic",
    "fsync",
    "checkpoint.pt",
    ".tmp",
)
# the loop's internals a method file never imports (it returns Terms; the loop and the runner do the rest)
INTERNALS = {"promptdg_cli.dist", "promptdg_cli.checkpoints", "promptdg_cli.files", "promptdg_cli.preemption",
             "promptdg_cli.compute_once", "promptdg_cli.locks", "promptdg_cli.runner", "promptdg_cli.commands"}
LOOP_NAMES = {"TrainContext", "make_files"}
METHODS = sorted(p.name for p in (PACKAGE / "methods").glob("*.py") if p.name not in ("__init__.py", "base.py"))


@pytest.mark.parametrize("name", METHODS)
def test_a_method_file_holds_no_loop_plumbing(name):
    text = (PACKAGE / "methods" / name).read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments may name the loop
    tree = ast.parse(text)
    doc = ast.get_docstring(tree) or ""
    body = code.replace(doc, "")
    found = [p for p in PLUMBING if p in body]
    assert not found, f"{name} does plumbing the training loop owns: {found}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            module = ".".join(["promptdg_cli"] + ([node.module] if node.module else []))
            names = {a.name for a in node.names}
            imported = {module} | {f"{module}.{n}" for n in names}
            assert not imported & INTERNALS, f"{name} imports the loop's internals: {sorted(imported & INTERNALS)}"
            if module == "promptdg_cli.training":
                assert not names & LOOP_NAMES, f"{name} imports {sorted(names & LOOP_NAMES)} from the loop"


def test_the_core_imports_nothing_from_the_demo():
    """The demo world plugs in as any outside package would (entry points, plugins.py)."""
    graph = import_graph()
    core = {m: deps for m, deps in graph.items() if not m.startswith("promptdg_cli.demo")}
    offenders = {m: sorted(d for d in deps if d.startswith("promptdg_cli.demo")) for m, deps in core.items()}
    assert not {m: d for m, d in offenders.items() if d}


def test_one_place_renames_a_file_into_place():
    """Every atomic write goes through files.write_atomic: os.replace appears once in the package."""
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "os.replace(" in line.split("#")[0]]
    assert hits == ["files.py:" + hits[0].split(":")[1]] if hits else False, hits


def test_a_config_error_answers_before_torch_is_imported():
    """`promptdg train method.lr=-1` fails on the composed config, with torch never imported."""
    code = (
        "import sys\n"
        "from promptdg_cli.cli import main\n"
        "try:\n"
        "    rc = main(['train', 'method=coop', 'method.lr=-1'])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "TORCH False" in out.stdout
    assert "method.lr=-1" in out.stderr and "> 0" in out.stderr and "Traceback" not in out.stderr
