#!/usr/bin/env python3
"""Render conf/provenance.yaml as the README's provenance tables (between the provenance markers).

    python scripts/provenance_table.py           # rewrite the block in README.md
    python scripts/provenance_table.py --check   # exit 1 if README.md's block is not the rendered one

tests/test_provenance.py runs the check and compares every row's default with the composed config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- provenance:begin (scripts/provenance_table.py renders this from conf/provenance.yaml) -->", "<!-- provenance:end -->"
METHOD_ORDER = ("coop", "promptstyler", "dapl", "dapt", "domainfusion")


def load(path: Path = ROOT / "conf" / "provenance.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def _cell(v) -> str:
    if v is None:
        return "null"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace("|", "\\|")


def render(prov: dict) -> str:
    out = []
    for m in METHOD_ORDER:
        t = prov[m]
        out += [f"**{t['title']}**: `method={m}`. Official code: {t['official']}. Defaults read with "
                f"`{' '.join(t['compose'])}`.", "",
                "| hyper-parameter | paper | official code | promptdg default | why |", "|:---|:---|:---|:---|:---|"]
        for r in t["rows"]:
            key = f" (`{r['key']}`)" if r.get("key") else ""
            out.append(f"| {_cell(r['name'])}{key} | {_cell(r['paper'])} | {_cell(r['official'])} | {_cell(r['default'])} | {_cell(r['why'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_block(text: str) -> str:
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[a:b].strip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text, table = readme.read_text(), render(load())
    if args.check:
        ok = readme_block(text) == table
        print("README provenance tables are up to date" if ok else "README provenance tables differ: run scripts/provenance_table.py")
        return 0 if ok else 1
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:a] + "\n" + table + text[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
