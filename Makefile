# criuweb: `make run` serves the app with a lab and demo workloads;
# `make test` runs every test. Both set up what they need, as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIND ?= 127.0.0.1:8000
# pytest-xdist workers for `make test`, each with a lab and database of its
# own (criuweb/settings_test.py). The lab tests mostly wait on SSH, CRIU and
# Docker, so three workers on two cores halve the time (docs/benchmarks.md).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3

.PHONY: setup run worker test lab-down bench api-schema

$(VENV)/.ready-$(shell cat requirements.txt | md5sum | cut -c1-8): requirements.txt
	bash scripts/setup-system.sh  # python3-venv first
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.ready-*
	touch $@

# setup-system.sh runs every time (it takes a fraction of a second when all
# is there) so that an edited script applies without touching requirements.
setup: $(VENV)/.ready-$(shell cat requirements.txt | md5sum | cut -c1-8)
	bash scripts/setup-system.sh
	$(PY) manage.py migrate --verbosity 0

# The first time, ensure_admin writes the admin password to var/admin-password
# (mode 0600) and prints only that path.
run: setup
	$(PY) manage.py lab up --demo
	BIND=$(BIND) $(PY) manage.py ensure_admin
	$(PY) manage.py collectstatic --no-input --verbosity 0
	@# Runs are executed by workers, not by gunicorn (docs/workers.md). The
	@# worker is in a session of its own so that Ctrl-C reaches gunicorn only;
	@# when gunicorn exits, the worker gets SIGTERM (by its PID) and stops after
	@# the run in hand.
	@setsid $(PY) manage.py criuweb_worker & worker=$$!; \
	trap "echo 'make run: stopping the worker (PID $$worker) after its run in hand'; kill -TERM $$worker; wait $$worker" EXIT; \
	trap 'exit 130' INT TERM; \
	echo "make run: one worker (PID $$worker) executes the runs; gunicorn serves http://$(BIND)/"; \
	$(VENV)/bin/gunicorn criuweb.wsgi --bind $(BIND) --workers 1 --threads 8 --timeout 300 --graceful-timeout 300 --access-logfile -

# One worker in the foreground: it executes queued runs and takes over the
# runs of workers that died (docs/workers.md). Ctrl-C stops it after the run in hand.
worker: setup
	$(PY) manage.py criuweb_worker

# The database tests run twice: on a throwaway PostgreSQL server of their own
# (CRIUWEB_TEST_DB=postgres, docs/testing.md), then on SQLite with the rest,
# in TEST_WORKERS processes (the PostgreSQL pass takes some 20 s: one process).
test: setup
	$(VENV)/bin/ruff check .
	CRIUWEB_TEST_DB=postgres $(VENV)/bin/pytest -m "db and not lab"
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadgroup

lab-down: setup
	$(PY) manage.py lab down

bench: setup
	$(PY) manage.py lab up --demo
	$(PY) manage.py bench_downtime --runs 10

# The API's OpenAPI schema, checked in for readers and client generators;
# tests/test_api.py fails when it differs from what the code serves.
api-schema: setup
	$(PY) manage.py spectacular --validate --fail-on-warn --file docs/api-schema.yaml
