# mixq: make train compile deploy  (digits, CPU, a few minutes)   |   make test
SHELL := /bin/bash
PY      := .venv/bin/python
MIXQ    := .venv/bin/mixq
STAMP   := .venv/.installed

MODEL       ?= digits-cnn
DATASET     ?= digits
DATA_DIR    ?=
METHOD      ?= csq
TARGET_BITS ?= 3
ACT_BITS    ?= 8
EPOCHS      ?=
TARGET      ?= host
BOARD       ?=
RUN         ?= runs/$(MODEL)-$(METHOD)-w$(TARGET_BITS)a$(ACT_BITS)
FROZEN      ?= $(RUN)/frozen
BUILD       ?= $(RUN)/build-$(TARGET)

DATA_OPT  := $(if $(DATA_DIR),--data-dir $(DATA_DIR))
EPOCH_OPT := $(if $(EPOCHS),--epochs $(EPOCHS))
BOARD_OPT := $(if $(BOARD),--board $(BOARD))

.PHONY: venv train freeze compile deploy compare study test test-all bench bench-train arm-board arm-board-stop clean

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

train: $(STAMP)
	$(MIXQ) train --model $(MODEL) --dataset $(DATASET) $(DATA_OPT) --method $(METHOD) \
	    --target-bits $(TARGET_BITS) --act-bits $(ACT_BITS) $(EPOCH_OPT) --out $(RUN)

freeze: $(STAMP)
	$(MIXQ) freeze $(RUN)/checkpoint.pt --out $(FROZEN)
	$(MIXQ) inspect $(FROZEN)

compile: freeze
	$(MIXQ) compile $(FROZEN) --target $(TARGET) --out $(BUILD)

deploy: $(STAMP)
	$(MIXQ) deploy $(BUILD) --dataset $(DATASET) $(DATA_OPT) $(BOARD_OPT)

# CSQ and its peers on one model and one budget: train each, then one table and the
# accuracy-size plot (runs/compare-*.md, .png)
METHODS     ?= csq bsq clado
COMPARE     := runs/compare-$(MODEL)-w$(TARGET_BITS)a$(ACT_BITS)
compare: $(STAMP)
	@for m in $(METHODS); do \
	    $(MIXQ) train --model $(MODEL) --dataset $(DATASET) $(DATA_OPT) --method $$m \
	        --target-bits $(TARGET_BITS) --act-bits $(ACT_BITS) $(EPOCH_OPT) \
	        --out runs/$(MODEL)-$$m-w$(TARGET_BITS)a$(ACT_BITS) || exit 1; done
	$(MIXQ) report $(foreach m,$(METHODS),runs/$(MODEL)-$(m)-w$(TARGET_BITS)a$(ACT_BITS)) \
	    --md $(COMPARE).md --png $(COMPARE).png

# The CSQ paper's trends on real CIFAR-10 (ResNet-20; Tables IV and V, BSQ and CLADO): trains,
# freezes, compiles and deploys a grid into ~/.cache/mixq/study/ (outside the work tree, kept
# across checkouts), writes docs/study.{json,md,png}.
# Hours on 2 cores; resumable: run it again to continue where it stopped (bench/study.py).
STUDY_DATA         ?= ../shared/data/cifar10-jpeg.tar.gz
STUDY_EPOCHS       ?= 20
STUDY_TRAIN_IMAGES ?= 20000
study: $(STAMP)
	$(PY) bench/study.py --data $(STUDY_DATA) --epochs $(STUDY_EPOCHS) --train-images $(STUDY_TRAIN_IMAGES)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# emulated aarch64 board (qemu + TVM RPC server) on 127.0.0.1:9091; see docs/arm-board.md
arm-board: $(STAMP)
	$(PY) -m mixq.runtime.arm_board start

arm-board-stop: $(STAMP)
	$(PY) -m mixq.runtime.arm_board stop

# mixq (default and tuned) vs ONNX Runtime int8/fp32 and torch on this CPU, one run:
# bench/results.json + bench/results.md (bench/bench.py; TUNE_TRIALS per model and batch)
TUNE_TRIALS ?= 64
bench: $(STAMP)
	$(PY) bench/bench.py --tune-trials $(TUNE_TRIALS)

# CSQ vs float training step on CPU (ResNet-20, batch 128): time and peak memory ratios
bench-train: $(STAMP)
	$(PY) bench/bench_train.py

clean:
	rm -rf runs build .pytest_cache
