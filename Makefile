# The two commands: `make run` (venv + install + dvc repro) and `make test` (venv + install + all tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MLFLOW_PORT ?= 5000
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast lint format bench gpu-check pg-installed ui ui-stop ui-postgres postgres postgres-stop frontier sweep preset docs deps plots clean-stores

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	@# pip compiles the installed files to bytecode one at a time (74 s of a 147 s install on 2 cores); compileall
	@# uses every core (47 s). Like pip, it leaves a file that does not compile (torch ships one in Python 3.12 syntax
	@# for its own tests) to fail if it is ever imported.
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

install: $(STAMP)

run: install
	dvc repro

test: install pg-installed
	ruff check pipeline stages tools tests
	ruff format --check pipeline stages tools tests
	HF_HUB_OFFLINE=1 python -m pytest -n auto --dist worksteal -m "slow or not slow" --durations=25

test-fast: install
	HF_HUB_OFFLINE=1 python -m pytest -n auto --dist worksteal -m "not slow" --durations=10

lint: install
	ruff check pipeline stages tools tests
	ruff format --check pipeline stages tools tests

# The one formatter (ruff format; `# fmt: skip` only on tables a reflow would lose). `make test` checks it.
format: install
	ruff format pipeline stages tools tests

# The MLflow UI over the project's store, on 127.0.0.1 only. `make ui-stop` stops it by its PID.
MLFLOW_STORE ?= $(CURDIR)
MLFLOW_PIDFILE := $(MLFLOW_STORE)/.mlflow-server.pid
HEALTH := import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)
# The experiment's training-runs table (MLflow 3's UI opens on its GenAI view unless the URL asks for this one).
EXPERIMENT ?= $(or $(MLFLOW_EXPERIMENT_NAME),alignment)
UI_URL := from pipeline.track.tracking import training_runs_url as u; import sys; print(u(*sys.argv[1:3]))

# The server's store: SQLite in MLFLOW_STORE by default; any SQLAlchemy URL (e.g. `make ui-postgres`'s) instead.
MLFLOW_BACKEND_URI ?= sqlite:///$(MLFLOW_STORE)/mlflow.db

ui: install
	@if [ -f $(MLFLOW_PIDFILE) ] && kill -0 $$(cat $(MLFLOW_PIDFILE)) 2>/dev/null; then \
		echo "MLflow UI already running (PID $$(cat $(MLFLOW_PIDFILE))): $$(python -c '$(UI_URL)' http://127.0.0.1:$(MLFLOW_PORT) $(EXPERIMENT))"; exit 0; fi
	@nohup $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri $(MLFLOW_BACKEND_URI) \
		--artifacts-destination $(MLFLOW_STORE)/mlartifacts > $(MLFLOW_STORE)/.mlflow-server.log 2>&1 & \
		echo $$! > $(MLFLOW_PIDFILE)
	@for i in $$(seq 1 180); do \
		if python -c "$(HEALTH)" http://127.0.0.1:$(MLFLOW_PORT)/health 2>/dev/null; then \
			echo "MLflow UI: $$(python -c '$(UI_URL)' http://127.0.0.1:$(MLFLOW_PORT) $(EXPERIMENT)) (PID $$(cat $(MLFLOW_PIDFILE)); make ui-stop)"; exit 0; fi; \
		if ! kill -0 $$(cat $(MLFLOW_PIDFILE)) 2>/dev/null; then \
			echo "mlflow server exited:"; tail -20 $(MLFLOW_STORE)/.mlflow-server.log; rm -f $(MLFLOW_PIDFILE); exit 1; fi; \
		sleep 1; done; echo "mlflow server not healthy after 180 s; see $(MLFLOW_STORE)/.mlflow-server.log"; exit 1

ui-stop:
	@if [ ! -f $(MLFLOW_PIDFILE) ]; then echo "no MLflow UI PID file ($(MLFLOW_PIDFILE))"; exit 0; fi
	@pid=$$(cat $(MLFLOW_PIDFILE)); kill -TERM $$pid 2>/dev/null || true; \
		for i in $$(seq 1 30); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
		kill -0 $$pid 2>/dev/null && kill -KILL $$pid; rm -f $(MLFLOW_PIDFILE); echo "MLflow UI stopped"

