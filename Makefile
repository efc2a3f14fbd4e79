# Every entry point a person uses. `make dev` and `make test` work first on a
# fresh Debian 12 / Ubuntu 24.04 machine: both go through `make deps`.

SHELL := /bin/bash
CARGO ?= cargo
API_CONFIG ?= dev/config/api.yaml
BUF := node_modules/.bin/buf

.PHONY: help deps build build-api build-agent dev stop-dev etcd-reset test bench fmt lint buf-lint buf-breaking buf-baseline ci clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

deps: ## Install the system packages and tools that are missing
	@bash dev/scripts/deps.sh

build: deps ## Build every binary into bin/
	$(CARGO) build --workspace --bins
	@mkdir -p bin && for b in otherix-api otherix-agent otherix; do install -m 0755 target/debug/$$b bin/$$b; done

build-api: deps ## Build bin/otherix-api
	$(CARGO) build -p otherix-api --bin otherix-api
	@mkdir -p bin && install -m 0755 target/debug/otherix-api bin/otherix-api

build-agent: deps ## Build bin/otherix-agent
	$(CARGO) build -p otherix-agent --bin otherix-agent
	@mkdir -p bin && install -m 0755 target/debug/otherix-agent bin/otherix-agent

dev: build-api ## Start otherix-api with its own etcd in the background (log: .local/run/otherix-api.log)
	@API_CONFIG=$(API_CONFIG) bash dev/scripts/dev-start.sh

stop-dev: ## Stop the dev otherix-api (and its etcd member)
	@bash dev/scripts/dev-stop.sh

etcd-reset: stop-dev ## Wipe the dev etcd data (cluster settings, and later the cluster CA)
	rm -rf .local/etcd .local/etcd.pid
	@echo "dev etcd data wiped"

test: deps ## Run every test: unit, integration (real etcd), end to end (real binaries)
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

bench: deps ## Load benchmarks (release build); figures go to stdout
	$(CARGO) build --release -p otherix-api -p otherix-bench -p otherix-agent -p otherix-agent-bench
	./target/release/otherix-bench
	./target/release/otherix-agent-load --api target/release/otherix-api
	./target/release/otherix-agent-bench --agent-bin target/release/otherix-agent

fmt: ## Format the code
	$(CARGO) fmt --all

lint: deps ## rustfmt, clippy and buf checks, as CI runs them
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(MAKE) buf-lint buf-breaking

buf-lint: deps ## Lint proto/
	$(BUF) lint

buf-breaking: deps ## Check proto/ and proto-internal/ against their committed baseline images
	$(BUF) breaking proto --against proto/baseline/image.binpb
	$(BUF) breaking proto-internal --against proto-internal/baseline/image.binpb

buf-baseline: deps ## Record the current contracts as the compatibility baselines (on purpose only: docs/api-conventions.md)
	@mkdir -p proto/baseline proto-internal/baseline
	$(BUF) build proto -o proto/baseline/image.binpb
	$(BUF) build proto-internal -o proto-internal/baseline/image.binpb

ci: ## What CI runs
	bash .ci/run

clean: stop-dev ## Remove build output and dev state
	$(CARGO) clean
	rm -rf bin .local
