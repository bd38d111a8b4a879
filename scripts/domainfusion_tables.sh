#!/usr/bin/env bash
# DomainFusion's DomainBed tables: PACS, VLCS, OfficeHome, TerraIncognita (with zero-shot and
# linear-probe rows of the same backbone) and DomainNet, leave-one-domain-out, seeds 1-3, Stable
# Diffusion v1.5 from the local Hugging Face cache. Extra arguments go to every sweep.
set -euo pipefail
promptdg train -m experiment=domainfusion_main "$@"
promptdg train -m experiment=domainfusion_domainnet "$@"
promptdg collect "${PROMPTDG_OUT:-outputs}/domainfusion_main" --columns dataset
promptdg collect "${PROMPTDG_OUT:-outputs}/domainfusion_domainnet"
