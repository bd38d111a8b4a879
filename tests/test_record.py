"""The run record schema (promptdg_cli/record.py) and collect's use of it (no torch, no data)."""
from __future__ import annotations

import json
import math

import pytest

from promptdg_cli.collect import main as collect_main
from promptdg_cli.record import RECORD_VERSION, RecordError, RecordVersionError, RunRecord, Status


def v1_finished(**changes) -> dict:
    """A finished DomainFusion run's results.json exactly as the engine wrote it before the schema had
    a number (version 1): no record_version, no source_free, the method's counters at the top level."""
    rec = {
        "status": "finished", "method": "domainfusion", "variant": "", "dataset": "demo_digits",
        "backbone": "demo_clip", "model": "demo-clip-vit", "pretrained": "/tmp/random-demo-clip.safetensors",
        "protocol": "dg", "seed": 1, "domains": ["handwritten", "printed", "sketch", "photo"],
        "config_hash": "f255fe0430", "run_dir": "/out/demo_digits/domainfusion/demo_clip/seed1_sketch_f255fe0430",
        "version": "0.1.0", "git_revision": "b01027198f7d", "host": "vm", "shots": None,
        "target_domains": ["sketch"], "source_domains": {"sketch": ["handwritten", "printed", "photo"]},
        "accuracy": {"sketch": 10.0}, "val_accuracy": {"sketch": 12.5},
        "generated_images": 384, "synthetic_images": 192, "avg_accuracy": 10.0,
        "timings": {"train_s": 11.08, "eval_s": 1.37, "total_s": 14.01},
        "peak_memory_mb": {"cpu_rss": 678.9, "cuda": None}, "feature_cache": {"hits": 0, "misses": 4},
    }
    rec.update(changes)
    return rec


def v1_failed_by_the_cli() -> dict:
    """commands._write_failed_record's version-1 record: no version/git_revision/host, nulls allowed."""
    return {
        "status": "failed", "method": "zeroshot", "variant": "", "dataset": "demo_digits", "backbone": "demo_clip",
        "model": "demo-clip-vit", "pretrained": "None", "protocol": "dg", "seed": 1, "domains": [],
        "target_domains": ["nope"], "config_hash": None, "run_dir": "/out/x",
        "error": "ConfigError: target='nope' is not a domain", "traceback": "Traceback ...",
    }


def v1_reevaluated() -> dict:
    """engine._reevaluate_split_dataset's record: evaluated_run, trained_on, class_subset; no val/feature cache."""
    return {
        "status": "finished", "method": "coop", "variant": "", "dataset": "imagenet_a", "backbone": "vit_b16",
        "model": "ViT-B-16-quickgelu", "pretrained": "openai", "protocol": "fewshot", "seed": 1, "domains": [],
        "config_hash": "0a1b2c3d4e", "run_dir": "/out/evaluated/x", "version": "0.1.0", "git_revision": "abc",
        "host": "node01", "shots": 16, "evaluated_run": "/out/imagenet/coop/run", "trained_on": "imagenet",
        "target_domains": ["imagenet_a"], "source_domains": {"imagenet_a": ["imagenet"]},
        "accuracy": {"imagenet_a": 31.2}, "avg_accuracy": 31.2, "class_subset": 200,
        "timings": {"total_s": 3.0}, "peak_memory_mb": {"cpu_rss": 900.0, "cuda": 2048.5},
    }


TAG = "openai"  # a pretrained tag as a record names it (no weights are loaded here)


def finished_record() -> RunRecord:
    return RunRecord(
        status=Status.FINISHED, method="coop", variant="", dataset="pacs", backbone="vit_b16",
        model="ViT-B-16-quickgelu", pretrained=TAG, protocol="dg", seed=2, domains=["art_painting", "sketch"],
        config_hash="deadbeef00", run_dir="/out/pacs/coop/vit_b16/seed2", version="0.1.0", host="node01",
        target_domains=["sketch"], source_domains={"sketch": ["art_painting"]}, accuracy={"sketch": 71.25},
        mean_per_class_accuracy={"sketch": 70.0}, avg_accuracy=71.25, timings={"train_s": 1.0, "total_s": 2.5},
        peak_memory_mb={"cpu_rss": 800.0, "cuda": None}, extra={"generated_images": 12},
    )


