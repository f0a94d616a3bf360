# Two commands do everything on a fresh machine: `make pipeline` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist
OUT ?= checkpoints

.PHONY: setup data test pipeline clean-venv

setup: $(STAMP) data

# one pip call for everything: a later separate `pip install opacus` can swap torch and break torchvision
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Debian's package, when it is missing and apt-get is usable; otherwise the data loader explains what to do
data:
	@if [ ! -d $(FASHION) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "note: could not install dataset-fashion-mnist; see data/README.md"; \
	fi

test: setup
	$(PY) -m pytest -q tests

pipeline: setup
	$(PY) train_teacher.py --out $(OUT) --epochs 2 --max-steps 300 --desc quick

clean-venv:
	rm -rf $(VENV)
