"""backbone.precision reaches the two places that run the frozen encoders at scale: feature extraction
(FeatureCache._encode) and every training step's forward (TrainContext.train), and the record says
which precision and device a run had."""
import json
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
    for device, precision in (
        (torch.device("cuda"), "fp32"),
        (torch.device("cpu"), "bf16"),
        (torch.device("cpu"), "fp32"),
    ):
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
        frame = sys._getframe(1)
        while frame.f_code.co_name == "autocast":  # (training.AmpStep.autocast: the site is its caller)
            frame = frame.f_back
        calls.append((frame.f_code.co_name, torch.device(device).type, str(precision)))
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


# the forwards outside the loop's step, by method: the site (function) that runs each under the precision
EVERY_FORWARD = {
    # stage 1's iterations, each learned style's feature, the content and style-content features
    "promptstyler": (
        ["method.n_styles=2", "method.style_iters=2", "method.epochs=1"],
        {"style_step", "learn_style", "fit"},
    ),
    # the prototypes (augmented shots through the frozen encoder), the test images re-encoded with the prompts
    "dapt": (
        ["shots=2", "method.epochs=1", "method.n_visual=2", "method.n_ctx=2", "target=sketch"],
        {"prototypes", "features_for"},
    ),
    # the frozen CLIP encoder's features of the synthetic set
    "domainfusion": (
        [
            "method.train_encoder=false",
            "method.steps=2",
            "method.checkpoint_freq=2",
            "method.augment_every=1",
            "method.candidates=2",
            "method.img2img_steps=4",
            "method.synthetic_fraction=0.25",
            "target=sketch",
        ],
        {"encode_files"},
    ),
}


@pytest.mark.parametrize("method", sorted(EVERY_FORWARD))
def test_the_precision_reaches_every_forward_of_a_run(run_cli, autocast_calls, method, request):
    args, sites = EVERY_FORWARD[method]
    if method == "domainfusion":
        args = args + [f"method.ldm={request.getfixturevalue('tiny_ldm_dir')}"]
    code, _, err, out_root = run_cli("train", f"method={method}", *args, "backbone.precision=bf16", "device=cpu")
    assert code == 0, err
    seen = {site for site, _, _ in autocast_calls}
    assert sites <= seen, seen
    assert {p for _, _, p in autocast_calls} == {"bf16"}

# --------------------------------------------------------------------- fp16: loss scaling
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from promptdg_cli.methods.base import Method, RunEnv  # noqa: E402
from promptdg_cli.training import Term, TrainContext  # noqa: E402

INF = math.inf
# the gradient of every (epoch, step) of the toy method below: step (0, 1) has an inf entry; (1, 0) is
# 6e33, whose scaled value overflows float32 at the initial scale 2**16 but not at 2**15
GRADS = {(0, 0): [1.0, 2.0], (0, 1): [INF, 1.0], (1, 0): [6e33, 0.0], (1, 1): [0.5, 0.5]}


class Toy(Method):
    """loss = <w, g(epoch, step)>: its gradient is g, SGD lr 0.1, 2 epochs of 2 steps."""

    def __init__(self, precision):
        super().__init__(
            SimpleNamespace(name="toy", epochs=2, select="last"),
            None,
            ["a"],
            torch.device("cpu"),
            RunEnv(precision=precision),
        )
        self.w = torch.nn.Parameter(torch.ones(2))

    def parameters_to_train(self):
        return [self.w]

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=0.1)

    def epoch_batches(self, epoch, g):
        return [torch.tensor([0]), torch.tensor([1])]

    def batch_loss(self, item, info):
        g = torch.tensor(GRADS[(info.epoch, info.step)])
        return [Term("loss", (self.w * g).sum(), 1)]


def _train(tmp_path, precision, name="run", die_after_epoch=None, monkeypatch=None):
    m = Toy(precision)
    (tmp_path / name / "split").mkdir(parents=True, exist_ok=True)
    ctx = TrainContext(tmp_path / name, tmp_path / name / "split", "t", 1, torch.device("cpu"))
    if die_after_epoch is not None:
        saved = TrainContext._save

        def dying(self, section, state):
            saved(self, section, state)
            if state["epoch"] == die_after_epoch:
                raise KeyboardInterrupt("killed")

        monkeypatch.setattr(TrainContext, "_save", dying)
        with pytest.raises(KeyboardInterrupt):
            ctx.train(m)
        monkeypatch.setattr(TrainContext, "_save", saved)
        m, ctx = Toy(precision), TrainContext(tmp_path / name, tmp_path / name / "split", "t", 1, torch.device("cpu"))
    ctx.train(m)
    state = torch.load(tmp_path / name / "split" / "checkpoint.pt", weights_only=True)["loop"]
    return m.w.detach(), state["amp"]


def test_fp16_skips_a_step_with_an_inf_gradient_and_halves_the_scale(tmp_path):
    w, amp = _train(tmp_path, "fp16")
    # by hand, in float32: step (0, 1) skipped, (1, 0) taken at the scale 2**15
    one, lr = torch.ones(2), torch.tensor(0.1)
    expected = one - lr * torch.tensor([1.0, 2.0])
    expected = expected - lr * torch.tensor([6e33, 0.0])
    expected = expected - lr * torch.tensor([0.5, 0.5])
    assert torch.equal(w, expected)
    assert amp["scale"] == 2.0**15 and amp["skipped"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["fp16_skipped_steps"] for line in lines if "epoch" in line] == [1, 1]
    w32, amp32 = _train(tmp_path, "fp32", name="fp32")  # without scaling, the inf reaches the weights
    assert amp32 is None and not torch.isfinite(w32).all()


def test_a_resumed_fp16_run_keeps_its_loss_scale_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    w, amp = _train(tmp_path, "fp16")
    w2, amp2 = _train(tmp_path, "fp16", name="resumed", die_after_epoch=0, monkeypatch=monkeypatch)
    # (had the scale restarted at 2**16, step (1, 0) would overflow and be skipped: another w)
    assert torch.equal(w2, w) and amp2 == amp


def test_fp16_loss_scaling_changes_no_number_where_nothing_overflows(run_cli, own_cache):
    """On the CPU fp16 is fp32 arithmetic with the GradScaler path: scaling by a power of two and back is
    exact, so CoOp's learned context is bit for bit fp32's."""
    from safetensors.torch import load_file

    models = {}
    for precision in ("fp32", "fp16"):
        code, _, err, out_root = run_cli("train", "method=coop", "method.epochs=1", "method.n_ctx=2", "target=sketch",
                                         f"backbone.precision={precision}", "device=cpu", f"cache_root={own_cache}")
        assert code == 0, err
        (rec,) = [r for r in results(out_root) if r["precision"] == precision]
        models[precision] = (load_file(f"{rec['run_dir']}/splits/sketch/model.safetensors"), rec["accuracy"])
    assert models["fp16"][1] == models["fp32"][1]
    assert all(torch.equal(models["fp16"][0][k], v) for k, v in models["fp32"][0].items())
