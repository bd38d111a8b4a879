"""Dataclass schemas of the config groups.

Every YAML file in ``conf/dataset``, ``conf/backbone`` and ``conf/method`` is merged onto one of
these schemas at composition time, so a misspelled key (in a YAML file or on the command line) is an
error before anything runs, and every value is type-checked.

Method schemas live next to their method (``promptdg_cli/methods/<name>.py``) and subclass
:class:`MethodConfig`; :func:`register_configs` stores all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING  # the config's name, e.g. "pacs"
    folder: str = MISSING  # directory under the data root, e.g. "PACS" -> <root>/PACS/<domain>/<class>/<img>
    root: str = "${data_root}"  # data root; defaults to $PROMPTDG_DATA (see conf/train.yaml)
    protocol: str = "dg"  # dg (leave-one-domain-out) | uda (labelled source -> unlabelled target)
    domains: List[str] = MISSING  # exact domain folder names
    classes: Dict[str, str] = MISSING  # class folder name -> human name used in prompts, in label order
    metric: str = "top1"  # top1 | mean_per_class (VisDA-2017 reports both)
    val_fraction: float = 0.2  # DomainBed's 80/20 train/validation split of each source domain
    prepare: str = ""  # how to obtain and lay out the data; printed when the folder is missing
    generator: Optional[str] = None  # built-in generator that writes the dataset on first use (demo world)
    generator_args: Dict[str, Any] = field(default_factory=dict)
    # Domain folder -> the words a prompt uses for it (DAPL writes "a {domain} image"); a domain not
    # listed is written as its folder name, lower-cased, with "_" as a space ("Real World" -> "real world").
    domain_names: Dict[str, str] = field(default_factory=dict)
    # Values a method's paper or official code sets per dataset, read by the method's YAML through
    # interpolation (e.g. conf/method/dapt.yaml: lr: ${oc.select:dataset.method_defaults.dapt.lr,...}),
    # so `--cfg job --resolve` shows them: method name -> {key: value}.
    method_defaults: Dict[str, Any] = field(default_factory=dict)
    # ---- few-shot benchmarks: protocol "fewshot" (CoOp's layout and splits, see promptdg_cli/fewshot.py).
    # Unused by dg/uda datasets. Paths are relative to <root>/<folder> unless said otherwise.
    # How the train/val/test splits are stored:
    #   json          CoOp's split file (split_file) of [relpath, label, classname] under image_dir
    #   wnid_folders  split_paths[split]/<wnid>/<img>, labels = line order of classnames_file (ImageNet)
    #   index_folders split_paths[split]/<label index>/<img>, names from classnames_file (ImageNet-V2)
    #   txt           split_paths[split] lists "<image id> <class name>" lines; images are
    #                 image_dir/<image id>.jpg, label order = classnames_file lines (FGVC-Aircraft)
    split_format: str = "json"
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
    model: str = MISSING  # open_clip model name, e.g. "ViT-B-16"
    pretrained: str = MISSING  # open_clip tag ("openai", "laion2b_s34b_b79k") or a local checkpoint path
    arch: str = "vit"  # vit | resnet; methods that need visual prompts require vit
    # Where open_clip keeps downloaded weights (None: the Hugging Face cache). Pre-download there.
    cache_dir: Optional[str] = None
    # Built-in recipe that creates the checkpoint on first use (only the demo CLIP has one).
    builder: Optional[str] = None
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)


@dataclass
class MethodConfig:
    """Keys every method has. A method's own schema subclasses this."""

    name: str = MISSING
    variant: str = ""  # shown next to the name in tables, e.g. the zero-shot template
    batch_size: int = 32
    epochs: int = 0  # 0: the method does not train
