"""The docs as a user meets them (README.md and docs/*.md).

* Every command in a fenced ``bash`` block still runs as far as it can without data or weights:
  ``promptdg train|eval|generate ...`` composes (in-process with ``--cfg job``; a sweep's ``-m`` is
  dropped and each swept value composed once; a ``target=``/``source=`` must be a domain of the
  composed dataset), ``promptdg collect ...`` parses its options and filters, ``make <target>`` exists
  (``make -n``), ``python <script> ...`` answers ``--help`` and knows the options the line uses, a
  script run by path exists and parses (``bash -n``), ``torchrun ... -m promptdg_cli <command>`` is
  checked as ``promptdg <command>``. The rule for lines a user must edit: a line with a placeholder
  (``<hash>``, ``<that run dir>``) or a bare ``...`` argument is skipped. Programs that are not
  promptdg's (``pip``, ``tensorboard``, ``sed`` after a pipe, ...) are listed in EXTERNAL; any other
  program fails the test, so a new kind of command gets a rule here.
* The generated blocks (provenance, datasets, speed) are their sources rendered (tools/render_docs.py),
  and the speed renderer reads a JSON in the shape benchmarks/bench.py writes (tests/data/
  bench_result_tiny.json: bench.py's own output on the tiny demo CLIP, numbers meaningless).
* The README stays a manual: at most 300 lines, ``make demo`` and ``make test`` first; every relative
  link and anchor resolves.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promptdg_cli.cli import main as cli_main
from promptdg_cli.collect.command import build_parser
from promptdg_cli.collect.records import parse_filters

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import render_docs  # noqa: E402

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = ("bash", "sh", "shell")
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>|(?:^|\s)\.\.\.(?:\s|$)")
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXTERNAL = {  # programs that are not promptdg's: named so that a new one is a decision, not an accident
    "source", "export", "cd", "pip", "git", "tmux", "screen", "sed", "grep", "tail", "less", "tee",
    "squeue", "scontrol", "nvidia-smi", "huggingface-cli", "tensorboard", "wandb", "mlflow",
}
HYDRA_COMMANDS = ("train", "eval", "generate")


# --------------------------------------------------------------------- reading the docs
def fenced_blocks(text: str):
    """(language, line number of the block's first line, its lines) of every fenced block."""
    blocks, current = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and current is None:
            current = (m.group(1), n + 1, [])
        elif line.strip().startswith("```") and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def shell_commands(path: Path):
    """(line number, command) of every command in the file's shell blocks; backslash continuations joined."""
    out = []
    for lang, first, lines in fenced_blocks(path.read_text()):
        if lang not in SHELL_LANGS:
            continue
        pending, start = "", None
        for n, line in enumerate(lines, first):
            if not pending and (not line.strip() or line.strip().startswith("#")):
                continue
            start = start or n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, (pending + line).strip()))
            pending, start = "", None
    return out


def example_files(path: Path):
    """{relative path: text} of the file's code blocks whose first line is a comment naming a file
    (``# myconf/method/linear_head.yaml``): the files a command of the same doc uses."""
    files = {}
    for lang, _, lines in fenced_blocks(path.read_text()):
        m = re.match(r"^#\s+([\w./-]+\.(?:ya?ml|py))\b", lines[0]) if lines and lang in ("yaml", "python") else None
        if m:
            files[m.group(1)] = "\n".join(lines) + "\n"
    return files


COMMANDS = [(p, n, c) for p in DOCS for n, c in shell_commands(p)]


def tokens(command: str):
    """The command's words with quotes and comments resolved; shell operators (| && ;) as words."""
    lex = shlex.shlex(command, posix=True, punctuation_chars="|&;")
    lex.whitespace_split, lex.commenters = True, "#"
    return list(lex)


def segments(words):
    """The pipeline's commands (split at |, &&, ;)."""
    out, cur = [], []
    for w in words:
        if w in ("|", "||", "&&", ";", "&"):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return [s for s in out + [cur] if s]


