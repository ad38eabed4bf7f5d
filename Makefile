# `make demo`: set up and show the method (AT vs AT-AWP on digits: train, evaluate, landscape, flatness, report) in a few
# minutes: 15 epochs, monitoring and analysis on fixed subsets of 100-200 images, no AutoAttack (README's demo block
# gives the last run's time and the machine's load).
# `make demo-full`: the longer demo (the recipes' 30 epochs, AutoAttack and CW among the attacks).
# Both write $(RUNS)/demo_summary.json and print the figures README.md shows (`make readme-demo` puts them there).
# THREADS: torch threads (default 1: on a small machine a thread per core fights everything else running).
# `make test`: set up and run the test suite (what .ci/run calls).
# Both create .venv from scratch with the pinned torch/torchvision of constraints.txt when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FR := $(VENV)/bin/flatrobust
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs
THREADS ?= 1

.PHONY: setup test test-slow demo demo-full readme-demo clean bench

# The [robustbench] extra is installed without robustbench's timm==1.0.9 pin (it would replace the newer timm whose
# test models the timm tests use; robustbench works with it): robustbench itself, then its dependencies (constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,autoattack,timm,tensorboard,lightning,huggingface]'
	$(PY) -m pip install --quiet -c constraints.txt --no-deps robustbench
	$(PY) -m pip install --quiet -c constraints.txt torchdiffeq geotorch gdown pandas requests safetensors
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

DEMO_ENV = OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS)

demo: $(STAMP)
	@mkdir -p $(RUNS) && date +%s > $(RUNS)/demo_started
	$(DEMO_ENV) $(FR) train recipes/digits_at.yaml out_dir=$(RUNS) epochs=15 data.eval_subset=100 --overwrite
	$(DEMO_ENV) $(FR) train recipes/digits_at_awp.yaml out_dir=$(RUNS) epochs=15 data.eval_subset=100 --overwrite
	$(DEMO_ENV) $(FR) eval $(RUNS)/digits_at/best.pt --attacks clean,fgsm,pgd20 --n 200
	$(DEMO_ENV) $(FR) eval $(RUNS)/digits_at_awp/best.pt --attacks clean,fgsm,pgd20 --n 200
	$(DEMO_ENV) $(FR) landscape $(RUNS)/digits_at/best.pt --n 100 --alphas -1:1:9 --directions 1
	$(DEMO_ENV) $(FR) landscape $(RUNS)/digits_at_awp/best.pt --n 100 --alphas -1:1:9 --directions 1
	$(DEMO_ENV) $(FR) flatness $(RUNS)/digits_at/best.pt --n 100
	$(DEMO_ENV) $(FR) flatness $(RUNS)/digits_at_awp/best.pt --n 100
	$(DEMO_ENV) $(FR) report $(RUNS)/digits_at $(RUNS)/digits_at_awp --out $(RUNS)/report
	@date +%s > $(RUNS)/demo_finished
	$(PY) tools/demo_readme.py summarize $(RUNS)

demo-full: $(STAMP)
	@mkdir -p $(RUNS) && date +%s > $(RUNS)/demo_started
	$(DEMO_ENV) $(FR) train recipes/digits_at.yaml out_dir=$(RUNS) data.eval_subset=200 --overwrite
	$(DEMO_ENV) $(FR) train recipes/digits_at_awp.yaml out_dir=$(RUNS) data.eval_subset=200 --overwrite
	$(DEMO_ENV) $(FR) eval $(RUNS)/digits_at/best.pt --attacks clean,fgsm,pgd20,cw20,autoattack --n 100
	$(DEMO_ENV) $(FR) eval $(RUNS)/digits_at_awp/best.pt --attacks clean,fgsm,pgd20,cw20,autoattack --n 100
	$(DEMO_ENV) $(FR) landscape $(RUNS)/digits_at/best.pt --n 200 --alphas -1:1:11 --directions 2
	$(DEMO_ENV) $(FR) landscape $(RUNS)/digits_at_awp/best.pt --n 200 --alphas -1:1:11 --directions 2
	$(DEMO_ENV) $(FR) flatness $(RUNS)/digits_at/best.pt --n 200
	$(DEMO_ENV) $(FR) flatness $(RUNS)/digits_at_awp/best.pt --n 200
	$(DEMO_ENV) $(FR) report $(RUNS)/digits_at $(RUNS)/digits_at_awp --out $(RUNS)/report
	@date +%s > $(RUNS)/demo_finished
	$(PY) tools/demo_readme.py summarize $(RUNS)

# `make readme-demo` (after `make demo`): copy its summary to docs/demo_summary.json and regenerate README.md's
# demo block from it (tests/test_readme.py checks that the two agree).
readme-demo: $(STAMP)
	$(PY) tools/demo_readme.py update $(RUNS)/demo_summary.json

# `make bench`: every training method side by side with the official-procedure baseline (step time, ratios,
# peak memory), then evaluation throughput (PGD-20 images/s, AutoAttack on 100 digits); 75 s on 2 CPU cores (2026-11-24).
# Other models/devices: see bench/README.md (BENCH_ARGS is passed to step_time.py).
BENCH_ARGS ?= --model smallcnn --batch-size 128 --threads 1 --warmup 2 --repeats 10
bench: $(STAMP)
	$(PY) bench/step_time.py $(BENCH_ARGS)
	$(PY) bench/eval_throughput.py --n 100 --threads 1

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
