# promptdg: `make demo` and `make test` install whatever is missing into .venv, then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-lane-a demo-lane-b claims test test-cpu-kinds test-all bench docs gpu-check clean-demo

# Create .venv and install promptdg with every extra; reinstalls when the pins or the package metadata change.
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch torchvision
	# (setuptools reports every editable install as a BuildBackendWarning; nothing to act on)
	PYTHONWARNINGS=ignore $(PIP) install --quiet -c constraints.txt -e '.[test,all]'
	touch $(STAMP)

DEMO_OUT ?= outputs/demo
PROMPTDG := $(VENV)/bin/promptdg
DEMO_LANE = tools/demo_lane.sh $(DEMO_OUT)/logs/$@.log
NO_AUGMENT := method.augment=none
# Every method on the offline demo world, then the collected tables (docs/demo.md: what runs, and why at this scale).
demo: $(STAMP)
	$(PROMPTDG) train -m method=zeroshot,zeroshot_name out_root=$(DEMO_OUT)
	@echo "[promptdg] next: linear_probe, coop, dapt | promptstyler, dapl in two one-thread lanes (progress bars: $(DEMO_OUT)/logs/demo-lane-a.log, demo-lane-b.log)"
	@echo "[promptdg] CoOp, DAPT and DAPL run promptdg's cheaper protocol here (method.augment=none, marked * in the tables): the official random crops destroy 32-pixel digits"
	$(MAKE) --no-print-directory -j2 demo-lane-a demo-lane-b
	@echo "[promptdg] next: DomainFusion, the CLIP-encoder variant on the demo CLIP (frozen, zero-shot head) with the demo LDM"
	$(PROMPTDG) train method=domainfusion method.train_encoder=false method.synthetic_fraction=0.25 method.img2img_steps=10 method.steps=229 method.checkpoint_freq=57 method.augment_every=3 out_root=$(DEMO_OUT)
	$(PROMPTDG) collect $(DEMO_OUT)

# make demo's first lane, one torch thread (tools/demo_lane.sh): the linear probe, CoOp, DAPT with 4 shots.
demo-lane-a: $(STAMP)
	$(DEMO_LANE) $(PROMPTDG) train method=linear_probe out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=coop $(NO_AUGMENT) out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=dapt shots=4 $(NO_AUGMENT) out_root=$(DEMO_OUT)

# make demo's second lane, one torch thread: PromptStyler, then zero-shot CLIP and DAPL on the 12 UDA pairs.
demo-lane-b: $(STAMP)
	$(DEMO_LANE) $(PROMPTDG) train method=promptstyler out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=zeroshot dataset.protocol=uda out_root=$(DEMO_OUT)
	$(DEMO_LANE) $(PROMPTDG) train method=dapl dataset.protocol=uda $(NO_AUGMENT) out_root=$(DEMO_OUT)

CLAIMS_OUT ?= outputs/claims
CLAIMS_SEEDS ?= 1,2,3
CLAIMS_JOBS ?= 2
# Each paper's central comparison on the demo world over 3 seeds, CLAIMS_JOBS arms at a time (scripts/claims.py).
claims: $(STAMP)
	$(PY) scripts/claims.py --seeds $(CLAIMS_SEEDS) --out $(CLAIMS_OUT) --jobs $(CLAIMS_JOBS)

# Ruff, then mypy on promptdg_cli beside the test suite (CPU only, offline, slow tests excluded); fails if either fails.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy > $(VENV)/mypy.log 2>&1 & pid=$$!; \
	$(PY) -m pytest -q --durations=10; rc=$$?; \
	wait $$pid || { cat $(VENV)/mypy.log; rc=1; }; tail -1 $(VENV)/mypy.log; exit $$rc

AVX2_ENV    := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
DEFAULT_ENV := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
# The numerics tests (-m numerics) again with AVX2 and plain x86-64 kernels (PyTorch, MKL and oneDNN each read their variable).
test-cpu-kinds: $(STAMP)
	env $(AVX2_ENV) $(PY) -m pytest -q -m numerics -p no:cacheprovider
	env $(DEFAULT_ENV) $(PY) -m pytest -q -m numerics -p no:cacheprovider

# Every test, the slow ones included.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

BENCH_DEVICE ?= cpu
BENCH_OUT ?= benchmarks/results/$(BENCH_DEVICE).json
# Each method's step the official way and promptdg's (ViT-B/16, random weights), checked equal; writes BENCH_OUT and docs/speed.md.
bench: $(STAMP)
	nice -n 10 $(PY) benchmarks/bench.py --device $(BENCH_DEVICE) --out $(BENCH_OUT)
	$(PY) tools/render_docs.py

# Rewrite the generated parts of docs/ from conf/provenance.yaml, conf/dataset/ and benchmarks/results/.
docs: $(STAMP)
	$(PY) tools/render_docs.py

# On a machine with one GPU: every method on CUDA (bf16) through the CLI, then real-size timings; writes gpu_check/.
gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh

# Remove make demo's outputs (the cached demo world and models stay in $PROMPTDG_CACHE).
clean-demo:
	rm -rf $(DEMO_OUT)