# The same UI over PostgreSQL, the store for many writers (large `-j` sweeps, several machines): `make ui-postgres`
# starts a local PostgreSQL (`make postgres`: a cluster in PG_DIR, on 127.0.0.1:PG_PORT only, trust auth, a `mlflow`
# database) and the MLflow server over it. Stop both with `make ui-stop postgres-stop`. A team server points
# MLFLOW_BACKEND_URI at its own database instead: `make ui MLFLOW_BACKEND_URI=postgresql+psycopg://user:pw@host/db`.
PG_PORT ?= 5432
PG_DIR ?= $(MLFLOW_STORE)/.postgres
PG_PIDFILE := $(PG_DIR)/data/postmaster.pid
PG_URI = postgresql+psycopg://mlflow@127.0.0.1:$(PG_PORT)/mlflow
# PostgreSQL refuses to run as root: as root (CI, containers) its programs run as the `postgres` system user.
PG_AS := $(if $(filter 0,$(shell id -u)),runuser -u postgres --,)
PG_BIN ?= $(or $(wildcard /usr/lib/postgresql/*/bin),$(dir $(shell command -v pg_ctl)))

# The tests start a PostgreSQL of their own: its server programs (Debian's package) are installed when missing.
pg-installed:
	@test -x "$(PG_BIN)/pg_ctl" || { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null; } \
		|| { echo "PostgreSQL's server programs are missing: install them (Debian: apt-get install postgresql)"; \
		exit 1; }

ui-postgres: postgres
	@$(MAKE) --no-print-directory ui MLFLOW_BACKEND_URI=$(PG_URI)

postgres:
	@if [ -f $(PG_PIDFILE) ] && kill -0 $$(head -1 $(PG_PIDFILE)) 2>/dev/null; then \
		echo "PostgreSQL already running (PID $$(head -1 $(PG_PIDFILE))): $(PG_URI)"; exit 0; fi; \
	test -x $(PG_BIN)/pg_ctl || { echo "no PostgreSQL server programs (pg_ctl) in PG_BIN=$(PG_BIN): install" \
		"them (Debian: apt-get install postgresql) or set PG_BIN"; exit 1; }; \
	mkdir -p $(PG_DIR) $(if $(PG_AS),&& chown postgres: $(PG_DIR)) || exit 1; \
	$(PG_AS) test -w $(PG_DIR) || { echo "PG_DIR=$(PG_DIR): the postgres user cannot write there (a folder" \
		"above it is private to root?): set PG_DIR to one it can reach, e.g. PG_DIR=/var/tmp/align-postgres"; exit 1; }; \
	if [ ! -f $(PG_DIR)/data/PG_VERSION ]; then $(PG_AS) $(PG_BIN)/initdb -D $(PG_DIR)/data -U mlflow \
		--auth=trust -E UTF8 > $(PG_DIR)/initdb.log 2>&1 || { tail -20 $(PG_DIR)/initdb.log; exit 1; }; fi; \
	$(PG_AS) $(PG_BIN)/pg_ctl -D $(PG_DIR)/data -l $(PG_DIR)/server.log -w -t 60 \
		-o "-c listen_addresses=127.0.0.1 -p $(PG_PORT) -k $(PG_DIR)" start > /dev/null \
		|| { echo "PostgreSQL did not start:"; tail -20 $(PG_DIR)/server.log; exit 1; }; \
	$(PG_AS) psql -h 127.0.0.1 -p $(PG_PORT) -U mlflow -d postgres -tAc \
		"SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
		|| $(PG_AS) $(PG_BIN)/createdb -h 127.0.0.1 -p $(PG_PORT) -U mlflow mlflow || exit 1; \
	echo "PostgreSQL: $(PG_URI) (PID $$(head -1 $(PG_PIDFILE)); make postgres-stop)"

postgres-stop:
	@if [ ! -f $(PG_PIDFILE) ]; then echo "no PostgreSQL PID file ($(PG_PIDFILE))"; exit 0; fi
	@pid=$$(head -1 $(PG_PIDFILE)); kill -INT $$pid 2>/dev/null || true; \
		for i in $$(seq 1 30); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
		kill -0 $$pid 2>/dev/null && kill -KILL $$pid; echo "PostgreSQL stopped"

bench: install
	python -m tools.bench

# On a CUDA machine: the `gpu` preset's DAG at reduced steps in bf16-mixed -> reports/gpu-check.json. It installs
# nothing: GPU_PYTHON must already have a CUDA build of torch and this project's dependencies.
GPU_PYTHON ?= python3
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m tools.gpu_check

frontier: install
	python -m tools.frontier $(FRONTIER_ARGS)

# The committed sweep behind reports/frontier.* and reports/seeds.md: 3 seeds x (PPO / DPO at three regularisation
# strengths, GRPO + SimPO, RLOO, KTO on the pairs made unpaired, KTO on a 1:10 desirable-to-undesirable imbalance,
# online DPO in 3 rounds), queued as DVC experiments named sweep-s<seed>-<point> and run one at a time;
# then `make frontier FRONTIER_ARGS=--group-prefix=sweep-`. evaluate.n_shown_samples differs from params.yaml so
# that every point runs its evaluate stage (and lands in MLflow) even when the run-cache restores all the others.
SWEEP_SEEDS ?= 1234 1 2
SWEEP_Q = dvc exp run --queue -S evaluate.n_shown_samples=8
SWEEP_GROUP = -S ppo.num_generations=4 -S ppo.prompts_per_rollout=16
sweep: install
	for seed in $(SWEEP_SEEDS); do \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-mid; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-low -S dpo.beta=0.03 -S ppo.kl_coef=0.02; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-high -S dpo.beta=0.3 -S ppo.kl_coef=0.2; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-grpo -S ppo.advantage_estimator=grpo $(SWEEP_GROUP) \
	    -S dpo.loss=simpo -S dpo.beta=2.0; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-rloo -S ppo.advantage_estimator=rloo $(SWEEP_GROUP); \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-kto -S dpo.loss=kto -S dpo.beta=0.03 -S dpo.lr=2.0e-4; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-kto-1to10 -S dpo.loss=kto -S dpo.lr=1.0e-4 \
	    -S dpo.kto_desirable_fraction=0.1 -S dpo.kto_lambda_d=10; \
	  $(SWEEP_Q) -S seed=$$seed -n sweep-s$$seed-online -S dpo.online_rounds=3 -S dpo.beta=0.3 -S dpo.lr=2.0e-4; \
	done
	dvc queue start -j 1

# Every dvc plots definition on one self-contained page that draws offline: reports/plots.html.
plots: install
	python -m tools.plots

# dvc.yaml's code deps from each stage's imports (a test fails when they are stale).
deps: install
	python -m tools.deps

# docs/params.md from the config fields (a test fails when it is stale).
docs: install
	python -m tools.docs

# A real-task preset into params.yaml (presets/<name>.yaml: imdb, hh, chat); then `make run` or `dvc repro`.
preset: install
	python -m tools.preset $(PRESET)
