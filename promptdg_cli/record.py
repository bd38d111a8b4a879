"""The run record: what a run directory's ``results.json`` holds, as one typed dataclass.

Every writer (the engine's finished, failed and preempted runs, re-evaluations, the record of a job
that failed before the engine started) builds a :class:`RunRecord` and writes :meth:`RunRecord.to_dict`;
every reader (``promptdg collect``) goes through :meth:`RunRecord.from_dict`, which checks types and
required fields and raises :class:`RecordError` naming the field, the value and what was expected.

Versions. ``record_version`` is the schema's version (the package's own version is ``version``).
Records written before the schema had a number carry no ``record_version``: they are version 1 and
have the same keys as version 2, which adds ``record_version`` and writes every field (``null``
where a run has no value). Version 3 adds what exactly ran: ``environment`` (package versions,
CUDA/cuDNN, CPU capability, GPU), ``git_dirty`` and ``git_diff_sha256`` (the source tree), and
``weights`` (the CLIP weights as loaded: an ``hf-hub:`` repository and commit, a file, a tag), and
the protocol as run: ``protocol_details`` and ``opt_ins`` (choices that leave the official protocol,
:data:`OPT_INS`); a version 1 or 2 record reads with those fields null. A record of a newer version than
:data:`RECORD_VERSION` is refused with :class:`RecordVersionError` (a newer promptdg wrote it).

Which fields a record must have depends on its ``status``: every record has ``status``; a failed or
preempted one its ``error``; a finished one its identity (method ... run_dir), its results
(target and source domains, a non-empty ``accuracy``, ``avg_accuracy``), ``timings`` and
``peak_memory_mb``. Other fields may be null, but a value that is there has the declared type.
Keys the schema does not name (a method's counters, e.g. DomainFusion's ``generated_images``) are
kept in :attr:`RunRecord.extra` and written back at the top level.

No torch here: ``collect`` and ``tools/gen_records.py`` import this module alone.
"""
from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .files import write_json_atomic

RECORD_VERSION = 3  # the schema version this code writes and the newest it reads
RESULTS_NAME = "results.json"


