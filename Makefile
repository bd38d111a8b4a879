# promptdg: `make demo` and `make test` install whatever is missing into .venv, then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-lane-a demo-lane-b claims test test-cpu-kinds test-all bench gpu-check clean-demo

install: $(STAMP)

# Reinstalled when the pins or the package metadata change. torch/torchvision come from the pins in
# constraints.txt (a CPU torch wheel where one is provided; never an unpinned CUDA download).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch torchvision
	# (setuptools reports every editable install as a BuildBackendWarning; nothing to act on)
	PYTHONWARNINGS=ignore $(PIP) install --quiet -c constraints.txt -e '.[test,all]'
	touch $(STAMP)

# The main job on the offline demo world, in four steps:
# 1. zero-shot CLIP (both templates) leave-one-domain-out: builds the world and the demo CLIP if not
#    cached and fills the feature cache (two threads: the CLIP build keeps both cores busy);
# 2. two lanes side by side (`-j2`), one torch thread each (tools/demo_lane.sh says why; each lane's
#    progress bars go to $(DEMO_OUT)/logs/, its result lines to the terminal):
#    a. the linear probe and CoOp leave-one-domain-out, then DAPT with 4 shots per class (no crop/flip
#       augmentation: it destroys 32-pixel digits);
#    b. PromptStyler (source-free: trained once on no images, tested on every domain), then zero-shot
#       CLIP and DAPL on all 12 single-source pairs (UDA);
#    (the split evens the lanes: about 2 min 50 s each on 2 cores);
# 3. DomainFusion with the demo LDM (built once, like the demo CLIP; two threads: the LDM build and
#    the img2img candidates keep both cores busy). On 2 CPU cores: a frozen encoder, a quarter of the
#    source images in the synthetic set, 10 DDIM steps per candidate, 4 epochs with one augmentation
#    round at epoch 2 instead of fine-tuning, all of them, 20 steps, 20 epochs with rounds at 5, 10,
#    15: in the 20-epoch demo runs, selection on source validation kept epoch 0 or 1 on every target,
#    so the last 16 epochs cost 5 minutes and changed no number; `make claims` runs the 20 epochs;
# 4. print the collected tables (DG and UDA).
DEMO_OUT ?= outputs/demo
PROMPTDG := $(VENV)/bin/promptdg
DEMO_LANE = tools/demo_lane.sh $(DEMO_OUT)/logs/$@.log
demo: $(STAMP)
	$(PROMPTDG) train -m method=zeroshot,zeroshot_name out_root=$(DEMO_OUT)
	@echo "[promptdg] next: linear_probe, coop, dapt | promptstyler, dapl in two one-thread lanes (progress bars: $(DEMO_OUT)/logs/demo-lane-a.log, demo-lane-b.log)"
	@echo "[promptdg] CoOp, DAPT and DAPL run promptdg's cheaper protocol here (method.augment=none, marked * in the tables): the official random crops destroy 32-pixel digits"
	$(MAKE) --no-print-directory -j2 demo-lane-a demo-lane-b
	$(PROMPTDG) train method=domainfusion method.train_encoder=false method.synthetic_fraction=0.25 method.img2img_steps=10 method.epochs=4 method.augment_every=2 out_root=$(DEMO_OUT)
	$(PROMPTDG) collect $(DEMO_OUT)

# CoOp, DAPT and DAPL with method.augment=none: promptdg's cheaper protocol (no augmentation; marked * in
# the tables): the official random resized crops down to 8 % of a 32-pixel digit destroy the class.
NO_AUGMENT := method.augment=none
demo-lane-a: $(STAMP)
	$(DEMO_LANE) $(PROMPTDG) train method=linear_probe out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=coop $(NO_AUGMENT) out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=dapt shots=4 $(NO_AUGMENT) out_root=$(DEMO_OUT)

demo-lane-b: $(STAMP)
	$(DEMO_LANE) $(PROMPTDG) train method=promptstyler out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=zeroshot dataset.protocol=uda out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=dapl dataset.protocol=uda $(NO_AUGMENT) out_root=$(DEMO_OUT)

# Each paper's central comparison on the demo world over 3 seeds (scripts/claims.py: the claims, the
# rule for "reproduced", the demo-scale overrides and their reasons); finished runs are reused.
CLAIMS_OUT ?= outputs/claims
CLAIMS_SEEDS ?= 1,2,3
# arms at a time, each its own process with cores / CLAIMS_JOBS threads (promptdg's choice: 2; on 2 cores
# the whole table in 31 min 35 s from a cached world and LDM, about 75 min one after another; 1: the arms
# one after another in the claims process)
CLAIMS_JOBS ?= 2
claims: $(STAMP)
	$(PY) scripts/claims.py --seeds $(CLAIMS_SEEDS) --out $(CLAIMS_OUT) --jobs $(CLAIMS_JOBS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=10

# The numerics tests (-m numerics) again as an AVX2 CPU and a plain x86-64 CPU sum: PyTorch's, MKL's and
# oneDNN's kernels each pick their code path from these variables (tests/numerics.py: CPU_KINDS).
AVX2_ENV    := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
DEFAULT_ENV := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
test-cpu-kinds: $(STAMP)
	env $(AVX2_ENV) $(PY) -m pytest -q -m numerics -p no:cacheprovider
	env $(DEFAULT_ENV) $(PY) -m pytest -q -m numerics -p no:cacheprovider

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
