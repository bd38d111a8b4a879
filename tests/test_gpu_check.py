"""scripts/gpu_check.py on the CPU with tiny sizes: the code path a GPU machine runs (every method
through the CLI, the timings both ways), so it cannot rot where no GPU is."""
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
gpu_check = pytest.importorskip("gpu_check")


def test_gpu_check_tiny_on_cpu_runs_every_method_and_both_ways_of_every_step(
    tmp_path, random_clip, tiny_ldm_dir, capsys
):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--sizes",
            "tiny",
            "--precision",
            "bf16",
            "--clip",
            str(random_clip),
            "--ldm",
            str(tiny_ldm_dir),
            "--per-class",
            "8",
            "--workers",
            "0",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    assert code == 0 and res["ok"] and res["errors"] == [], res["errors"]
    assert set(res["runs"]) == set(gpu_check.METHODS)
    for method, run in res["runs"].items():
        rec = json.loads(Path(run["record"]).read_text())  # what the run itself wrote
        assert (rec["status"], rec["device"], rec["precision"], rec["method"]) == ("finished", "cpu", "bf16", method)
        assert rec["accuracy"] and run["avg_accuracy"] == rec["avg_accuracy"]
    # source-free
    assert res["runs"]["promptstyler"]["accuracy"].keys() == {"handwritten", "printed", "sketch", "photo"}
    assert list(res["runs"]["dapl"]["accuracy"]) == ["printed→photo"]
    t = res["timings"]
    for key in ("coop_step", "dapl_step", "dapt_step", "promptstyler_iteration"):
        step = t[key]
        assert step["check"]["equal"] and step["official_s"] > 0 and step["promptdg_s"] > 0
        assert step["official_cuda_peak_mb"] is None  # no CUDA figures on the CPU
    assert t["promptstyler_iteration"]["classes"] == 8 and t["promptstyler_iteration"]["earlier_styles"] == 2
    assert t["dapl_step"]["calls_official"] == 2 and t["dapl_step"]["prompts_official_per_call"] == 3 * 6
    assert t["feature_extraction"]["features"] == [16, 128] and t["feature_extraction"]["images_per_s"] > 0
    assert t["domainfusion"]["img2img"]["candidates_per_s"] > 0 and t["domainfusion"]["distillation"]["steps_per_s"] > 0


def test_gpu_check_exits_non_zero_and_records_a_failed_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--sizes", "tiny", "--only", "runs", "--methods", "zeroshot",
                           "--clip", str(tmp_path / "missing.safetensors"), "--per-class", "8", "--workers", "0",
                           "--work", str(tmp_path / "work"), "--out", str(out)])
    res = json.loads(out.read_text())
    assert code == 1 and not res["ok"]
    assert res["runs"]["zeroshot"] is None and res["errors"][0]["where"] == "run zeroshot"
    assert "exit code" in res["errors"][0]["error"]
