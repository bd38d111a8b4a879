#!/usr/bin/env bash
# DAPT's tables. (1) Few-shot: 11 datasets x {1,2,4,8,16} shots x seeds 1-3, CoOp and DAPT, plus
# zero-shot CLIP. (2) ImageNet 16-shot -> ImageNet-V2, -Sketch, -A, -R. Extra arguments go to every
# training sweep (e.g. hydra/launcher=slurm).
set -euo pipefail
OUT="${PROMPTDG_OUT:-outputs}"
promptdg train -m experiment=dapt_fewshot "$@"
promptdg train -m experiment=dapt_fewshot_zeroshot "$@"
promptdg collect "$OUT/dapt_fewshot" --columns dataset

promptdg train -m experiment=dapt_imagenet "$@"
promptdg eval -m method=zeroshot_coop dataset=imagenet,imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r backbone=vit_b16 out_root="$OUT/dapt_imagenet"
for run in "$OUT"/dapt_imagenet/imagenet/{coop,dapt}/vit_b16/seed*/; do  # the trained runs, not the zero-shot evals
  promptdg eval -m run_dir="$run" dataset=imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r out_root="$OUT/dapt_imagenet"
done
promptdg collect "$OUT/dapt_imagenet" --columns dataset
