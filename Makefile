# shopvision — `make run` starts the whole stack on loopback; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements.txt requirements-train.txt requirements-dev.txt
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/shopvision/v1/*.proto)
GEN_STAMP := gen/.stamp
IMAGENET_MODEL := model_repository/efficientnet_lite0_imagenet_onnx/1/model.onnx
# Debian packages the project needs (installed only when missing).
APT_PACKAGES ?=
PYTEST_ARGS ?=
RUN_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup deps venv protos models run test lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: deps venv protos models ## everything `make run` and `make test` need

deps: ## Debian packages (apt-get, only those missing)
	@bash tools/apt-install.sh $(APT_PACKAGES)

venv: $(STAMP) ## .venv with every Python dependency (pinned)
$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS))
	@# Make the repository and the generated stubs importable from the venv.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/shopvision.pth"
	touch $@

protos: $(GEN_STAMP) ## generate the Python gRPC stubs into gen/
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch gen/shopvision/__init__.py gen/shopvision/v1/__init__.py $@

models: $(IMAGENET_MODEL) ## export the ONNX models into model_repository/
$(IMAGENET_MODEL): training/export_imagenet.py training/onnx_export.py $(STAMP)
	$(PY) -m training.export_imagenet --repository model_repository

run: setup ## start Triton + preprocess + gateway on loopback, classify a sample, serve until Ctrl-C
	$(PY) -m services.stack $(RUN_ARGS)

test: setup ## run the whole test suite (starts every server it needs)
	$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: venv protos ## ruff + mypy
	$(VENV)/bin/ruff check services training tests tools
	$(VENV)/bin/mypy services training

clean: ## remove generated files (keeps .venv)
	rm -rf gen .cache .pytest_cache $(IMAGENET_MODEL)
