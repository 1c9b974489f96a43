# streamscore — the two commands: `make demo` (run it) and `make test`.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/streamscore/cargo-target

.PHONY: test demo env-up env-down env-status build deps crds bench bench-compare chaos scan models clean-dev images

test:            ## fmt, clippy, unit + integration tests against a private local environment
	bash scripts/test.sh

demo:            ## start the environment and show the worker scoring events
	bash scripts/demo.sh

env-up:          ## start Kafka + Kubernetes control plane on 127.0.0.1, write .dev/env.sh
	bash scripts/install-deps.sh
	bash scripts/env.sh up

env-down:        ## stop every process env-up started
	bash scripts/env.sh down

env-status:      ## show what is running
	bash scripts/env.sh status

deps:            ## install missing prerequisites only
	bash scripts/install-deps.sh

build:           ## build every crate
	cargo build --workspace --all-targets

images:          ## operator and worker images as OCI archives, no Docker or registry (README: Images)
	cargo build --locked --bins --profile $(if $(filter-out debug,$(or $(STREAMSCORE_IMAGE_PROFILE),debug)),$(STREAMSCORE_IMAGE_PROFILE),dev)
	bash scripts/images.sh

crds:            ## regenerate the CRD YAML and manifests/ from the Rust types and the chart
	cargo run -q -p streamscore-crds --features kube --bin crdgen > charts/streamscore/files/crds/tenantmodels.yaml
	bash scripts/manifests.sh

bench:           ## benchmarks (see BENCHMARKS.md)
	bash scripts/bench.sh

bench-compare:   ## the reference pipeline on streamscore and on Kafka Streams, same input (see BENCHMARKS.md)
	bash scripts/bench-compare.sh

chaos:           ## fault-injection suite, long form (kills workers and the broker; see BENCHMARKS.md)
	bash scripts/chaos.sh

scan:            ## security scan of the chart and of the objects the operator creates (checkov)
	bash scripts/scan.sh

models:          ## regenerate the test ONNX models and reference scores
	bash scripts/install-deps.sh
	$(HOME)/.cache/streamscore/venv/bin/python models/make_models.py models/

clean-dev:       ## remove local environment state (not the caches)
	bash scripts/env.sh down; rm -rf .dev