class Status(str, enum.Enum):
    """A run's state; the JSON value is the lower-case word."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    PREEMPTED = "preempted"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in Status)


class RecordError(ValueError):
    """A record that does not match the schema: names the field, the value and what was expected."""

    def __init__(self, field_name: str, value: Any, expected: str, source: Optional[str] = None, missing: bool = False):
        self.field, self.value, self.expected, self.source, self.missing = field_name, value, expected, source, missing
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if self.missing:
            return f"{where}field {self.field!r} is missing; expected {self.expected}"
        return f"{where}field {self.field!r} is {_short(self.value)}; expected {self.expected}"

    def with_source(self, source: Optional[str]) -> "RecordError":
        """The same error, its message prefixed with the file it came from."""
        if source is None:
            return self
        err = type(self)(self.field, self.value, self.expected, source=str(source), missing=self.missing)
        err.__cause__ = self.__cause__
        return err


class RecordVersionError(RecordError):
    """A record of a newer schema version than this promptdg reads."""

    def _message(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return (f"{where}record_version {self.value!r} is newer than this promptdg reads ({RECORD_VERSION}); "
                f"{self.expected}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------- value checks
# A check returns None when the value fits, else (where inside the value, the offending part, what
# that part should be: None when it is the whole value, whose expectation the field states).
Problem = Optional[Tuple[str, Any, Optional[str]]]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar(test: Callable[[Any], bool]) -> Callable[[Any], Problem]:
    return lambda v: None if test(v) else ("", v, None)


def _list_of(test: Callable[[Any], bool], item: str) -> Callable[[Any], Problem]:
    def check(v):
        if not isinstance(v, list):
            return "", v, None
        for i, x in enumerate(v):
            if not test(x):
                return f"[{i}]", x, item
        return None
    return check


def _mapping_of(test: Callable[[Any], bool], item: str, nonempty: bool = False) -> Callable[[Any], Problem]:
    def check(v):
        if not isinstance(v, dict) or (nonempty and not v):
            return "", v, None
        for k, x in v.items():
            if not isinstance(k, str):  # (never from JSON; a dict built in Python may have them)
                return "", v, None
            if not test(x):
                return f".{k}", x, item
        return None
    return check


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_STR = (_scalar(lambda v: isinstance(v, str)), "a string")
_NAME = (_scalar(lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
_INT = (_scalar(_is_int), "an integer")
_NUMBER = (_scalar(_is_number), "a finite number")
_BOOL = (_scalar(lambda v: isinstance(v, bool)), "true or false")
_STR_LIST = (_list_of(lambda v: isinstance(v, str), "a string"), "a list of strings")
_SCORES = (_mapping_of(_is_number, "a finite number"), "an object of finite numbers (name -> %)")
_NUMBERS = (_mapping_of(_is_number, "a finite number"), "an object of finite numbers")
_TEXTS = (_mapping_of(lambda v: v is None or isinstance(v, str), "a string or null"), "an object of strings or nulls")
_OBJECT = (_scalar(lambda v: isinstance(v, dict)), "an object")

FINISHED = frozenset({Status.FINISHED})
STOPPED = frozenset({Status.FAILED, Status.PREEMPTED})
EVERY = frozenset(Status)


def _spec(check, need=frozenset(), default=None):
    """A field of the schema: its check and the statuses that require a (non-null) value."""
    return field(default=default, metadata={"check": check[0], "expected": check[1], "need": need})


# --------------------------------------------------------------------- the record
@dataclass(kw_only=True)
class RunRecord:
    """One run's ``results.json``. Construct with keywords; the record validates itself (and again
    on :meth:`write`), so an invalid record is never written."""

    record_version: int = _spec(_INT, EVERY, default=RECORD_VERSION)
    status: Status = _spec((_scalar(lambda v: v in STATUSES), "one of " + ", ".join(STATUSES)), EVERY, default=None)
    # ---- identity: what ran, where, from which code
    method: Optional[str] = _spec(_NAME, FINISHED)
    variant: Optional[str] = _spec(_STR, FINISHED)  # "" when the method has none (shown in tables)
    dataset: Optional[str] = _spec(_NAME, FINISHED)
    backbone: Optional[str] = _spec(_STR, FINISHED)
    model: Optional[str] = _spec(_STR, FINISHED)  # open_clip model name
    pretrained: Optional[str] = _spec(_STR, FINISHED)  # open_clip tag or checkpoint path
    protocol: Optional[str] = _spec(_STR, FINISHED)  # dg | uda | fewshot
    seed: Optional[int] = _spec(_INT, FINISHED)
    domains: Optional[List[str]] = _spec(_STR_LIST, FINISHED)  # the dataset's domains, canonical order
    config_hash: Optional[str] = _spec(_STR, FINISHED)
    run_dir: Optional[str] = _spec(_STR, FINISHED)
    version: Optional[str] = _spec(_STR)  # the promptdg package version
    git_revision: Optional[str] = _spec(_STR)
    host: Optional[str] = _spec(_STR)
    shots: Optional[int] = _spec(_INT)  # k images per class; null: all
    device: Optional[str] = _spec(_STR)  # where it ran: cpu, cuda, cuda:N (requested, until the run has chosen)
    precision: Optional[str] = _spec(_STR)  # backbone.precision: fp32, or bf16/fp16 autocast on CUDA
    # float32 matmul precision set for the run (matmul_precision: highest = fp32, high = TF32 on CUDA)
    matmul_precision: Optional[str] = _spec(_STR)
    # image loading: num_workers used, how it was chosen (auto: the CPUs the job has), pin_memory
    data_loading: Optional[Dict[str, Any]] = _spec(_OBJECT)
    # ---- what exactly ran (version 3; promptdg_cli/environment.py, promptdg_cli/weights.py)
    # python, torch, torchvision, open_clip, diffusers, transformers, huggingface_hub, numpy, cuda, cudnn,
    # cpu_capability, cpu, gpu (null: not installed, not built with, not used)
    environment: Optional[Dict[str, Optional[str]]] = _spec(_TEXTS)
    git_dirty: Optional[bool] = _spec(_BOOL)  # promptdg's tree had uncommitted changes (null: not a git checkout)
    # SHA-256 of those changes (git diff HEAD + untracked files); null when clean
    git_diff_sha256: Optional[str] = _spec(_STR)
    # the CLIP weights as loaded: kind (hf-hub, local-dir, open_clip-tag, file, random-init), id (the
    # feature-cache key's name for them), repo and revision (a commit) where they come from a hub repository
    weights: Optional[Dict[str, Any]] = _spec(_OBJECT)
    # model selection: last, val (source validation), or an opt-in that reads test labels (target_test,
    # oracle: DomainBed's test-domain validation; collect marks the row); null for a method that selects nothing
    selection: Optional[str] = _spec(_STR)
    # ---- why a run did not finish
    error: Optional[str] = _spec(_STR, STOPPED)  # "<ExceptionType>: <message>"
    traceback: Optional[str] = _spec(_STR)
    # ---- results (% top-1 per tested domain; UDA runs key them by "source→target" pair)
    target_domains: Optional[List[str]] = _spec(_STR_LIST, FINISHED)
    source_domains: Optional[Dict[str, List[str]]] = _spec(
        (_mapping_of(_is_str_list, "a list of strings"), "an object of lists of strings (target -> sources)"), FINISHED)
    accuracy: Optional[Dict[str, float]] = _spec(
        (
            _mapping_of(_is_number, "a finite number", nonempty=True),
            "a non-empty object of finite numbers (domain -> %)",
        ),
        FINISHED,
    )
    mean_per_class_accuracy: Optional[Dict[str, float]] = _spec(_SCORES)
    val_accuracy: Optional[Dict[str, float]] = _spec(_SCORES)  # per split, on held-out source data
    oracle_accuracy: Optional[Dict[str, float]] = _spec(_SCORES)  # selection=oracle: per target, on its held-out part
    avg_accuracy: Optional[float] = _spec(_NUMBER, FINISHED)
    # ---- re-evaluations (promptdg eval run_dir=...) and source-free training
    evaluated_run: Optional[str] = _spec(_STR)  # the run whose saved models were evaluated
    trained_on: Optional[str] = _spec(_STR)  # that run's dataset, when it differs
    class_subset: Optional[int] = _spec(_INT)  # classes predicted among (ImageNet-A/R: 200)
    source_free: bool = _spec(_BOOL, EVERY, default=False)  # trained without images (PromptStyler)
    # ---- resources
    timings: Optional[Dict[str, float]] = _spec(_NUMBERS, FINISHED)  # train_s, eval_s, total_s
    peak_memory_mb: Optional[Dict[str, Optional[float]]] = _spec(
        (
            _mapping_of(lambda v: v is None or _is_number(v), "a finite number or null"),
            "an object of finite numbers or nulls",
        ),
        FINISHED,
    )
    # hits, misses
    feature_cache: Optional[Dict[str, int]] = _spec((_mapping_of(_is_int, "an integer"), "an object of integers"))
    # unreadable files recovered from (a checkpoint, a cached feature file, a generated image): file, error, action
    recovered: Optional[List[Dict[str, Any]]] = _spec(
        (_list_of(lambda v: isinstance(v, dict), "an object"), "a list of objects")
    )
    # the data as used: unreadable images skipped and empty class folders (by dataset/domain), shots
    # drawn per class (by split)
    data_used: Optional[Dict[str, Any]] = _spec((_scalar(lambda v: isinstance(v, dict)), "an object"))
    # ---- the protocol as run: augmentation, selection, epochs, templates ... (the method config's protocol
    # keys) and the opt-ins that leave the official protocol ("augment=none", "select=target_test": OPT_INS)
    protocol_details: Optional[Dict[str, Any]] = _spec((_scalar(lambda v: isinstance(v, dict)), "an object"))
    opt_ins: Optional[List[str]] = _spec(_STR_LIST)
    # ---- keys the schema does not name (a method's counters): written back at the top level
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.status, str) and self.status in STATUSES:
            self.status = Status(self.status)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`RecordError` for the first field that does not fit the schema."""
        if not (_is_int(self.record_version) and 1 <= self.record_version):
            raise RecordError("record_version", self.record_version, "an integer >= 1")
        if self.record_version > RECORD_VERSION:
            raise RecordVersionError("record_version", self.record_version, "upgrade promptdg to read it")
        status = self.status
        for f in fields(self):
            if f.name in ("record_version", "extra"):
                continue
            value = getattr(self, f.name)
            if value is None:
                if status in f.metadata["need"] or f.name == "status":
                    need = "every" if f.metadata["need"] == EVERY else f"a {status.value}"
                    raise RecordError(
                        f.name, None, f"{f.metadata['expected']} (required in {need} record)", missing=True
                    )
                continue
            problem = f.metadata["check"](value)
            if problem is not None:
                where, bad, item = problem
                raise RecordError(f.name + where, bad, item or f.metadata["expected"])
        if not isinstance(self.extra, dict):
            raise RecordError("extra", self.extra, "an object")
        for key in self.extra:
            if not isinstance(key, str) or key in JSON_FIELDS:
                raise RecordError(f"extra.{key}", self.extra[key], "a key the schema does not name")

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        """The JSON object written as ``results.json``: every schema field, then the extra keys."""
        out = {name: _plain(getattr(self, name)) for name in JSON_FIELDS}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Any, source: Optional[str] = None) -> "RunRecord":
        """A record from its JSON object (version 1, 2 or 3). Raises :class:`RecordError` (a
        ``ValueError``) naming the field; :class:`RecordVersionError` for a newer version.
        ``source`` (the file) prefixes the message."""
        try:
            if not isinstance(d, dict):
                raise RecordError("(top level)", d, "a JSON object")
            known = {k: v for k, v in d.items() if k in JSON_FIELDS}
            extra = {k: v for k, v in d.items() if k not in JSON_FIELDS}
            known.setdefault("record_version", 1)  # written before the schema had a number
            return cls(**known, extra=extra)
        except RecordError as e:
            raise e.with_source(source) from None

    @classmethod
    def read(cls, path: Path) -> "RunRecord":
        """``path``'s record. OSError and json.JSONDecodeError pass through; RecordError names the file."""
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_dict(data, source=str(path))

    def write(self, path: Path) -> None:
        """Validate, then write atomically (a reader never sees a partial file)."""
        self.validate()
        write_json_atomic(Path(path), self.to_dict())

    # ----------------------------------------------------------------- building
    def add_counters(self, counts: Mapping[str, float]) -> None:
        """Add a method's counters (``extra_results()``) to ``extra``, summing over splits."""
        for key, value in counts.items():
            if key in JSON_FIELDS:
                raise RecordError(f"extra.{key}", value, "a counter name the schema does not use")
            self.extra[key] = self.extra.get(key, 0) + value