def split_top(value: str):
    """``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]``: a sweep's values (commas inside brackets or quotes stay)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


# --------------------------------------------------------------------- checking one command
def _call_cli(args):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(list(args))
    except SystemExit as e:  # Hydra exits on errors
        code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--package", "-p")


def check_hydra(cmd: str, args):
    """Compose the command (``--cfg job`` unless it asks for another view); a sweep composes each value once."""
    flags, overrides, view, it = [], [], "job", iter(args)
    multirun = "-m" in args or "--multirun" in args
    for a in it:
        if a in ("-m", "--multirun"):
            continue
        if a in ("--cfg", "-c"):
            view = next(it)
        elif a in VALUE_FLAGS:
            flags += [a, next(it)]
        elif a.startswith("-"):
            flags.append(a)
        else:
            overrides.append(a)
    if "--help" in flags or "-h" in flags:
        code, _, err = _call_cli([cmd, *flags])
        assert code == 0, err[-2000:]
        return
    swept = [(o.partition("=")[0], split_top(o.partition("=")[2])) for o in overrides]
    for key, value in _sweeper_params(overrides).items() if multirun else ():  # what -m adds: the experiment's grid
        if key not in {k for k, _ in swept}:  # (its first value: tests/test_config.py checks every value of every grid)
            swept.append((key, split_top(str(value))[:1]))
    for i in range(max([len(v) for _, v in swept] or [1])):
        chosen = [f"{k}={v[i % len(v)]}" for k, v in swept]
        code, out, err = _call_cli([cmd, *flags, "--cfg", view, *chosen])
        assert code == 0, f"promptdg {cmd} {' '.join(flags + chosen)} --cfg {view}:\n{err[-3000:]}"
        if view == "job":
            _check_domains(yaml.safe_load(out), chosen)


def _sweeper_params(overrides) -> dict:
    """``hydra.sweeper.params`` of the experiment an override names (conf/experiment/<name>.yaml): the
    grid ``-m`` sweeps, which a composition without ``-m`` leaves out (the command line's values win)."""
    name = next((o.partition("=")[2] for o in overrides if o.startswith("experiment=")), None)
    if name is None:
        return {}
    exp = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    return ((exp.get("hydra") or {}).get("sweeper") or {}).get("params") or {}


def _check_domains(cfg: dict, chosen):
    domains = (cfg.get("dataset") or {}).get("domains") or []
    named = [cfg.get("target")] + list(cfg.get("source") or [])
    bad = [d for d in named if d is not None and domains and d not in domains]
    assert not bad, f"{' '.join(chosen)}: {bad} not a domain of dataset={cfg['dataset']['name']} ({domains})"


def check_promptdg(args):
    if not args or args[0] in ("-h", "--help", "-V", "--version"):
        code, out, err = _call_cli(args)
        assert code == 0 and out, err
    elif args[0] in HYDRA_COMMANDS:
        check_hydra(args[0], args[1:])
    elif args[0] == "collect":
        parsed = build_parser().parse_args(args[1:])  # argparse exits on an unknown option
        parse_filters(parsed.filters)  # raises on an unknown filter key
    else:
        pytest.fail(f"promptdg {args[0]}: not a promptdg command")


HELP: dict = {}  # script -> its --help process, started once for the module (they import torch: seconds each)


@pytest.fixture(scope="module")
def help_of_every_documented_script():
    """Start every documented script's ``--help`` at once, to run while the in-process checks run."""
    for _, _, command in COMMANDS:
        for seg in segments(tokens(command)):
            words = [w for w in seg if not ENV_PREFIX.match(w)]
            if (
                len(words) > 1
                and words[0] in ("python", "python3")
                and words[1] != "-m"
                and (REPO / words[1]).is_file()
            ):
                HELP.setdefault(words[1], subprocess.Popen([sys.executable, str(REPO / words[1]), "--help"], cwd=REPO,
                                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield
    for proc in HELP.values():
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.kill()


def _help(script: str):
    proc = HELP.get(script) or subprocess.Popen([sys.executable, str(REPO / script), "--help"], cwd=REPO,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if isinstance(proc, subprocess.Popen):
        out, err = proc.communicate(timeout=120)
        HELP[script] = proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return proc


def check_python(args):
    if args[0] == "-m":
        if args[1] == "promptdg_cli":
            return check_promptdg(args[2:])
        import importlib.util

        assert importlib.util.find_spec(args[1]) is not None, f"python -m {args[1]}: no such module"
        return
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]}: no such script"
    done = _help(args[0])
    assert done.returncode == 0, done.stderr[-2000:]
    for opt in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
        assert opt in done.stdout, f"{args[0]}: --help names no {opt}"


def check_make(args):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]


def check_script(args):
    script = REPO / args[0]
    assert script.is_file() and script.stat().st_mode & 0o111, f"{args[0]}: no such executable script"
    if script.suffix == ".sh":
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def check(words):
    while words and words[0] in ("time", "nice", "env"):
        words.pop(0)
    prog, args = words[0], words[1:]
    if prog == "promptdg":
        check_promptdg(args)
    elif prog in ("python", "python3"):
        check_python(args)
    elif prog == "make":
        check_make(args)
    elif prog == "torchrun":
        at = args.index("-m")
        assert args[at + 1] == "promptdg_cli", args
        check_promptdg(args[at + 2:])
    elif prog == "sbatch":
        check_script([a for a in args if not a.startswith("-")][:1])
    elif "/" in prog:
        check_script([prog])
    else:
        assert prog in EXTERNAL, f"{prog}: no rule for this program (tests/test_docs.py: EXTERNAL, or a check)"


@pytest.mark.parametrize("path,line,command", COMMANDS, ids=[f"{p.name}:{n}" for p, n, _ in COMMANDS])
def test_every_documented_command_runs_as_far_as_it_can(
    path, line, command, tmp_path, monkeypatch, help_of_every_documented_script
):
    pipeline = segments(tokens(command))
    if PLACEHOLDER.search(" ".join(" ".join(seg) for seg in pipeline)):
        pytest.skip("a line the user edits (it holds a placeholder)")
    monkeypatch.setenv("PROMPTDG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROMPTDG_OUT", str(tmp_path / "outputs"))
    for rel, text in example_files(path).items():  # the doc's own example files, where its commands expect them
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.chdir(tmp_path)
    first, *rest = pipeline
    words = list(first)
    env = {}
    while words and ENV_PREFIX.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    for key, value in env.items():
        monkeypatch.setenv(key, value)
        if key == "PYTHONPATH":
            monkeypatch.syspath_prepend(str((tmp_path / value).resolve()))
    check(words)
    for seg in rest:  # after a pipe: another program reads the output
        assert seg[0] in EXTERNAL, f"{seg[0]}: no rule for this program"


def test_the_documented_python_examples_import(tmp_path, monkeypatch):
    """The Python files the docs ask a user to write (README: "Extending promptdg") import as written."""
    import importlib

    files = {rel: text for p in DOCS for rel, text in example_files(p).items() if rel.endswith(".py")}
    assert files, "the README's extending example names its file in its first line"
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for rel in files:
        importlib.import_module(rel[:-3].replace("/", "."))


# --------------------------------------------------------------------- generated blocks
@pytest.mark.parametrize("name", sorted(render_docs.BLOCKS))
def test_each_generated_block_is_its_source_rendered(name):
    block = render_docs.BLOCKS[name]
    committed = render_docs.committed(block.doc.read_text(), name)
    assert committed is not None, f"{block.doc.name}: no markers for the {name} block"
    assert committed == block.render(), f"{block.doc.name} differs from {block.source}: run python tools/render_docs.py"


FIXTURE = REPO / "tests" / "data" / "bench_result_tiny.json"


def test_speed_renders_the_json_that_bench_py_writes(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    shutil.copy(FIXTURE, results / "cpu.json")
    r = json.loads(FIXTURE.read_text())
    text = render_docs.render_speed(results)
    assert text.startswith("### `cpu.json`") and r["cpu"] in text and r["cpu_capability"] in text
    for key, label in (("coop_step", "CoOp step"), ("dapl_step", "DAPL step"), ("dapt_step", "DAPT step"),
                       ("promptstyler_iteration", "PromptStyler style iteration")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {r[key]['official_s']:.2f} |" in row
        step = r[key].get("promptdg_augmented_s", r[key]["promptdg_s"])  # CoOp, DAPL: the official protocol's step
        assert f"| {step:.3f} |" in row and "yes:" in row
    dapl = r["dapl_step"]
    assert f"{dapl['speedup_augmented_sweep']:.1f}x with views shared by {dapl['view_share']} runs" in text
    assert f"| {r['coop_step']['promptdg_s']:.3f} | {r['coop_step']['speedup']:.1f}x |" in text  # the cheaper protocol
    assert f"| {r['promptstyler_iteration']['projected_training']['official_h']:.2f} |" in text
    assert "Feature-cache extraction" in text and "DomainFusion's LDM work" in text and "DomainNet sweep" in text


def test_the_speed_check_fails_when_the_json_and_the_doc_disagree(tmp_path, monkeypatch, capsys):
    results, doc = tmp_path / "results", tmp_path / "speed.md"
    results.mkdir()
    shutil.copy(FIXTURE, results / "cpu.json")
    block = render_docs.Block("speed", doc, "results/*.json", lambda: render_docs.render_speed(results))
    monkeypatch.setitem(render_docs.BLOCKS, "speed", block)
    doc.write_text(f"# Speed\n\n{render_docs.begin('speed', block.source)}\n{render_docs.end('speed')}\n")
    assert render_docs.main(["--check", "--only", "speed"]) == 1  # empty block: differs
    assert render_docs.main(["--only", "speed"]) == 0 and render_docs.main(["--check", "--only", "speed"]) == 0
    r = json.loads(FIXTURE.read_text())
    r["dapl_step"]["official_s"] *= 2  # a new measurement, the doc not rendered again
    (results / "cpu.json").write_text(json.dumps(r))
    assert render_docs.main(["--check", "--only", "speed"]) == 1
    assert "differs from results/*.json" in capsys.readouterr().out


# --------------------------------------------------------------------- the README and the links
def test_the_readme_is_a_manual():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300, "the README is a manual: its details belong in docs/"
    first = [c for p, _, c in COMMANDS if p.name == "README.md"][:2]
    assert [c.split("#")[0].strip() for c in first] == ["make demo", "make test"]


def _anchors(path: Path):
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in path.read_text().splitlines() if re.match(r"^#{1,6} ", line)}


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_relative_link_resolves(path):
    text = path.read_text()
    code = {n for _, first, lines in fenced_blocks(text) for n in range(first, first + len(lines))}
    prose = "\n".join(line for n, line in enumerate(text.splitlines(), 1) if n not in code)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: link to {target}: no such heading in {dest.name}"