# --------------------------------------------------------------------- round trip
def test_round_trip_to_dict_from_dict_and_the_file(tmp_path):
    rec = finished_record()
    d = rec.to_dict()
    # written by hand: the JSON shape (flat, extras at the top level, every field present)
    assert d["record_version"] == 3 == RECORD_VERSION and d["status"] == "finished"
    assert d["accuracy"] == {"sketch": 71.25} and d["source_domains"] == {"sketch": ["art_painting"]}
    assert d["generated_images"] == 12 and "extra" not in d
    assert d["error"] is None and d["shots"] is None and d["source_free"] is False
    assert list(d)[:3] == ["record_version", "status", "method"]
    assert json.loads(json.dumps(d)) == d  # plain JSON data (the status is the word, not an enum)

    again = RunRecord.from_dict(d)
    assert again == rec and again.extra == {"generated_images": 12} and again.status is Status.FINISHED

    path = tmp_path / "run" / "results.json"
    rec.write(path)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
    assert json.loads(path.read_text()) == d
    assert RunRecord.read(path) == rec

    d["accuracy"]["sketch"] = 0.0  # to_dict's containers are copies: the record is unchanged
    assert rec.accuracy == {"sketch": 71.25}


def test_status_is_a_word():
    assert str(Status.PREEMPTED) == "preempted" and Status("failed") is Status.FAILED
    rec = RunRecord(status="preempted", error="stopped by SIGTERM at a checkpoint; rerun the same command to resume")
    assert rec.status is Status.PREEMPTED and rec.to_dict()["status"] == "preempted"


def test_counters_add_up_and_never_shadow_a_field():
    rec = finished_record()
    rec.add_counters({"generated_images": 30, "synthetic_images": 5})
    assert rec.extra == {"generated_images": 42, "synthetic_images": 5}
    with pytest.raises(RecordError, match="'extra.seed'"):
        rec.add_counters({"seed": 1})
    with pytest.raises(RecordError, match="'extra.accuracy'"):
        RunRecord(status="running", extra={"accuracy": 1.0})


# --------------------------------------------------------------------- version 2 and 3
def v2_finished() -> dict:
    """A version-2 record as promptdg wrote it before version 3: every field of its time, no
    environment, git_dirty, git_diff_sha256 or weights."""
    d = finished_record().to_dict()
    for key in ("environment", "git_dirty", "git_diff_sha256", "weights"):
        d.pop(key)
    return dict(d, record_version=2)


def test_version_2_records_read_with_the_version_3_fields_null(tmp_path):
    rec = RunRecord.from_dict(v2_finished())
    assert rec.record_version == 2 and rec.accuracy == {"sketch": 71.25}
    assert rec.environment is None and rec.git_dirty is None and rec.git_diff_sha256 is None and rec.weights is None
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(v2_finished()))
    assert collect_main([str(tmp_path)]) == 0  # collect reads it as it is


def test_version_3_fields_are_checked():
    env = {"torch": "2.13.0", "cuda": None, "cpu_capability": "AVX2"}
    weights = {
        "kind": "hf-hub",
        "id": "hf-hub:org/repo@abc/open_clip_model.safetensors",
        "repo": "org/repo",
        "revision": "abc",
    }
    d = dict(finished_record().to_dict(), environment=env, git_dirty=True, git_diff_sha256="0" * 64, weights=weights)
    rec = RunRecord.from_dict(d)
    assert rec.environment == env and rec.weights["revision"] == "abc" and rec.to_dict() == d
    with pytest.raises(RecordError, match=r"field 'environment.torch' is 2.13; expected a string or null"):
        RunRecord.from_dict(dict(d, environment={"torch": 2.13}))
    with pytest.raises(RecordError, match=r"field 'git_dirty' is 'yes'; expected true or false"):
        RunRecord.from_dict(dict(d, git_dirty="yes"))
    with pytest.raises(RecordError, match=r"field 'weights' is 'openai'; expected an object"):
        RunRecord.from_dict(dict(d, weights="openai"))


