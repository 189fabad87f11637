# pullbox — the one entry point for building and testing.
#
# `make pullers` builds the puller components (wasm32-unknown-unknown, no WASI):
#   target/release/pullbox-puller.wasm     the default puller (guest/)
#   target/release/pullbox-refuse.wasm     the puller that refuses every pull (guest/refuse/)
#   target/release/pullbox-allowlist.wasm  the example policy puller (guest/allowlist/)
#   target/release/pullbox-cosign.wasm     the example signature-checking puller (guest/cosign/)
#   target/release/pullbox-hostile.wasm    the misbehaving puller of the sandbox tests (guest/hostile/)
#
# Toolchain: where rustup has the wasm32-unknown-unknown target installed, the normal
# cargo builds the guests. Otherwise (an offline machine) Debian's rustc-web, cargo-web,
# rust-web-src and lld-22 build the standard library for the target with -Zbuild-std;
# RUSTC must name Debian's compiler, whose version matches rust-web-src, or the rustup
# proxy earlier on PATH wins. The guests get their own target directory, so the host
# build's cache is never invalidated by guest flags. The core modules become components
# with `wasm-tools component new`, which is installed with cargo when missing.

.PHONY: bench bench-engine all build pullers host setup test test-unit test-integration check demo clippy fmt fmt-check lint clean-demo
.DELETE_ON_ERROR:

# ---- variables ------------------------------------------------------------------------

CARGO          ?= cargo
CARGO_BIN      ?= $(or $(CARGO_HOME),$(HOME)/.cargo)/bin
WASM_TOOLS_VERSION := 1.263.0
WASM_TOOLS     ?= $(or $(shell command -v wasm-tools 2>/dev/null),$(CARGO_BIN)/wasm-tools)

WASM_TARGET    := wasm32-unknown-unknown
WASM_PROFILE   := wasm
GUEST_TARGET_DIR := target/wasm
CORE_DIR       := $(GUEST_TARGET_DIR)/$(WASM_TARGET)/$(WASM_PROFILE)
OUT_DIR        := target/release

PULLER_CORE    := $(CORE_DIR)/pullbox_puller.wasm
REFUSE_CORE    := $(CORE_DIR)/pullbox_refuse.wasm
ALLOWLIST_CORE := $(CORE_DIR)/pullbox_allowlist.wasm
COSIGN_CORE    := $(CORE_DIR)/pullbox_cosign.wasm
HOSTILE_CORE   := $(CORE_DIR)/pullbox_hostile.wasm
PULLER         := $(OUT_DIR)/pullbox-puller.wasm
REFUSE         := $(OUT_DIR)/pullbox-refuse.wasm
ALLOWLIST      := $(OUT_DIR)/pullbox-allowlist.wasm
COSIGN         := $(OUT_DIR)/pullbox-cosign.wasm
HOSTILE        := $(OUT_DIR)/pullbox-hostile.wasm

