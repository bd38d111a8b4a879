# promptdg: `make demo` and `make test` install whatever is missing into .venv, then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo claims test test-all bench gpu-check clean-demo

install: $(STAMP)

# Reinstalled when the pins or the package metadata change. torch/torchvision come from the pins in
# constraints.txt (a CPU torch wheel where one is provided; never an unpinned CUDA download).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch torchvision
	# (setuptools reports every editable install as a BuildBackendWarning; nothing to act on)
	PYTHONWARNINGS=ignore $(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The main job on the offline demo world: build the world and the demo CLIP if not cached, run the
# baselines leave-one-domain-out for every target domain and PromptStyler (source-free: trained once,
# tested on every domain) and DAPT with 4 shots per class (no crop/flip augmentation: it destroys
# 32-pixel digits) and DomainFusion with the demo LDM (built once, like the demo CLIP; on 2 CPU
# cores: a frozen encoder, a quarter of the source images in the synthetic set, 10 DDIM steps per
# candidate, 4 epochs with one augmentation round at epoch 2 instead of fine-tuning, all of them,
# 20 steps, 20 epochs with rounds at 5, 10, 15: in the 20-epoch demo runs, selection on source
# validation kept epoch 0 or 1 on every target, so the last 16 epochs cost 5 minutes and changed no
# number; `make claims` runs the 20 epochs); then DAPL on all 12 single-source pairs with zero-shot
# CLIP in the same (UDA) table; print the collected tables.
DEMO_OUT ?= outputs/demo
demo: $(STAMP)
	$(VENV)/bin/promptdg train -m method=zeroshot,zeroshot_name,linear_probe,coop,promptstyler out_root=$(DEMO_OUT)
	$(VENV)/bin/promptdg train method=dapt shots=4 method.augment=false out_root=$(DEMO_OUT)
	$(VENV)/bin/promptdg train method=domainfusion method.train_encoder=false method.synthetic_fraction=0.25 method.img2img_steps=10 method.epochs=4 method.augment_every=2 out_root=$(DEMO_OUT)
	$(VENV)/bin/promptdg train -m method=zeroshot,dapl dataset.protocol=uda out_root=$(DEMO_OUT)
	$(VENV)/bin/promptdg collect $(DEMO_OUT)

# Each paper's central comparison on the demo world over 3 seeds (scripts/claims.py: the claims, the
# rule for "reproduced", the demo-scale overrides and their reasons); finished runs are reused.
CLAIMS_OUT ?= outputs/claims
CLAIMS_SEEDS ?= 1,2,3
claims: $(STAMP)
	$(PY) scripts/claims.py --seeds $(CLAIMS_SEEDS) --out $(CLAIMS_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=10

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# Each method's training step the official code's way and promptdg's way (ViT-B/16, random weights),
# checked equal, with the projected training times; prints the README's tables (scripts/bench.py).
bench: $(STAMP)
	nice -n 10 $(PY) scripts/bench.py --out bench/bench.json

# On a machine with one GPU: every method on CUDA (bf16) through the CLI, then the real-size timings
# with CUDA peak memory; writes gpu_check/gpu_check.json, exits non-zero on any error.
gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh

clean-demo:
	rm -rf $(DEMO_OUT)
