"""What the papers assume of a CLIP, measured on the demo CLIP and the ``demo_digits`` benchmark.

The methods promptdg implements take a few properties of CLIP for granted; this module measures
them, so that a demo CLIP that lacks one is noticed (``measure_demo_clip``, run at the end of
``pretrain.build_demo_clip`` and stored in the checkpoint's metadata):

* zero-shot top-1 per domain with the templates ``"{}"`` and ``"a photo of a {}."``: the common
  domains of the pretraining data (printed, photo) above the rare ones (sketch, handwritten),
  which are not solved (the DG/DA methods exist to close that gap);
* a learned logit scale near CLIP's (CLIP: 100);
* confidences that mean something (DAPL keeps the pseudo-labels whose max softmax is >= tau):
  expected calibration error and the share and accuracy of the confident predictions;
* style words that move text features the way the matching domain moves image features
  (PromptStyler's premise): the cosine between the two shifts.

The formulas are in the docstrings of the functions that compute them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .world import CLASSES, DOMAINS, STYLE_WORDS

TEMPLATES = ("{}", "a photo of a {}.")
CALIBRATION_TEMPLATE = "a photo of a {}."  # DAPL's pseudo-label prompt (method.pseudo_template)
ECE_BINS = 15
TAU = 0.6  # DAPL's confidence threshold outside VisDA-2017 (dapl.DEFAULT_TAU)
COMMON, RARE = ("printed", "photo"), ("sketch", "handwritten")


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in % (Guo et al., 2017) with ``bins`` equal-width bins over (0, 1].

    With B_m = {i : (m-1)/M < conf_i <= m/M}, m = 1..M (a confidence of exactly 0 goes to the first
    bin):  ECE = sum_m |B_m| / n * | acc(B_m) - conf(B_m) |, where acc(B_m) is the share of correct
    predictions in B_m and conf(B_m) their mean confidence; empty bins count 0.
    confidence: (n,) max softmax probability; correct: (n,) bool.
    """
    conf = confidence.double().flatten()
    hit = correct.double().flatten()
    if conf.numel() == 0:
        raise ValueError("expected_calibration_error: no predictions (confidence is empty)")
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)  # bin of (m-1)/M < c <= m/M
    ece = 0.0
    for m in range(bins):
        sel = idx == m
        if sel.any():
            ece += float(sel.double().mean() * (hit[sel].mean() - conf[sel].mean()).abs())
    return 100.0 * ece


def confident_share(confidence: torch.Tensor, correct: torch.Tensor, tau: float = TAU) -> tuple[float, float | None]:
    """(share in % of predictions with confidence >= tau, their top-1 in %; None when there are none)."""
    keep = confidence >= tau
    share = 100.0 * float(keep.double().mean())
    acc = 100.0 * float(correct[keep].double().mean()) if bool(keep.any()) else None
    return share, acc


def shift_cosine(text_styled: torch.Tensor, text_plain: torch.Tensor, image_domain: torch.Tensor,
                 image_all: torch.Tensor) -> float:
    """cos(T_styled - T_plain, I_domain - I_all) for one (style, class) pair.

    text_styled: (D,) normalised text feature of "a <style> of a <class>" (the mean over the
    domain's style words, when there are several); text_plain: (D,) of "a <class>"; image_domain:
    (D,) mean of the normalised image features of the domain; image_all: (D,) their mean over all
    domains. A cosine near 1 means the style word moves the text feature the way the domain moves
    the image feature (the premise of PromptStyler's text-only style synthesis).
    """
    return float(F.cosine_similarity(text_styled - text_plain, image_domain - image_all, dim=0))


# --------------------------------------------------------------------- the benchmark's features
def _load_domain(backbone, root: Path, domain: str, classnames: Sequence[str], batch: int = 256):
    """Normalised image features (n, D) and labels (n,) of one domain's folder ``root/<domain>/<class>/*.png``."""
    files, labels = [], []
    for k, name in enumerate(classnames):
        found = sorted((root / domain / name).glob("*.png"))
        if not found:
            raise FileNotFoundError(f"measure_demo_clip: no images in {root / domain / name} (dataset_root={root})")
        files += found
        labels += [k] * len(found)
    feats = []
    with torch.no_grad():
        for i in range(0, len(files), batch):
            ims = []
            for f in files[i : i + batch]:
                with Image.open(f) as im:
                    ims.append(backbone.preprocess(im.convert("RGB")))
            feats.append(backbone.encode_image(torch.stack(ims).to(backbone.device)).float().cpu())
    return torch.cat(feats), torch.tensor(labels)


