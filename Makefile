# pullsecret — see README.md. Every target runs from a clean checkout.
GO        ?= go
BIN       ?= bin
GOBIN     ?= $(shell $(GO) env GOPATH)/bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
PKGS      := ./...
FUZZTIME  ?= 15s
STATICCHECK_VERSION ?= v0.8.2

.PHONY: all build run demo test test-short bench fuzz lint conformance clean tools

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

# The main job on embedded defaults: a private in-process registry, a pull
# secret, and a pull that resolves it at pull time.
run demo: build
	$(BIN)/pullsecret demo

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
		./secret:FuzzParseServerURL ./secret:FuzzPatternMatch ./secret:FuzzParseDockerConfig \
		./credhelper:FuzzHelperStdin ; do \
		pkg=$${spec%%:*}; fn=$${spec##*:}; \
		echo "== $$fn ($$pkg)"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME); \
	done

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: run gofmt -w'; exit 1; }
	$(GO) vet $(PKGS)
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GOBIN)/staticcheck $(PKGS)

clean:
	rm -rf $(BIN)
