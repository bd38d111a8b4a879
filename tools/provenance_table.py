"""conf/provenance.yaml as markdown: one table per trained method, each row a hyper-parameter with the
paper's value, the official code's, promptdg's default and why. ``tools/render_docs.py`` writes the
tables into docs/methods.md and DomainBed's two into docs/domainbed.md (between generated-block
markers); tests/test_provenance.py compares every keyed row's default with the composed config,
and tests/test_docs.py the doc with this render.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "conf" / "provenance.yaml"
METHOD_ORDER = ("coop", "promptstyler", "dapl", "dapt", "erm", "domainfusion")
DOMAINBED_ORDER = ("erm", "domainfusion")  # docs/domainbed.md's tables


def load(path: Path = SOURCE) -> dict:
    return yaml.safe_load(path.read_text())


def _cell(v) -> str:
    if v is None:
        return "null"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace("|", "\\|")


def render(prov: dict, order=METHOD_ORDER) -> str:
    out = []
    for m in order:
        t = prov[m]
        out += [f"**{t['title']}**: `method={m}`. Official code: {t['official']}. Defaults read with "
                f"`{' '.join(t['compose'])}`.", "",
                "| hyper-parameter | paper | official code | promptdg default | why |", "|:---|:---|:---|:---|:---|"]
        for r in t["rows"]:
            key = f" (`{r['key']}`)" if r.get("key") else ""
            out.append(
                f"| {_cell(r['name'])}{key} | {_cell(r['paper'])} | {_cell(r['official'])} "
                f"| {_cell(r['default'])} | {_cell(r['why'])} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"
