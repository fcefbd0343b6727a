# The two commands a newcomer needs: `make up` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE  := tests/asyncapi/node_modules/.installed-stamp

.PHONY: install up down logs status test test-containers unit soak lint format bench docs docs-serve \
  compose-env images-offline lock audit clean

$(STAMP): requirements.txt requirements-dev.txt shared/*/pyproject.toml tools/stack/pyproject.toml services/*/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e shared/servicekit -e shared/messaging -e tools/stack \
	  -e services/person -e services/score -e services/notifier -e services/console
	touch $(STAMP)

# The AsyncAPI parser make test runs (npm); make up needs no Node.
$(NODE): tests/asyncapi/package-lock.json
	npm ci --prefix tests/asyncapi --no-audit --no-fund --silent
	touch $(NODE)

install: $(STAMP) $(NODE)

## Start every process and Traefik in the background; returns once all answer through Traefik.
## Servers that do not answer run in containers when a Docker engine does (STACK_SERVERS).
up: $(STAMP)
	$(PY) -m stack.up up

down:
	$(PY) -m stack.up down

logs:
	$(PY) -m stack.up logs

status:
	$(PY) -m stack.up status

## The whole suite: lint, unit, integration and fault tests against the real servers. Side by side
## on TEST_WORKERS workers (pytest-xdist; each test module on one worker: conftest.py), then alone
## the tests that stop the RabbitMQ every other test uses (marker serial). Both parts run,
## whatever the first gives.
TEST_WORKERS ?= 3
test: install lint
	status=0; \
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not serial" || status=$$?; \
	$(PY) -m pytest -m serial || status=$$?; \
	exit $$status

## Only the container paths (marker containers; a Docker engine required): what .ci/run adds to
## make test against the local servers.
test-containers: install
	TEST_USE_CONTAINERS=yes $(PY) -m pytest -p no:cacheprovider -m containers

unit: install
	$(PY) -m pytest -m unit

## The generated tests with the long profile (thousands of histories and hostile messages, forty
## fault schedules).
soak: install
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest -o timeout=0 tests/test_read_model_histories.py tests/test_hostile_messages.py tests/e2e/test_fault_schedule.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## The documentation site (mkdocs.yml, docs/): built into site/ with --strict, so a broken link,
## a missing page or anchor fails it (make test builds it too: tests/test_docs.py).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## The site served at http://127.0.0.1:8001/, rebuilt as you edit it.
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

## requirements.lock: requirements.txt and requirements-build.txt (the pins people edit) with the
## hash of every file of each release, from the public index alone (no local wheels or extra
## indexes of this machine): the images install it with --require-hashes. Run it after changing
## either; make test checks that they agree (tests/test_supply_chain.py).
lock: install
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
	  $(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
	  --output-file requirements.lock requirements.txt requirements-build.txt

## Known vulnerabilities in the pins of every requirement file (pip-audit, PyPI's advisories);
## make test runs the same check (tests/test_supply_chain.py).
audit: install
	$(VENV)/bin/pip-audit --strict --no-deps --disable-pip --progress-spinner off -r requirements.txt -r requirements-dev.txt -r requirements-build.txt

## Secrets for the compose stack: writes the missing ones to .env (docker compose up -d --wait).
compose-env: install
	$(PY) -m stack.compose_env

## Stand-in images built from Debian packages, for a Docker engine with no registry (docs/containers.md).
images-offline: install
	$(PY) -m stack.images_offline

## The benchmark (bench/README.md): raw ceilings, relay, and the whole stack; a few minutes.
bench: install
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
