"""A read of a tensor's value on the host (``.item()``, ``.tolist()``, ``int()``, ...) waits for the GPU
to finish everything queued before it. The prompt encoder reads its EOT positions once per prompt set
(its buckets and lengths are kept), and the training loop reads the loss terms once per epoch, not at
every step. On the CPU such reads are counted here; the results stay bit-equal (test_shared_prefix.py)."""
from __future__ import annotations

import pytest
import torch

from promptdg_cli.methods.coop import PromptLearner
from promptdg_cli.methods.dapl import DomainPromptLearner
from promptdg_cli.methods.promptstyler import StylePrompts

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
# names of 1 to 4 tokens: the shared-prefix path splits them into buckets of suffix lengths
NAMES = ["cat", "dog", "fox", "airplane with two wings", "a very long class name here", "bird", "sea lion", "seven"]


@pytest.fixture
def reads(monkeypatch):
    """Counts of host reads of tensor values while the fixture is active."""
    counts = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("learner", ["coop", "coop_csc", "dapl", "promptstyler"])
def test_a_prompt_forward_and_backward_read_nothing_after_the_first(clip, reads, learner):
    if learner.startswith("coop"):
        m = PromptLearner(clip, NAMES, 4, "", learner == "coop_csc")
        prompts, params = m, [m.ctx]
    elif learner == "dapl":
        m = DomainPromptLearner(clip, NAMES, ["art", "real world"], 2, 2, False, seed=0)
        prompts, params = m, [m.ctx, m.dom]
    else:
        m = StylePrompts(clip, NAMES, "a {} style of a")
        style = torch.nn.Parameter(torch.randn(clip.text_width) * 0.02)
        prompts, params = (lambda: m(style)), [style]

    def step():
        clip.encode_grouped(prompts()).sum().backward()

    step()  # the prompt set's EOT facts and bucket plan: read once
    first = reads["n"]
    assert first > 0  # (the counting sees reads)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    step()
    assert reads["n"] == first, f"{reads['n'] - first} host reads in a later forward"
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_the_training_loop_reads_the_loss_once_an_epoch_not_once_a_step(run_cli, reads):
    """CoOp's epoch of 6 steps and of 12 steps (batch 32 and 16): the same number of reads (after a first
    run with batch 64, which extracts the features: that reads once per file)."""
    seen = []
    for batch in (64, 32, 16):
        before = reads["n"]
        code, _, err, _ = run_cli(
            "train",
            "method=coop",
            "method.epochs=1",
            "method.n_ctx=2",
            "target=sketch",
            "method.augment=none",
            f"method.batch_size={batch}",
            "method.select=last",
        )
        assert code == 0, err
        seen.append(reads["n"] - before)
    assert seen[1] == seen[2], seen