def _plain(value: Any) -> Any:
    """A field's value as JSON data (fresh containers: the record stays unshared)."""
    if isinstance(value, Status):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


JSON_FIELDS = tuple(f.name for f in fields(RunRecord) if f.name != "extra")

# Method-config choices that leave the official protocol: promptdg's cheaper protocols and anything that
# reads test labels. A run records them (``opt_ins``) and ``collect`` marks its row with the mark.
OPT_INS = {
    "augment=none": ("*", "promptdg's cheaper protocol: no augmentation (the un-augmented cached features)"),
    "augment=views": (
        "*",
        "promptdg's cheaper protocol: K augmented views per image encoded once, not a fresh view per epoch",
    ),
    "select=target_test": (
        "†",
        "the epoch is selected on the target's test labels (a parity opt-in; the official DAPL code does it)",
    ),
    "select=oracle": (
        "‡",
        "DomainBed's test-domain validation (oracle) rule: it reads the test domain's held-out labels",
    ),
}
# the method-config keys a record lists in ``protocol_details`` (where the method has them)
PROTOCOL_KEYS = (
    "augment",
    "aug_views",
    "select",
    "epochs",
    "source_holdout",
    "templates",
    "prompt",
    "intra_loss",
    "lr_step",
)


def opt_ins_of(method_cfg: Mapping[str, Any]) -> List[str]:
    """The opt-ins (keys of :data:`OPT_INS`) a method config makes."""
    return [k for k in OPT_INS if str(method_cfg.get(k.split("=")[0])) == k.split("=")[1]]
