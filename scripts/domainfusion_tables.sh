#!/usr/bin/env bash
# DomainFusion's DomainBed tables in the paper's setting: DomainBed's ERM and DomainFusion on an
# ImageNet ResNet-50, PACS, VLCS, OfficeHome, TerraIncognita and DomainNet, leave-one-domain-out,
# DomainBed's trials 0-2, Stable Diffusion v1.5 from the local Hugging Face cache (docs/domainbed.md).
# Extra arguments go to every sweep.
set -euo pipefail
promptdg train -m experiment=domainfusion_main "$@"
promptdg train -m experiment=domainfusion_domainnet "$@"
promptdg collect "${PROMPTDG_OUT:-outputs}/domainfusion_main"                    # DomainBed's per-dataset tables: domains + Avg
promptdg collect "${PROMPTDG_OUT:-outputs}/domainfusion_main" --columns dataset  # its summary: datasets + Avg
promptdg collect "${PROMPTDG_OUT:-outputs}/domainfusion_domainnet"