# Everything a guest build reads. When only the host's part of Cargo.lock changed, cargo
# finds nothing to do and the components are merely re-wrapped (about a second).
GUEST_SOURCES  := Cargo.toml Cargo.lock $(wildcard wit/*.wit) \
                  $(shell find guest -name '*.rs' -o -name Cargo.toml 2>/dev/null)

# rustup with the target installed: the ordinary build. Otherwise Debian's toolchain.
HAVE_RUSTUP_WASM := $(shell rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) && echo yes)
ifeq ($(HAVE_RUSTUP_WASM),yes)
GUEST_CARGO    := $(CARGO)
GUEST_ENV      :=
GUEST_FLAGS    :=
else
DEBIAN_RUSTC   ?= /usr/bin/rustc
DEBIAN_CARGO   ?= /usr/bin/cargo
# rustc links wasm with `rust-lld` (Debian's rust-web-llvm ships /usr/bin/rust-lld); where
# only lld-22's wasm-ld exists, name it as the linker for this target alone.
WASM_LINKER    ?= $(if $(shell command -v rust-lld 2>/dev/null),,$(shell command -v wasm-ld-22 2>/dev/null || command -v wasm-ld 2>/dev/null))
GUEST_CARGO    := $(DEBIAN_CARGO)
GUEST_ENV      := RUSTC=$(DEBIAN_RUSTC) RUSTC_BOOTSTRAP=1 \
                  $(if $(WASM_LINKER),CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=$(WASM_LINKER))
GUEST_FLAGS    := -Zbuild-std=std,panic_abort
endif

# ---- pullers --------------------------------------------------------------------------

pullers: $(PULLER) $(REFUSE) $(ALLOWLIST) $(COSIGN) $(HOSTILE)

WASM_TOOLCHAIN_CHECK = @test -n "$(HAVE_RUSTUP_WASM)" || { test -x $(DEBIAN_RUSTC) && test -x $(DEBIAN_CARGO); } || { \
	  echo "error: no wasm32 toolchain: rustup target add $(WASM_TARGET), or apt-get install rustc-web cargo-web rust-web-src lld-22" >&2; exit 1; }

# One cargo run builds the default and refuse core modules. Cargo does not touch an output
# it did not relink, so the outputs are touched to stay newer than the sources make compared.
$(PULLER_CORE) $(REFUSE_CORE) &: $(GUEST_SOURCES)
	$(WASM_TOOLCHAIN_CHECK)
	$(GUEST_ENV) CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) $(GUEST_CARGO) build $(GUEST_FLAGS) \
	  --target $(WASM_TARGET) --profile $(WASM_PROFILE) -p pullbox-puller -p pullbox-refuse
	touch $(PULLER_CORE) $(REFUSE_CORE)

# The allowlist puller links pullbox-puller as a library with its exports off (no feature
# `component`). It gets a cargo run of its own: in one run cargo would unify the features
# and link the default puller's exports into it too. Both runs write pullbox-puller's
# dependency cdylib under the same name, so each recompiles that crate (seconds) when the
# other ran last; the uplifted core modules are only written by their own run. The
# order-only prerequisite keeps the two runs from interleaving under `make -j`.
$(ALLOWLIST_CORE): $(GUEST_SOURCES) | $(PULLER_CORE)
	$(WASM_TOOLCHAIN_CHECK)
	$(GUEST_ENV) CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) $(GUEST_CARGO) build $(GUEST_FLAGS) \
	  --target $(WASM_TARGET) --profile $(WASM_PROFILE) -p pullbox-allowlist
	touch $(ALLOWLIST_CORE)

# The cosign puller links pullbox-puller as a library too, so it gets a run of its own for
# the same reason; it follows the allowlist's run (order-only) so the two never interleave.
$(COSIGN_CORE): $(GUEST_SOURCES) | $(ALLOWLIST_CORE)
	$(WASM_TOOLCHAIN_CHECK)
	$(GUEST_ENV) CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) $(GUEST_CARGO) build $(GUEST_FLAGS) \
	  --target $(WASM_TARGET) --profile $(WASM_PROFILE) -p pullbox-cosign
	touch $(COSIGN_CORE)

# The hostile puller (tests/all/sandbox/) depends on no other guest crate; a run of its
# own keeps this rule apart from the others'.
$(HOSTILE_CORE): $(GUEST_SOURCES) | $(PULLER_CORE)
	$(WASM_TOOLCHAIN_CHECK)
	$(GUEST_ENV) CARGO_TARGET_DIR=$(GUEST_TARGET_DIR) $(GUEST_CARGO) build $(GUEST_FLAGS) \
	  --target $(WASM_TARGET) --profile $(WASM_PROFILE) -p pullbox-hostile
	touch $(HOSTILE_CORE)

# Core module -> component, validated before it replaces the old one.
$(OUT_DIR)/pullbox-%.wasm: $(CORE_DIR)/pullbox_%.wasm | $(WASM_TOOLS)
	@mkdir -p $(OUT_DIR)
	$(WASM_TOOLS) component new $< -o $@.tmp && \
	  $(WASM_TOOLS) validate --features component-model $@.tmp && \
	  mv $@.tmp $@ || { rm -f $@.tmp; exit 1; }

# Only the subcommands the build uses: a full wasm-tools takes several times longer to build.
WASM_TOOLS_FEATURES := component,validate,print,parse

$(CARGO_BIN)/wasm-tools:
	$(CARGO) install wasm-tools --version $(WASM_TOOLS_VERSION) --locked \
	  --no-default-features --features $(WASM_TOOLS_FEATURES)

# ---- host, build, tests ----------------------------------------------------------------

all: build

# The host binary and the test harness binaries (the demo) in one cargo run.
host:
	$(CARGO) build --release --locked -p pullbox -p pullbox-tests

build: host pullers

# Debian packages and cargo tools the build and the tests need (run as root); `time`, `zstd`
# and `e2fsprogs` (mkfs.ext4 for its scratch filesystem) are for `make bench`.
APT_PACKAGES := build-essential pkg-config ca-certificates git \
                rustc-web cargo-web rust-web-src lld-22 protobuf-compiler \
                docker-registry umoci skopeo busybox-static containerd runc jq curl time zstd e2fsprogs \
                python3-venv

# A grpc C-core client for the CRI tests (tests/src/cri.rs `grpcio_call`): PyPI's grpcio in a
# virtualenv. Debian 12's python3-grpcio (1.51) predates the socket-path `:authority` that
# C-core sends since 1.57, which the tests must meet.
GRPCIO_VERSION := 1.85.4
GRPCIO_VENV    := target/grpcio

setup:
	@if ! dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -qv '^install ok installed$$' \
	    && [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | wc -l)" -eq "$(words $(APT_PACKAGES))" ]; then \
	  echo "Debian packages: all present"; \
	else \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(APT_PACKAGES) </dev/null; \
	fi
	@if [ "$$($(WASM_TOOLS) --version 2>/dev/null | awk '{print $$2}')" != "$(WASM_TOOLS_VERSION)" ]; then \
	  $(CARGO) install wasm-tools --version $(WASM_TOOLS_VERSION) --locked --no-default-features --features $(WASM_TOOLS_FEATURES); \
	fi
	@if [ "$$($(GRPCIO_VENV)/bin/python -c 'import grpc; print(grpc.__version__)' 2>/dev/null)" != "$(GRPCIO_VERSION)" ]; then \
	  /usr/bin/python3 -m venv $(GRPCIO_VENV) && \
	  $(GRPCIO_VENV)/bin/pip install --quiet --disable-pip-version-check --only-binary=:all: grpcio==$(GRPCIO_VERSION); \
	fi

# Unit tests: host (backends, transport, engine glue) and the pullers' logic, natively.
test-unit:
	$(CARGO) test --release --locked -p pullbox -p pullbox-puller -p pullbox-refuse -p pullbox-allowlist -p pullbox-cosign

# Integration tests: the real binary and pullers against a real registry, umoci, skopeo;
# one test binary, tests/all/, one module per suite (run one: `cargo test --release -p
# pullbox-tests --test all -- sandbox::`). Tests that need root are `#[ignore = "needs root:
# ..."]`, so an ordinary user's run lists them as ignored; run as root (as CI runs) they are
# included. Measurements (`#[ignore = "measurement ..."]`, which print figures rather than
# check) stay out: they are named in MEASUREMENTS.
MEASUREMENTS       := cri_containerd_images::list_images_of_many_unlabelled_records
INTEGRATION_FLAGS  := $(if $(filter 0,$(shell id -u)),--include-ignored $(addprefix --skip ,$(MEASUREMENTS)))

test-integration: build
	$(CARGO) test --release --locked -p pullbox-tests -- $(INTEGRATION_FLAGS)

# Lints first: the formatting check and clippy (-D warnings) fail fast.
lint: fmt-check clippy

test: lint build test-unit test-integration

# What CI runs, and the README's test command: set up the machine, then build and test.
check: setup test

# The main job on a machine without internet: a local registry with an image built from
# busybox-static, pulled with the default puller into an embedded store under target/.
DEMO_ROOT ?= target/demo-root
demo: setup build
	./target/release/pullbox-demo $(DEMO_ROOT)

# Printed figures, not timed tests: the sandbox's per-request overhead and the guest's share
# of a pull's wall time.
bench-engine: build
	./target/release/pullbox-bench-engine

# Side by side with containerd's own pull (issue 8): images built once under
# target/bench-images/, pushed to a local registry; needs root (containerd). BENCHMARKS.md.
bench: build
	./target/release/pullbox-bench-pull

clippy:
	$(CARGO) clippy --release --locked -p pullbox -p pullbox-tests -p pullbox-puller -p pullbox-refuse -p pullbox-allowlist -p pullbox-cosign -p pullbox-hostile --all-targets -- -D warnings
	@! grep -rn --include='*.rs' 'allow(clippy::too_many_arguments)' host guest tests || { echo 'no too_many_arguments allows: pass the struct that owns the parameters'; exit 1; }

fmt:
	$(CARGO) fmt --all

# rustfmt.toml is the house style; CI refuses a tree `make fmt` would change.
fmt-check:
	$(CARGO) fmt --all --check