# --------------------------------------------------------------------- version 1
@pytest.mark.parametrize("make", [v1_finished, v1_failed_by_the_cli, v1_reevaluated])
def test_version_1_records_as_written_today_are_read(make):
    d = make()
    rec = RunRecord.from_dict(d)
    assert rec.record_version == 1
    out = rec.to_dict()
    assert {k: out[k] for k in d} == d  # every key and value kept, unknown keys included
    assert set(out) - set(d) <= {"record_version", *[k for k in out if out[k] is None or out[k] is False]}


def test_version_1_fields_land_where_they_belong():
    rec = RunRecord.from_dict(v1_finished())
    assert rec.status is Status.FINISHED and rec.seed == 1 and rec.accuracy == {"sketch": 10.0}
    assert rec.extra == {"generated_images": 384, "synthetic_images": 192}
    assert rec.peak_memory_mb == {"cpu_rss": 678.9, "cuda": None} and rec.source_free is False
    ev = RunRecord.from_dict(v1_reevaluated())
    assert (ev.evaluated_run, ev.trained_on, ev.class_subset, ev.extra) == (
        "/out/imagenet/coop/run",
        "imagenet",
        200,
        {},
    )
    failed = RunRecord.from_dict(v1_failed_by_the_cli())
    assert failed.config_hash is None and failed.error.startswith("ConfigError")


def test_device_and_precision_are_fields_a_record_before_them_lacks():
    rec = RunRecord.from_dict(v1_finished(device="cuda:1", precision="bf16"))
    assert (rec.device, rec.precision) == ("cuda:1", "bf16") and "device" not in rec.extra
    assert rec.to_dict()["device"] == "cuda:1"
    old = RunRecord.from_dict(v1_finished())
    assert old.device is None and old.precision is None


# --------------------------------------------------------------------- errors
def _without(key):
    d = v1_finished()
    del d[key]
    return d


@pytest.mark.parametrize("d, field, shown, expected", [
    (v1_finished(seed="1"), "seed", "'1'", "an integer"),
    (v1_finished(seed=True), "seed", "True", "an integer"),
    (v1_finished(accuracy={"sketch": "high"}), "accuracy.sketch", "'high'", "a finite number"),
    (v1_finished(accuracy={}), "accuracy", "{}", "a non-empty object"),
    (v1_finished(avg_accuracy=math.nan), "avg_accuracy", "nan", "a finite number"),
    (v1_finished(domains=["sketch", 3]), "domains[1]", "3", "a string"),
    (v1_finished(source_domains={"sketch": "photo"}), "source_domains.sketch", "'photo'", "a list of strings"),
    (v1_finished(status="done"), "status", "'done'", "one of running, finished, failed, preempted"),
    (v1_finished(feature_cache={"hits": 1.5}), "feature_cache.hits", "1.5", "an integer"),
    (v1_finished(method=""), "method", "''", "a non-empty string"),
    (v1_finished(device=0), "device", "0", "a string"),
    (v1_finished(record_version="2"), "record_version", "'2'", "an integer >= 1"),
])
def test_a_wrong_type_names_the_field_the_value_and_what_was_expected(d, field, shown, expected):
    with pytest.raises(RecordError) as info:
        RunRecord.from_dict(d, source="runs/x/results.json")
    e = info.value
    assert isinstance(e, ValueError) and e.field == field
    assert str(e).startswith(f"runs/x/results.json: field '{field}' is {shown}; expected {expected}")


