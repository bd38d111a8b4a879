#!/usr/bin/env python3
"""Write the generated blocks of docs/*.md from their sources (``make docs``).

    python tools/render_docs.py           # rewrite every block from its source
    python tools/render_docs.py --check   # exit 1 if a committed block is not its rendered source

Each block sits between two markers in its doc and is never edited by hand:

* ``provenance`` in docs/methods.md, from conf/provenance.yaml (tools/provenance_table.py), and
  ``domainbed_provenance`` in docs/domainbed.md (its erm and domainfusion tables);
* ``datasets`` in docs/datasets.md, from conf/dataset/*.yaml (each config's header comment, folder,
  protocol, domains, classes and ``prepare`` text);
* ``speed`` in docs/speed.md, from the benchmark results in benchmarks/results/*.json (the JSON that
  ``benchmarks/bench.py --out`` writes; tables by benchmarks/bench_tables.py).

tests/test_docs.py runs the check.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "benchmarks")]  # provenance_table, bench_tables (torch-free)

import provenance_table  # noqa: E402
from bench_tables import machine, markdown_tables, other_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ROOT / "conf" / "dataset"


def begin(name: str, source: str) -> str:
    return (
        f"<!-- generated:{name} begin (python tools/render_docs.py writes this from {source}; edit that, not this) -->"
    )


def end(name: str) -> str:
    return f"<!-- generated:{name} end -->"


# --------------------------------------------------------------------- speed
def render_speed(results: Path = RESULTS) -> str:
    files = sorted(results.glob("*.json"))
    if not files:
        return ("No benchmark result is committed yet. `make bench` measures this machine, writes "
                "`benchmarks/results/cpu.json` and renders its tables here.\n")
    out: List[str] = []
    for path in files:
        r = json.loads(path.read_text())
        out += [f"### `{path.name}`", "",
                machine(r), "", markdown_tables(r), ""]
        more = other_tables(r)
        if more:
            out += [more, ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------- datasets
PROTOCOLS = {"dg": "DG (leave-one-domain-out)", "uda": "UDA", "fewshot": "few-shot"}


def _header(text: str) -> str:
    """The config's leading comment block, as one markdown paragraph (``<folder>`` and ``*`` escaped)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _classes(cfg: dict) -> str:
    if cfg.get("classes"):
        return str(len(cfg["classes"]))
    if cfg.get("classnames_file"):
        return f"from `{cfg['classnames_file']}`"
    return "from the split file"


def _folder(cfg: dict) -> str:
    root = (
        str(cfg.get("root", "${data_root}"))
        .replace("${data_root}", "$PROMPTDG_DATA")
        .replace("${cache_root}", "$PROMPTDG_CACHE")
    )
    return f"{root}/{cfg['folder']}"


def render_datasets(folder: Path = DATASETS) -> str:
    configs = [(p.stem, p.read_text()) for p in sorted(folder.glob("*.yaml"))]
    order = {"dg": 0, "uda": 1, "fewshot": 2}
    configs.sort(key=lambda c: (order.get(yaml.safe_load(c[1]).get("protocol", "dg"), 3), c[0]))
    out = ["| `dataset=` | folder | protocol | domains | classes |", "|:---|:---|:---|:---|:---|"]
    for name, text in configs:
        cfg = yaml.safe_load(text)
        domains = ", ".join(str(d) for d in cfg.get("domains") or []) or "–"
        out.append(
            f"| [`{name}`](#{name}) | `{_folder(cfg)}` "
            f"| {PROTOCOLS.get(cfg.get('protocol', 'dg'), cfg.get('protocol'))} | {domains} | {_classes(cfg)} |"
        )
    for name, text in configs:
        cfg = yaml.safe_load(text)
        out += ["", f"### {name}", "", _header(text) or "(no description)", ""]
        if cfg.get("prepare"):
            out += ["```text", cfg["prepare"].rstrip(), "```"]
        else:
            out.append(
                f"Nothing to prepare: `conf/dataset/{name}.yaml` names a generator, "
                f"and the images are made on first use."
            )
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------- the blocks
@dataclass(frozen=True)
class Block:
    name: str
    doc: Path
    source: str  # as the marker names it
    render: Callable[[], str]


BLOCKS: Dict[str, Block] = {b.name: b for b in (
    Block("provenance", ROOT / "docs" / "methods.md", "conf/provenance.yaml",
          lambda: provenance_table.render(provenance_table.load())),
    Block("domainbed_provenance", ROOT / "docs" / "domainbed.md", "conf/provenance.yaml",
          lambda: provenance_table.render(provenance_table.load(), provenance_table.DOMAINBED_ORDER)),
    Block("datasets", ROOT / "docs" / "datasets.md", "conf/dataset/*.yaml", render_datasets),
    Block("speed", ROOT / "docs" / "speed.md", "benchmarks/results/*.json", render_speed),
)}


def committed(text: str, name: str) -> Optional[str]:
    """The block ``name`` of a doc's text (None when its markers are missing)."""
    b = next((line for line in text.splitlines() if line.startswith(f"<!-- generated:{name} begin")), None)
    if b is None or end(name) not in text:
        return None
    a, z = text.index(b) + len(b), text.index(end(name))
    return text[a:z].strip("\n") + "\n"


def replaced(text: str, block: Block, body: str) -> str:
    old = next(line for line in text.splitlines() if line.startswith(f"<!-- generated:{block.name} begin"))
    a, z = text.index(old), text.index(end(block.name))
    return text[:a] + begin(block.name, block.source) + "\n" + body + text[z:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed block differs from its rendered source")
    ap.add_argument("--only", default=",".join(BLOCKS), help=f"comma-separated blocks: {', '.join(BLOCKS)}")
    args = ap.parse_args(argv)
    ok = True
    for name in args.only.split(","):
        block = BLOCKS[name]
        text, body = block.doc.read_text(), block.render()
        doc = block.doc.relative_to(ROOT) if block.doc.is_relative_to(ROOT) else block.doc
        current = committed(text, name)
        if current is None:
            print(f"{doc}: no markers for the generated block {name!r} ({begin(name, block.source)} ... {end(name)})")
            ok = False
        elif args.check:
            same = current == body
            ok &= same
            print(
                f"{doc}: {name} "
                f"{'is up to date' if same else f'differs from {block.source}: run python tools/render_docs.py'}"
            )
        elif current != body:
            block.doc.write_text(replaced(text, block, body))
            print(f"{doc}: rewrote {name} from {block.source}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
