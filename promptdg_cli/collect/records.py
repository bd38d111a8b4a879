"""Reading and selecting run records for ``promptdg collect``: find every ``results.json``, read it
through :class:`~promptdg_cli.record.RunRecord` (a file that does not match the schema is reported
and skipped), the labels a record gets in a table (method label, backbone, UDA pair column), and
the ``key=value`` filters.

Records reach the tables as plain dictionaries (``RunRecord.to_dict()``), so that hand-built
mappings work too (the tables read only what they need, with defaults for what is absent).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Sequence, Tuple

from ..record import OPT_INS, RESULTS_NAME, RecordError, RunRecord

METRICS = ("accuracy", "mean_per_class_accuracy")
UDA = "uda"  # the protocol whose columns are source→target pairs
PAIR_ARROW = "→"

# Record fields a `key=value` filter may name; `label` is the table's method label and `domain`
# keeps only those target domains (columns).
FILTER_KEYS = (
    "method",
    "variant",
    "label",
    "backbone",
    "dataset",
    "protocol",
    "seed",
    "status",
    "domain",
    "model",
    "pretrained",
    "version",
    "git_revision",
    "config_hash",
)


class CollectError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class Loaded(NamedTuple):
    records: List[Dict[str, Any]]  # each with "_path" (the results.json) and "_mtime" added
    skipped: List[Tuple[str, str]]  # (path, reason) of unreadable or invalid files


def find_results(root: os.PathLike[str] | str) -> List[Path]:
    """Every ``results.json`` below ``root`` (recursively, sorted, symlinked dirs not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if RESULTS_NAME in files:
            found.append(Path(folder) / RESULTS_NAME)
    return found


def load_records(root: os.PathLike | str) -> Loaded:
    """Read every ``results.json`` below ``root``, each through :meth:`RunRecord.from_dict`.

    Returns ``(records, skipped)``: the records as dictionaries (:meth:`RunRecord.to_dict`, with
    ``_path`` and ``_mtime`` added; later files win when two runs measured the same row, seed and
    domain) and ``(path, reason)`` for files that could not be read, were not valid JSON, or do
    not match the record schema (the reason names the field, or says the record is of a newer
    version). A file that does not match is skipped, never guessed at.
    """
    records: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    for path in find_results(root):
        try:
            with open(path, "r", encoding="utf-8") as fh:
                data = json.load(fh)
            mtime = path.stat().st_mtime
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append((str(path), f"unreadable: {exc}"))
            continue
        except json.JSONDecodeError as exc:
            skipped.append((str(path), f"invalid JSON: {exc}"))
            continue
        try:
            record = RunRecord.from_dict(data).to_dict()
        except RecordError as exc:  # (RecordVersionError: a newer promptdg wrote it)
            skipped.append((str(path), str(exc)))
            continue
        record["_path"] = str(path)
        record["_mtime"] = mtime
        records.append(record)
    return Loaded(records, skipped)


def as_mapping(record: RunRecord | Mapping[str, Any]) -> Mapping[str, Any]:
    """A record as the tables read it: a :class:`RunRecord` as its JSON object, a mapping as is."""
    return record.to_dict() if isinstance(record, RunRecord) else record


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def parse_filters(args: Sequence[str]) -> Dict[str, List[str]]:
    """``["method=coop,dapl", "seed=1"]`` -> ``{"method": ["coop", "dapl"], "seed": ["1"]}``.

    Repeating a key adds values. Raises :class:`CollectError` for a malformed argument or a key
    not in :data:`FILTER_KEYS` (the message names the valid keys).
    """
    filters: Dict[str, List[str]] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CollectError(f"filter {arg!r} is not key=value (valid keys: {', '.join(FILTER_KEYS)})")
        if key not in FILTER_KEYS:
            raise CollectError(f"unknown filter key {key!r}; valid keys: {', '.join(FILTER_KEYS)}")
        filters.setdefault(key, []).extend(v.strip() for v in value.split(","))
    return filters


def method_label(record: Mapping[str, Any]) -> str:
    """``method``, ``method (variant)``, and the shot count when the run drew k shots per class:
    ``dapt (16-shot)`` (one row per method and shot count, the few-shot tables' shape); a run with an
    opt-in out of the official protocol (``opt_ins``: a cheaper protocol, a selection on test labels
    such as DomainBed's oracle rule) gets its own row, marked (``record.OPT_INS``)."""
    method = str(record.get("method") or "?")
    parts = [str(record["variant"])] if record.get("variant") else []
    if record.get("shots"):
        parts.append(f"{record['shots']}-shot")
    # opt-ins that leave the official protocol, with their mark (a row of their own, explained under the table)
    parts += [f"{o}{OPT_INS[o][0]}" if o in OPT_INS else str(o) for o in record.get("opt_ins") or []]
    return f"{method} ({', '.join(parts)})" if parts else method


def backbone_label(record: Mapping[str, Any]) -> str:
    return str(record.get("backbone") or record.get("model") or "?")


def domain_index(domains: Sequence[str], domain: str) -> Tuple[int, str]:
    """Sort key of a domain: its position in ``domains``, unknown ones after (alphabetically)."""
    return (domains.index(domain), "") if domain in domains else (len(domains), domain)


def pair_sources(record: Mapping[str, Any], target: str) -> Tuple[str, ...]:
    """A uda record's source domains for ``target`` in the record's ``domains`` order (or ())."""
    sources = record.get("source_domains")
    sources = sources.get(target) if isinstance(sources, dict) else None
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, (list, tuple)):
        return ()
    domains = [d for d in record.get("domains") or () if isinstance(d, str)]
    unique = list(dict.fromkeys(str(d) for d in sources if d is not None and str(d)))
    return tuple(sorted(unique, key=lambda d: domain_index(domains, d)))