@pytest.mark.parametrize("d, field, status", [
    (_without("accuracy"), "accuracy", "finished"),
    (_without("seed"), "seed", "finished"),
    (_without("timings"), "timings", "finished"),
    (v1_finished(run_dir=None), "run_dir", "finished"),  # null where a finished run needs a value
    ({"status": "failed", "method": "coop"}, "error", "failed"),
    ({"status": "preempted"}, "error", "preempted"),
    ({"method": "coop"}, "status", None),
])
def test_a_missing_required_field_is_named(d, field, status):
    with pytest.raises(RecordError) as info:
        RunRecord.from_dict(d)
    e = info.value
    assert e.missing and e.field == field
    assert f"field '{field}' is missing" in str(e)
    assert f"required in {'a ' + status if status else 'every'} record" in str(e)


def test_a_stopped_run_needs_only_its_status_and_error():
    rec = RunRecord.from_dict({"status": "failed", "error": "boom"})
    assert rec.accuracy is None and rec.method is None and rec.record_version == 1


def test_a_newer_version_is_refused_as_such():
    with pytest.raises(RecordVersionError) as info:
        RunRecord.from_dict(dict(v1_finished(), record_version=RECORD_VERSION + 1, new_field={"x": 1}), source="f.json")
    assert str(info.value) == (f"f.json: record_version {RECORD_VERSION + 1} is newer than this promptdg reads "
                               f"({RECORD_VERSION}); upgrade promptdg to read it")
    with pytest.raises(RecordError, match="'\\(top level\\)' is \\[1, 2\\]; expected a JSON object"):
        RunRecord.from_dict([1, 2])


# --------------------------------------------------------------------- collect
def test_collect_reports_and_skips_a_malformed_record_and_tables_the_good_ones(tmp_path, capsys):
    root = tmp_path / "runs"
    domains = ["art_painting", "sketch"]

    def good(seed, art, sketch):
        return v1_finished(
            method="coop",
            dataset="pacs",
            backbone="vit_b16",
            seed=seed,
            domains=domains,
            target_domains=domains,
            source_domains={"art_painting": ["sketch"], "sketch": ["art_painting"]},
            accuracy={"art_painting": art, "sketch": sketch},
            avg_accuracy=(art + sketch) / 2,
            val_accuracy={},
        )

    def put(name, text):
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(text)

    put("s1", json.dumps(good(1, 60.0, 80.0)))  # version 1, as written today
    RunRecord.from_dict(dict(good(2, 62.0, 84.0), record_version=2)).write(root / "s2" / "results.json")
    put("s3", json.dumps(good("3", 10.0, 10.0)))  # a string seed: would pull both cells down if guessed
    put("s4", json.dumps(dict(good(4, 10.0, 10.0), record_version=RECORD_VERSION + 1)))

    assert collect_main([str(root)]) == 0
    out, err = capsys.readouterr()
    # art: 60, 62 -> 61.0 ± sqrt(2) = 1.4; sketch: 80, 84 -> 82.0 ± sqrt(8) = 2.8;
    # Avg: seed 1 (60+80)/2 = 70, seed 2 (62+84)/2 = 73 -> 71.5 ± sqrt(4.5) = 2.1; 2 seeds, no (k/n) mark
    assert "| Method | Backbone | art_painting | sketch | Avg |" in out
    assert "| coop | vit_b16 | 61.0 ± 1.4 | 82.0 ± 2.8 | 71.5 ± 2.1 |" in out
    lines = err.splitlines()
    assert "promptdg collect: warning: skipped 2 unreadable or invalid results.json file(s):" in lines
    s3 = [l for l in lines if str(root / "s3" / "results.json") in l]
    s4 = [l for l in lines if str(root / "s4" / "results.json") in l]
    assert s3 == [f"  {root / 's3' / 'results.json'}: field 'seed' is '3'; expected an integer"]
    assert len(s4) == 1 and f"record_version {RECORD_VERSION + 1} is newer than this promptdg reads" in s4[0]
    assert "2 record(s) (2 finished, 0 not)" in err
