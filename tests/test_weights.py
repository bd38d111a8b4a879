"""CLIP weights named by open_clip's hf-hub: and local-dir: schemas: loaded from the Hugging Face
cache (HF_HUB_OFFLINE=1, a cache laid out by hand as huggingface_hub lays it out), named by repository
and commit in the record and the feature-cache key; the hub check uses huggingface_hub's offline
mode and endpoint, and fails in seconds."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from promptdg_cli.backbone import ClipBackbone
from promptdg_cli.errors import WeightsNotFound

from conftest import results

MODEL_CFG = json.loads(
    (Path(__file__).resolve().parents[1] / "promptdg_cli" / "model_configs" / "demo-clip-vit.json").read_text()
)
REPO_ID = "test-org/tiny-clip"
COMMITS = ("a" * 40, "b" * 40)


def _snapshot(cache: Path, commit: str, seed: int) -> Path:
    """<cache>/models--test-org--tiny-clip/snapshots/<commit>/ with open_clip's config and random weights."""
    folder = cache / "models--test-org--tiny-clip" / "snapshots" / commit
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model("demo-clip-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def _point_main(cache: Path, commit: str) -> None:
    refs = cache / "models--test-org--tiny-clip" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf")
    for i, commit in enumerate(COMMITS):
        _snapshot(cache, commit, seed=10 + i)
    _point_main(cache, COMMITS[0])
    return cache


def _backbone(model: str, cache: Path) -> ClipBackbone:
    return ClipBackbone.from_config(
        SimpleNamespace(model=model, pretrained="none", builder=None, cache_dir=str(cache), arch="vit")
    )


def _same_weights(bb: ClipBackbone, file: Path) -> bool:
    saved = load_file(str(file))
    return all(torch.equal(v, saved[k]) for k, v in bb.model.state_dict().items())


def test_hf_hub_loads_the_cached_commit_and_is_named_by_it(hub_cache):
    bb = _backbone(f"hf-hub:{REPO_ID}", hub_cache)  # pretrained=none: before, recorded as random-init
    snap = hub_cache / "models--test-org--tiny-clip" / "snapshots"
    assert _same_weights(bb, snap / COMMITS[0] / "open_clip_model.safetensors")
    assert bb.weights["kind"] == "hf-hub" and bb.weights["repo"] == REPO_ID and bb.weights["revision"] == COMMITS[0]
    assert bb.weights_id == f"hf-hub:{REPO_ID}@{COMMITS[0]}/open_clip_model.safetensors" == bb.identity()["weights"]
    pinned = _backbone(f"hf-hub:{REPO_ID}@{COMMITS[1]}", hub_cache)  # a pinned revision, whatever main says
    assert (
        _same_weights(pinned, snap / COMMITS[1] / "open_clip_model.safetensors")
        and pinned.weights["revision"] == COMMITS[1]
    )
    local = _backbone(f"local-dir:{snap / COMMITS[1]}", hub_cache)  # a snapshot folder named directly
    assert _same_weights(local, snap / COMMITS[1] / "open_clip_model.safetensors")
    assert local.weights["kind"] == "local-dir" and (local.weights["repo"], local.weights["revision"]) == (
        REPO_ID,
        COMMITS[1],
    )


def test_a_moved_branch_gives_new_cache_keys_and_a_new_record(run_cli, tmp_path):
    cache = tmp_path / "hf"  # (a cache of its own: main moves here)
    for i, commit in enumerate(COMMITS):
        _snapshot(cache, commit, seed=10 + i)
    _point_main(cache, COMMITS[0])
    args = (
        "method=zeroshot",
        "target=sketch",
        f"backbone.model=hf-hub:{REPO_ID}",
        "backbone.pretrained=none",
        f"backbone.cache_dir={cache}",
    )

    def run(name):  # each in its own output root, all with the same feature cache
        code, _, err, _ = run_cli("train", *args, f"out_root={tmp_path / name}")
        assert code == 0, err
        (rec,) = results(tmp_path / name)
        return rec

    first = run("first")
    assert first["weights"]["revision"] == COMMITS[0] and first["feature_cache"]["misses"] > 0
    again = run("again")
    assert again["weights"]["revision"] == COMMITS[0] and again["feature_cache"] == {
        "hits": first["feature_cache"]["misses"],
        "misses": 0,
    }
    _point_main(cache, COMMITS[1])  # main moves on: new weights, new features
    moved = run("moved")
    assert (
        moved["weights"]["revision"] == COMMITS[1]
        and moved["feature_cache"]["hits"] == 0
        and moved["feature_cache"]["misses"] > 0
    )


def test_an_uncached_repository_offline_fails_fast_with_what_to_do(tmp_path):
    t = time.time()
    with pytest.raises(WeightsNotFound) as e:
        _backbone("hf-hub:test-org/absent", tmp_path)
    assert time.time() - t < 5
    msg = str(e.value)
    assert (
        "offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE" in msg
        and "huggingface-cli download test-org/absent" in msg
    )
    assert "local-dir:" in msg


def test_the_hub_check_uses_huggingface_hubs_endpoint_and_offline_switches(monkeypatch):
    from huggingface_hub import constants

    from promptdg_cli.weights import hub_unavailable

    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # as HF_ENDPOINT sets it: nothing listens there
    t = time.time()
    why = hub_unavailable()
    assert time.time() - t < 5 and why.startswith("http://127.0.0.1:9 (HF_ENDPOINT) cannot be reached")
    # TRANSFORMERS_OFFLINE alone is huggingface_hub's offline mode too (read when it is imported)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)} | {"TRANSFORMERS_OFFLINE": "1"}
    code = "from promptdg_cli.weights import hub_unavailable; print(hub_unavailable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.startswith("huggingface_hub is in offline mode"), out.stderr
