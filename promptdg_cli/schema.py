"""The typed schemas of every config group, with the valid range of every number (torch-free).

Every YAML file in ``conf/dataset``, ``conf/backbone`` and ``conf/method`` is merged onto one of
these dataclasses at composition, so a misspelled key or a wrong type is an error before anything
runs, and a value outside its enum (``dataset.protocol=udaa``) names the valid ones. A method's
hyper-parameters have no default here: the value lives once, in ``conf/method/<name>.yaml``, next
to the comment that says where it comes from. Numeric ranges are metadata of the fields and are
checked by :func:`promptdg_cli.config.check_ranges` before any library loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A string enum whose str() and format() are its value ("dg", not "DatasetProtocol.dg")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class DatasetProtocol(Choice):
    """How a dataset is split into training and test data."""
    dg = "dg"  # leave-one-domain-out
    uda = "uda"  # labelled source -> unlabelled target
    fewshot = "fewshot"  # CoOp's train/val/test split files


class Metric(Choice):
    top1 = "top1"
    mean_per_class = "mean_per_class"  # VisDA-2017 reports both


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast on CUDA for the frozen encoders and the prompt path; fp32 master parameters
    fp16 = "fp16"


class Arch(Choice):
    vit = "vit"
    resnet = "resnet"


class BackboneKind(Choice):
    clip = "clip"  # an open_clip CLIP: image and text towers (every method)
    classifier = "classifier"  # an ImageNet classifier (torchvision): DomainBed's ERM and DomainFusion's featurizer


class Selection(Choice):
    """Model selection: the last epoch, the epoch (checkpoint) with the best source-validation accuracy,
    or one of the opt-ins that read test labels, recorded and marked in tables: ``target_test`` (the
    epoch with the best accuracy on the target's test labels, as DAPL's official code does) and
    ``oracle`` (DomainBed's test-domain validation rule: the last checkpoint, with the accuracy on the
    test domain's held-out part recorded)."""
    last = "last"
    val = "val"
    target_test = "target_test"
    oracle = "oracle"


class Augment(Choice):
    """What a training image looks like in each epoch (views.py)."""
    official = "official"  # the official code's: a fresh random resized crop + flip of every image in every epoch
    views = "views"  # promptdg's cheaper protocol: one of K views per image, encoded once (method.aug_views)
    none = "none"  # promptdg's cheapest: the un-augmented (cached) images


class Form(Choice):
    """Where a paper's text and its official code disagree: the official code's form, or the paper's."""
    official = "official"
    paper = "paper"


class LRStep(Choice):
    batch = "batch"  # the scheduler steps after every batch (DAPL's official trainer)
    epoch = "epoch"


def choice(*values: str, default: Any = MISSING):
    """A string field that must be one of ``values`` (values an Enum cannot name, e.g. "1-alpha")."""
    return field(default=default, metadata={"choices": list(values)})


def num(default: Any = MISSING, *, ge=None, gt=None, le=None, lt=None, items: bool = False, doc: str = ""):
    """A numeric field with its valid range (``items``: the range applies to each list element)."""
    return field(
        default=default, metadata={"range": {"ge": ge, "gt": gt, "le": le, "lt": lt}, "items": items, "doc": doc}
    )


# --------------------------------------------------------------------- data and backbone
@dataclass
class DatasetConfig:
    name: str = MISSING  # the config's name, e.g. "pacs"
    folder: str = MISSING  # directory under the data root, e.g. "PACS" -> <root>/PACS/<domain>/<class>/<img>
    root: str = "${data_root}"  # data root; defaults to $PROMPTDG_DATA (see conf/train.yaml)
    protocol: DatasetProtocol = DatasetProtocol.dg
    domains: List[str] = MISSING  # exact domain folder names
    classes: Dict[str, str] = MISSING  # class folder name -> human name used in prompts, in label order
    metric: Metric = Metric.top1
    val_fraction: float = num(0.2, gt=0.0, lt=1.0)  # DomainBed's 80/20 train/validation split of each source domain
    prepare: str = ""  # how to obtain and lay out the data; printed when the folder is missing
    generator: Optional[str] = None  # built-in generator that writes the dataset on first use (demo world)
    generator_args: Dict[str, Any] = field(default_factory=dict)
    # Domain folder -> the words a prompt uses for it (DAPL writes "a {domain} image"); a domain not
    # listed is written as its folder name, lower-cased, with "_" as a space ("Real World" -> "real world").
    domain_names: Dict[str, str] = field(default_factory=dict)
    # Values a method's paper or official code sets per dataset, read by the method's YAML through
    # interpolation (conf/method/dapt.yaml: lr: ${oc.select:dataset.method_defaults.dapt.lr,...}),
    # so `--cfg job --resolve` shows them: method name -> {key: value}.
    method_defaults: Dict[str, Any] = field(default_factory=dict)
    # ---- few-shot benchmarks: protocol "fewshot" (CoOp's layout and splits, see promptdg_cli/fewshot.py).
    # Paths are relative to <root>/<folder> unless said otherwise. How the splits are stored:
    #   json          CoOp's split file (split_file) of [relpath, label, classname] under image_dir
    #   wnid_folders  split_paths[split]/<wnid>/<img>, labels = line order of classnames_file (ImageNet)
    #   index_folders split_paths[split]/<label index>/<img>, names from classnames_file (ImageNet-V2)
    #   txt           split_paths[split] lists "<image id> <class name>" lines; images are
    #                 image_dir/<image id>.jpg, label order = classnames_file lines (FGVC-Aircraft)
    split_format: str = choice("json", "wnid_folders", "index_folders", "txt", default="json")
    split_file: Optional[str] = None  # json: e.g. split_zhou_OxfordPets.json
    image_dir: str = ""  # json, txt: folder the image paths are relative to ("": <root>/<folder> itself)
    split_paths: Dict[str, str] = field(default_factory=dict)  # *_folders, txt: split name -> folder or list file
    # wnid_folders, index_folders: "<wnid> <class name>" lines (CoOp's classnames.txt); txt: one class
    # name a line. Relative to <root> (not <folder>): ImageNet's variants share imagenet/classnames.txt.
    classnames_file: Optional[str] = None
    # Variants covering part of the label space (ImageNet-A/R: 200 of 1000 classes) keep the full
    # labels but predict among their own classes only (fewshot.class_subset): the WordNet ids listed
    # here, or with subset_from_folders the wnid folders of the test split found on disk.
    wnids: List[str] = field(default_factory=list)
    subset_from_folders: bool = False


@dataclass
class BackboneConfig:
    name: str = MISSING  # the config's name, e.g. "vit_b16"
    model: str = MISSING  # open_clip model name, e.g. "ViT-B-16"; kind classifier: a torchvision model, e.g. "resnet50"
    # open_clip tag ("openai", "laion2b_s34b_b79k") or a local checkpoint path; kind classifier: a
    # torchvision weights name ("IMAGENET1K_V1"), a local file, or "random"
    pretrained: str = MISSING
    arch: Arch = Arch.vit  # methods that need visual prompts require vit
    kind: BackboneKind = BackboneKind.clip
    image_size: Optional[int] = num(None, ge=8)  # kind classifier: the side of its input images (DomainBed: 224)
    # Where open_clip keeps downloaded weights (None: the Hugging Face cache). Pre-download there.
    cache_dir: Optional[str] = None
    # Built-in recipe that creates the checkpoint on first use (only the demo CLIP has one).
    builder: Optional[str] = None
    precision: Precision = Precision.fp32  # bf16/fp16: autocast of the frozen encoders and the prompt path on CUDA


# --------------------------------------------------------------------- methods
METHOD_SCHEMAS: Dict[str, type] = {}  # built-in method name -> its schema, filled by @method_schema below


def method_schema(name: str):
    """Register a built-in method's schema under ``name``: ``config.register_configs`` stores it as
    ``schema/method/<name>``, which ``conf/method/<name>.yaml`` lists first in its defaults."""
    def register(cls):
        METHOD_SCHEMAS[name] = cls
        return cls
    return register


@dataclass
class MethodConfig:
    """Keys every method has. A method's own schema subclasses this; its values live in its YAML."""

    name: str = MISSING
    _target_: str = MISSING  # the method's class, module.Class (built-ins: promptdg_cli.methods.<file>.<Class>)
    variant: str = ""  # shown next to the name in tables, e.g. the zero-shot template
    batch_size: int = num(32, ge=1)  # (unused by methods that do not train)
    epochs: int = num(0, ge=0)  # 0: the method does not train


@method_schema("zeroshot")
@dataclass
class ZeroShotConfig(MethodConfig):
    templates: List[str] = MISSING  # prompt templates; several are ensembled (mean of normalised features)


@method_schema("linear_probe")
@dataclass
class LinearProbeConfig(MethodConfig):
    c_min: float = num(gt=0.0)  # the C sweep's range (inverse L2 strength)
    c_max: float = num(gt=0.0)
    refine_steps: int = num(ge=0)
    max_iter: int = num(ge=1)
    tol: float = num(gt=0.0)  # a fit stops at this fraction of the objective's max-abs gradient at the cold start
    patience: Optional[int] = num(ge=1)  # the C path stops after this many values without a gain; None: the whole path


@dataclass
class _PromptTraining(MethodConfig):
    """Dassl's SGD + warm-up + cosine, as CoOp, DAPL and DAPT's official code trains."""
    lr: float = num(gt=0.0)
    momentum: float = num(ge=0.0, lt=1.0)
    weight_decay: float = num(ge=0.0)
    batch_size: int = num(ge=1)
    epochs: int = num(ge=1)
    warmup_epochs: int = num(ge=0)
    warmup_lr: float = num(gt=0.0)
    drop_last: bool = MISSING  # Dassl's train loaders drop the last incomplete batch


@method_schema("coop")
@dataclass
class CoOpConfig(_PromptTraining):
    n_ctx: int = num(ge=1)  # M context vectors
    ctx_init: str = MISSING  # "" = random N(0, 0.02^2); or words to start from (n_ctx = their count)
    class_specific: bool = MISSING  # CSC: one context per class
    select: Selection = MISSING
    augment: Augment = MISSING
    aug_views: int = num(ge=0)  # K views per image with augment=views


@method_schema("dapl")
@dataclass
class DAPLConfig(_PromptTraining):
    prompt: Form = MISSING  # official: "[ctx][dom] {class} , a {domain} image.." | paper: "[ctx][dom] {class}."
    n_ctx: int = num(ge=1)  # M1
    n_dom_ctx: int = num(ge=1)  # M2
    class_specific: bool = MISSING
    lr_step: LRStep = MISSING
    target_batch_size: int = num(ge=1)
    T: float = num(gt=0.0)  # pseudo-label temperature
    tau: float = num(ge=0.0, le=1.0)  # confidence threshold
    U: float = num(ge=0.0)  # weight of the target term
    pseudo_template: str = MISSING
    augment: Augment = MISSING
    aug_views: int = num(ge=0)  # K views per image with augment=views
    source_holdout: bool = MISSING  # false: train on all source images (official); true: hold 20 % out for validation
    select: Selection = MISSING


@method_schema("dapt")
@dataclass
class DAPTConfig(_PromptTraining):
    n_ctx: int = num(ge=1)
    n_visual: int = num(ge=1)
    deep: bool = MISSING
    beta_v: float = num(ge=0.0)  # weight of L_intra
    beta_t: float = num(ge=0.0)  # weight of L_inter
    intra_loss: Form = MISSING  # official: F.mse_loss (mean over B*D) | paper: mean of squared norms
    t: float = num(gt=0.0)
    renormalize_prototypes: bool = MISSING
    augment: Augment = MISSING  # official | none (DAPT trains through the image encoder: no cached views)
    select: Selection = MISSING


@method_schema("promptstyler")
@dataclass
class PromptStylerConfig(MethodConfig):
    n_styles: int = num(ge=1)  # K
    style_iters: int = num(ge=1)  # L
    style_lr: float = num(gt=0.0)
    style_momentum: float = num(ge=0.0, lt=1.0)
    style_init_std: float = num(gt=0.0)
    style_template: str = MISSING  # the style word goes into {}; the class name follows
    arcface_s: float = num(gt=0.0)
    arcface_m: float = num(ge=0.0, lt=3.1416)
    epochs: int = num(ge=1)  # classifier epochs
    lr: float = num(gt=0.0)
    momentum: float = num(ge=0.0, lt=1.0)
    batch_size: int = num(ge=1)


@dataclass
class DomainBedRecipe(MethodConfig):
    """DomainBed's ERM recipe (hparams_registry.py, datasets.py, scripts/train.py)."""
    hparams_seed: int = num(ge=0)  # 0: the defaults below; k: DomainBed's random draw for (k, trial_seed)
    lr: float = num(gt=0.0)
    weight_decay: float = num(ge=0.0)
    batch_size: int = num(ge=1)  # images of each source domain in a step
    resnet_dropout: float = num(ge=0.0, lt=1.0)  # dropout on the featurizer's output
    steps: int = num(ge=1)
    checkpoint_freq: int = num(ge=1)  # steps between evaluations (model selection candidates)
    augment: bool = MISSING  # DomainBed's augment_transform on training images; false: its plain transform
    select: Selection = MISSING


@method_schema("erm")
@dataclass
class ERMConfig(DomainBedRecipe):
    pass


@method_schema("domainfusion")
@dataclass
class DomainFusionConfig(DomainBedRecipe):
    ldm: str = MISSING  # auto | demo | a local SD folder | a hub id in the local HF cache
    ldm_revision: Optional[str] = MISSING
    ldm_dtype: str = choice("auto", "fp32", "fp16", "bf16")
    ldm_resolution: Optional[int] = num(ge=8)
    prompt: str = MISSING
    train_encoder: bool = MISSING
    zeroshot_template: str = MISSING
    distill_weight: float = num(ge=0.0)
    t_range: List[float] = num(ge=0.0, le=1.0, items=True)
    weighting: str = choice("1-alpha", "constant")  # w(t)
    distill_guidance: float = num(ge=0.0)
    distill_per_step: int = num(ge=0)
    augment_every: int = num(ge=1)
    candidates: int = num(ge=1)
    strength: float = num(gt=0.0, le=1.0)
    img2img_steps: int = num(ge=1)
    img2img_guidance: float = num(ge=0.0)
    synthetic_fraction: float = num(gt=0.0, le=1.0)
    generate_batch: int = num(ge=1)
    generate_rounds: int = num(ge=1)