def _text(backbone, prompts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode_text(list(prompts)).float().cpu()  # (n, D), normalised


@torch.no_grad()
def measure_demo_clip(backbone, dataset_root, tau: float = TAU) -> dict:
    """Measure the demo CLIP on the benchmark at ``dataset_root`` (``world.generate_dataset``'s layout).

    Returns a JSON-able dict::

        {"logit_scale": s,
         "top1": {template: {domain: %}},                 # zero-shot, templates TEMPLATES
         "ece": {domain: %}, "confident_share": {domain: %}, "confident_top1": {domain: % or None},
         "style_shift_cos": {domain: mean over classes},
         "summary": {"common_top1", "rare_top1", "style_shift_cos"}, "tau": tau, "template": ...}

    Zero-shot: p = softmax(s * cos(image, T(template(class)))) over the 10 classes, with s the
    model's logit scale; top-1 is the share of images whose argmax is their class. ECE, the
    confident share and its top-1 use CALIBRATION_TEMPLATE's p (max p >= ``tau`` is what DAPL
    keeps). The style shift of a domain is the mean over classes c of
    cos(mean_w T("a <w> of a <c>") - T("a <c>"), mean I(domain) - mean I(all)), w in the domain's
    STYLE_WORDS; image features and text features are normalised before any mean.
    The summary's common/rare top-1 average both templates over printed+photo and sketch+handwritten.
    """
    root = Path(dataset_root)
    names = list(CLASSES)
    scale = float(backbone.logit_scale)
    feats = {d: _load_domain(backbone, root, d, names) for d in DOMAINS}
    out: dict = {"logit_scale": round(scale, 2), "tau": tau, "template": CALIBRATION_TEMPLATE, "top1": {},
                 "ece": {}, "confident_share": {}, "confident_top1": {}, "style_shift_cos": {}}
    for template in TEMPLATES:
        w = F.normalize(_text(backbone, [template.format(c) for c in names]), dim=-1)  # (C, D)
        out["top1"][template] = {}
        for d, (x, y) in feats.items():
            prob = torch.softmax(scale * x @ w.T, dim=-1)  # (n, C)
            conf, pred = prob.max(dim=-1)
            correct = pred == y
            out["top1"][template][d] = round(100.0 * float(correct.double().mean()), 2)
            if template == CALIBRATION_TEMPLATE:
                share, acc = confident_share(conf, correct, tau)
                out["ece"][d] = round(expected_calibration_error(conf, correct), 2)
                out["confident_share"][d] = round(share, 2)
                out["confident_top1"][d] = None if acc is None else round(acc, 2)
    means = {d: x.mean(0) for d, (x, _) in feats.items()}  # (D,) each
    overall = torch.stack(list(means.values())).mean(0)
    plain = _text(backbone, [f"a {c}" for c in names])  # (C, D)
    for d in DOMAINS:
        words = STYLE_WORDS[d]
        styled = _text(backbone, [f"a {s} of a {c}" for c in names for s in words]).view(len(names), len(words), -1)
        cos = [shift_cosine(styled[k].mean(0), plain[k], means[d], overall) for k in range(len(names))]
        out["style_shift_cos"][d] = round(sum(cos) / len(cos), 3)
    mean_over = lambda ds: round(sum(out["top1"][t][d] for t in TEMPLATES for d in ds) / (len(ds) * len(TEMPLATES)), 2)
    out["summary"] = {"common_top1": mean_over(COMMON), "rare_top1": mean_over(RARE),
                      "style_shift_cos": round(sum(out["style_shift_cos"].values()) / len(DOMAINS), 3)}
    return out


def format_properties(p: dict) -> str:
    """A small table of ``measure_demo_clip``'s result, one row per domain."""
    t0, t1 = TEMPLATES
    head = f"{'domain':<12} {'top1 ' + repr(t0):>10} {'top1 ' + repr(t1):>24} {'ECE':>6} {'p>=' + str(p['tau']):>7} " \
           f"{'top1|p>=' + str(p['tau']):>12} {'style cos':>9}"
    rows = [f"demo CLIP properties on demo_digits (logit scale {p['logit_scale']:.1f}; ECE, confidences: "
            f"{p['template']!r})", head]
    for d in DOMAINS:
        acc = p["confident_top1"][d]
        rows.append(f"{d:<12} {p['top1'][t0][d]:>10.1f} {p['top1'][t1][d]:>24.1f} {p['ece'][d]:>6.1f} "
                    f"{p['confident_share'][d]:>7.1f} {('-' if acc is None else f'{acc:.1f}'):>12} "
                    f"{p['style_shift_cos'][d]:>9.2f}")
    s = p["summary"]
    rows.append(
        f"common (printed, photo) top-1 {s['common_top1']:.1f}, rare (sketch, handwritten) {s['rare_top1']:.1f}"
    )
    return "\n".join(rows)
