# pullsecret — see README.md. Every target runs from a clean checkout.
GO        ?= go
BIN       ?= bin
GOBIN     ?= $(shell $(GO) env GOPATH)/bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
PKGS      := ./...
FUZZTIME  ?= 15s
STATICCHECK_VERSION ?= v0.8.2

.PHONY: all build image run demo replicas test test-short bench fuzz lint conformance clean tools

all: build

# Static binaries: a dynamically linked helper pays ~1 ms of loader time on
# every pull, and static ones drop onto any node.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

# The container image of deploy/image: the static binaries on an empty base,
# UID 65532 (podman, else docker; no network needed).
IMAGE          ?= pullsecret:$(VERSION)
CONTAINER_TOOL ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
image: build
	@test -n "$(CONTAINER_TOOL)" || { echo 'make image: needs podman or docker'; exit 1; }
	@ctx=$$(mktemp -d) && trap 'rm -rf "$$ctx"' EXIT && \
		sh deploy/image/stage.sh $(BIN) "$$ctx" && \
		$(CONTAINER_TOOL) build -f deploy/image/Containerfile -t $(IMAGE) "$$ctx"

# The main job on embedded defaults: a private in-process registry, a pull
# secret, and a pull that resolves it at pull time.
run demo: build
	$(BIN)/pullsecret demo

# Three replicas on PostgreSQL and versitygw behind a round-robin front on
# 127.0.0.1:5080, until Ctrl-C (deploy/local/README.md).
replicas: build
	$(GO) run ./deploy/local -bin $(BIN)

# Unit, integration and real-client end-to-end tests (crane, skopeo, podman,
# dockerd, containerd — installed by .ci/run). Under 15 minutes on 2 cores.
test:
	$(GO) test -race -count=1 -timeout 14m $(PKGS)

test-short:
	$(GO) test -short -count=1 $(PKGS)

# Benchmarks report ratios against a baseline measured in the same run.
bench: build
	$(GO) run ./internal/bench -bin $(BIN)

# A short run of every fuzz target; FUZZTIME=10m for a long one.
fuzz:
	@set -e; for spec in \
		./secret:FuzzParseServerURL ./secret:FuzzPatternMatch ./secret:FuzzValidRepo \
		./secret/dockerconfig:FuzzParseDockerConfig ./credhelper:FuzzHelperStdin \
		./credhelper/kubelet:FuzzDecodeProviderRequest ./credhelper/kubelet:FuzzMatchImage \
		./proxy:FuzzParseScopes ./proxy:FuzzParseConfig ./spec:FuzzParse ./cmd/pullsecret:FuzzRun; do \
		pkg=$${spec%%:*}; fn=$${spec##*:}; \
		echo "== $$fn ($$pkg)"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME); \
	done

# The OCI distribution-spec conformance suite, read-only pull workflow,
# against `pullsecret serve` in front of a private upstream.
CONFORMANCE_VERSION ?= v0.0.0-20260831232431-97274622c111
conformance: build
	@test -x $(BIN)/oci-conformance || GOBIN=$(abspath $(BIN)) $(GO) install github.com/opencontainers/distribution-spec/conformance@$(CONFORMANCE_VERSION)
	@test -x $(BIN)/oci-conformance || mv $(BIN)/conformance $(BIN)/oci-conformance
	$(GO) run ./internal/conformance -bin $(BIN) -suite $(abspath $(BIN))/oci-conformance

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: run gofmt -w'; exit 1; }
	$(GO) vet $(PKGS)
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GOBIN)/staticcheck $(PKGS)

clean:
	rm -rf $(BIN)
