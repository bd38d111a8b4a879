"""backbone.precision reaches the two places that run the frozen encoders at scale: feature extraction
(FeatureCache._encode) and every training step's forward (TrainContext.train), and the record says
which precision and device a run had."""
import sys
import warnings

import pytest
import torch

from promptdg_cli import devices

from conftest import results


def test_autocast_is_bf16_or_fp16_on_cuda_only():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (CUDA-less torch warns that it disables autocast)
        bf16 = devices.autocast(torch.device("cuda"), "bf16")
        fp16 = devices.autocast(torch.device("cuda", 1), "fp16")
    assert isinstance(bf16, torch.autocast) and bf16.device == "cuda" and bf16.fast_dtype == torch.bfloat16
    assert isinstance(fp16, torch.autocast) and fp16.fast_dtype == torch.float16
    for device, precision in ((torch.device("cuda"), "fp32"), (torch.device("cpu"), "bf16"), (torch.device("cpu"), "fp32")):
        ctx = devices.autocast(device, precision)
        assert not isinstance(ctx, torch.autocast)
        with ctx:  # a context that changes nothing
            assert not torch.is_autocast_enabled()


@pytest.fixture
def autocast_calls(monkeypatch):
    """Every devices.autocast call: (caller's function, device type, precision)."""
    calls = []
    real = devices.autocast

    def spy(device, precision):
        calls.append((sys._getframe(1).f_code.co_name, torch.device(device).type, str(precision)))
        return real(device, precision)

    monkeypatch.setattr(devices, "autocast", spy)
    return calls


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """A cache no other test filled: the features are extracted here (their key names the precision)."""
    return tmp_path_factory.mktemp("precision_cache")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_precision_reaches_feature_extraction_and_the_training_step(run_cli, autocast_calls, own_cache, precision):
    code, _, err, out_root = run_cli("train", "method=coop", "method.epochs=1", "method.n_ctx=2", "target=sketch",
                                     f"backbone.precision={precision}", "device=cpu", f"cache_root={own_cache}")
    assert code == 0, err
    (rec,) = results(out_root)
    assert (rec["status"], rec["device"], rec["precision"]) == ("finished", "cpu", precision)
    sites = {site for site, _, _ in autocast_calls}
    assert {"_encode", "train"} <= sites, sites
    assert {(d, p) for _, d, p in autocast_calls} == {("cpu", precision)}
    steps = sum(1 for site, _, _ in autocast_calls if site == "train")
    assert steps == 192 // 32  # one epoch: 192 source training images (3 domains x 64), batches of 32
