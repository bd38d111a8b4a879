"""The provenance of every default: conf/provenance.yaml against the composed configs, docs/methods.md's
tables against the file, and a source named next to every value in conf/method/*.yaml."""
import math
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from promptdg_cli.config import conf_dir, register_configs, register_resolvers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import provenance_table as table  # noqa: E402
import render_docs  # noqa: E402

PROV = table.load()
METHODS_DOC = render_docs.BLOCKS["provenance"].doc


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


@pytest.mark.parametrize("method", sorted(set(table.METHOD_ORDER) | set(table.DOMAINBED_ORDER)))
def test_every_keyed_row_is_the_composed_default(method):
    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(PROV[method]["compose"]))
    GlobalHydra.instance().clear()
    keyed = [r for r in PROV[method]["rows"] if r.get("key")]
    assert len(keyed) >= 8
    for row in keyed:
        got = OmegaConf.select(cfg, row["key"])
        got = OmegaConf.to_container(got, resolve=True) if OmegaConf.is_config(got) else got
        assert _same(got, row["default"]), (
            f"{method} {row['name']}: config {row['key']}={got!r}, table says {row['default']!r}"
        )
    for row in PROV[method]["rows"]:  # every row says where its value comes from
        assert {"name", "paper", "official", "default", "why"} <= set(row), row


def test_docs_methods_holds_the_rendered_tables():
    doc = render_docs.committed(METHODS_DOC.read_text(), "provenance")
    assert doc == table.render(PROV), "run: python tools/render_docs.py"


def test_the_table_check_fails_when_a_value_drifts():
    drifted = {m: dict(t, rows=[dict(r) for r in t["rows"]]) for m, t in PROV.items()}
    drifted["dapt"]["rows"][0]["default"] = 99
    assert table.render(drifted) != render_docs.committed(METHODS_DOC.read_text(), "provenance")


SOURCE = re.compile(r"\b(paper|official|promptdg|DomainBed|DreamFusion|CLIP)\b")


@pytest.mark.parametrize("path", sorted(p.name for p in (conf_dir() / "method").glob("*.yaml")))
def test_every_method_default_names_its_source(path):
    """Each `key: value` line of a method YAML names its source in its own comment, or in the comment
    block right above a run of such lines (a blank line, `defaults:` or `name:` ends a block)."""
    block = ""
    for line in (conf_dir() / "method" / path).read_text().splitlines():
        if not line.strip() or line.startswith(("defaults:", "name:")):
            block = ""
        elif line.startswith("#"):
            block += line
        else:
            m = re.match(r"^([a-zA-Z_]+):\s*(.*)$", line)
            if m and m.group(1) not in ("variant", "_target_"):  # (_target_ names the class, not a protocol value)
                assert SOURCE.search(line.partition("#")[2]) or SOURCE.search(block), (
                    f"{path}: {line!r} names no source"
                )
