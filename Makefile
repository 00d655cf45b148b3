# The two commands a user needs: `make demo` and `make test`. Everything else is optional.
PY      := .venv/bin/python
VENV_OK := .venv/.installed
NODE_OK := node_modules/.installed

.PHONY: help demo test lint typecheck unit bench bench-core chaos sim sandbox dev clean deploy-check

help:
	@echo "make demo        the whole sync, both ways, on the built-in sandbox"
	@echo "make test        lint (ruff), types (mypy --strict) and every test"
	@echo "make bench       all four benchmarks and their summary (about 10 minutes)"
	@echo "make bench-core  core path benchmark (parse + map + decide)"
	@echo "make chaos       the chaos run with real process kills: OPS=20000 SEED=<random> by default"
	@echo "make sim         the deterministic simulation: SEEDS=1-10 OPS=1000 (per seed) by default"
	@echo "make sandbox     start the F&O and Dataverse emulators"
	@echo "make deploy-check what publish ships, indexed and imported in a venv from requirements.txt only"

$(VENV_OK): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(NODE_OK): package.json
	npm install --no-audit --no-fund --silent
	touch $@

lint: $(VENV_OK)
	$(PY) -m ruff check .

typecheck: $(VENV_OK)
	$(PY) -m mypy

unit: $(VENV_OK) $(NODE_OK)
	$(PY) -m pytest -q

test: lint typecheck unit

bench: $(VENV_OK) $(NODE_OK)
	$(PY) bench/run_all.py

bench-core: $(VENV_OK)
	$(PY) bench/core_path.py

# The cross-check with real HTTP, Azurite and real process kills: `make chaos OPS=2000 SEED=42`.
OPS ?= 20000
SEED ?=
chaos: $(VENV_OK) $(NODE_OK)
	$(PY) -m tests.chaos.run --operations $(OPS) $(if $(SEED),--seed $(SEED))

# The deterministic simulation of the whole sync (docs/simulation.md): `make sim SEEDS=1-100 OPS=1000`.
SEEDS ?= 1-10
sim: $(VENV_OK)
	PYTHONHASHSEED=0 $(PY) -m devkit.sim --seeds $(SEEDS) --ops $(if $(filter command line,$(origin OPS)),$(OPS),1000)

sandbox: $(VENV_OK)
	$(PY) -m loyaltysync sandbox

demo: $(VENV_OK) $(NODE_OK)
	$(PY) -m loyaltysync demo

deploy-check: $(VENV_OK)
	$(PY) -m devkit.deploy_check

clean:
	rm -rf .venv .venv-deploy node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