def split_pair(key: str) -> Tuple[Tuple[str, ...], str]:
    """``"art+product→clipart"`` -> ``(("art", "product"), "clipart")``; a bare domain -> ``((), key)``."""
    if PAIR_ARROW not in key:
        return (), key
    sources, _, target = key.rpartition(PAIR_ARROW)
    return tuple(s for s in sources.split("+") if s), target


def column_label(record: Mapping[str, Any], target: str) -> str:
    """The table column of ``record``'s result on ``target``.

    The target itself, except for ``protocol == "uda"`` records: ``"<sources>→<target>"`` with the
    sources of ``source_domains[target]`` joined by ``+`` in the dataset's ``domains`` order (the
    bare target when the record does not name them).
    """
    if str(record.get("protocol") or "dg") != UDA or PAIR_ARROW in target:
        return target  # a record keyed by pair ("art→clipart", several pairs per run) names its column
    sources = pair_sources(record, target)
    return "+".join(sources) + PAIR_ARROW + target if sources else target


def field_text(record: Mapping[str, Any], key: str) -> str:
    if key == "label":
        return method_label(record)
    if key == "backbone":
        return backbone_label(record)
    value = record.get(key)
    if key == "status" and value is None:
        value = "finished"
    return "" if value is None else str(value)


def filter_records(records: Iterable[Mapping[str, Any]], filters: Mapping[str, Sequence[str]]) -> List[Dict[str, Any]]:
    """Keep records whose field equals one of the given values (compared as text).

    ``domain`` keeps only those target domains: a finished record's accuracy dictionaries are
    restricted (the record is dropped when nothing is left); a failed record is kept when it
    targeted one of them or does not say what it targeted.
    """
    unknown = [k for k in filters if k not in FILTER_KEYS]
    if unknown:
        raise CollectError(f"unknown filter key {unknown[0]!r}; valid keys: {', '.join(FILTER_KEYS)}")
    kept: List[Dict[str, Any]] = []
    for record in map(as_mapping, records):
        if not all(field_text(record, k) in set(v) for k, v in filters.items() if k != "domain"):
            continue
        if "domain" in filters:
            wanted = set(filters["domain"])
            if record.get("status", "finished") == "finished":
                record = dict(record)
                for metric in METRICS + ("val_accuracy",):
                    if isinstance(record.get(metric), dict):
                        record[metric] = {d: v for d, v in record[metric].items() if split_pair(d)[1] in wanted}
                if not record.get("accuracy"):
                    continue
            else:
                targets = record.get("target_domains") or []
                if targets and not wanted.intersection(targets):
                    continue
        kept.append(dict(record))
    return kept
