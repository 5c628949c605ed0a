# Convenience front end over CMake. `make demo` and `make test` are all most people need.
#
#   make demo       install missing packages, build into build/, run examples/quickstart.lua
#   make test       build, run every non-GPU test, then the C tests under ASan+UBSan,
#                   the safetensors/PEFT fuzzer (clang; FUZZ_RUNS inputs from seed
#                   FUZZ_SEED, FUZZ_TIME seconds at most), the Lua-boundary fuzzer
#                   under both runtimes (ASan+UBSan), and the install-tree test
#                   (find_package, pkg-config, luarocks make), the WebAssembly
#                   tests under Node (make test-wasm) and the web page in headless
#                   Chromium (make test-web)
#   make test-gpu   the tests that need a GPU (ctest -L gpu), then under compute-sanitizer
#   make bench      build and run the benchmarks (GPU ones when a GPU is visible)
#   make wasm       install emscripten and node, fetch Lua's and cJSON's C sources
#                   (apt-get source), build the WebAssembly module into build-wasm/
#   make web        make wasm, then serve the web page (examples/web/) on
#                   http://127.0.0.1:8011/ (WEB_PORT) until Ctrl-C
#
# Variables: CUDA=0 forces a CPU-only build; CUDA_ARCHS="90a" builds for fewer GPU
# architectures (the default fatbin covers sm_80/86/89/90a and takes a while);
# JOBS sets the parallelism (default: the number of cores).

BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CUDA       ?= 1
CUDA_ARCHS ?=
FUZZ_BUILD ?= build-fuzz
FUZZ_TIME  ?= 60
FUZZ_SEED  ?= 1
FUZZ_RUNS  ?= 400000
WASM_BUILD ?= build-wasm
WEB_PORT   ?= 8011

# CUDA when nvcc exists (on PATH or in the toolkit's usual place), else CPU only.
NVCC := $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
ifeq ($(CUDA)$(if $(NVCC),yes,no),1yes)
  CUDA_FLAGS := -DLMOE_CUDA=ON -DCMAKE_CUDA_COMPILER=$(NVCC) \
                $(if $(CUDA_ARCHS),"-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)")
else
  CUDA_FLAGS := -DLMOE_CUDA=OFF
endif

CTEST := ctest --output-on-failure -j $(JOBS)

.PHONY: all deps build demo test test-asan test-fuzz test-fuzz-lua test-install test-gpu bench clean wasm \
        test-wasm web test-web

all: build

deps:
	@sh tools/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) $(CUDA_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/cli/loramoe run examples/quickstart.lua

test: build
	cd $(BUILD) && $(CTEST) -LE gpu
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test-fuzz
	$(MAKE) --no-print-directory test-fuzz-lua
	$(MAKE) --no-print-directory test-install
	$(MAKE) --no-print-directory test-wasm
	$(MAKE) --no-print-directory test-web

# The C tests and the CUDA backend on the simulated device (tests/sim) again, built with
# AddressSanitizer and UBSan (no nvcc: the sanitizers don't see into device code, and
# it keeps this build quick).
test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DLMOE_SANITIZE=address,undefined -DLMOE_CUDA=OFF -DLMOE_BENCH=OFF
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && $(CTEST) -L 'c|sim'

# libFuzzer over the safetensors reader and the PEFT mapping, bounded in time, under
# ASan+UBSan. Needs clang (libFuzzer ships with its runtime).
test-fuzz: deps
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLMOE_CUDA=OFF \
	  -DLMOE_LUA=OFF -DLMOE_BENCH=OFF -DLMOE_FUZZ_TIME=$(FUZZ_TIME) -DLMOE_FUZZ_SEED=$(FUZZ_SEED) \
	  -DLMOE_FUZZ_RUNS=$(FUZZ_RUNS)
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_formats
	cd $(FUZZ_BUILD) && ctest --output-on-failure -L fuzz

# The Lua-boundary fuzzer (fuzz/fuzz_lua.lua): random API calls with hostile values under
# lua5.4 (the C module) and luajit (the FFI binding), the library and module built with
# ASan+UBSan; a fixed seed and count, 60 s at most each.
LUA_FUZZ_BUILD ?= build-lua-asan
test-fuzz-lua: deps
	cmake -S . -B $(LUA_FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DLMOE_SANITIZE=address,undefined -DLMOE_CUDA=OFF -DLMOE_BENCH=OFF
	cmake --build $(LUA_FUZZ_BUILD) -j $(JOBS)
	cd $(LUA_FUZZ_BUILD) && ctest --output-on-failure -L fuzz_lua

# Install into a temporary prefix; build the embedding example against it with
# find_package(loramoe) and with pkg-config; luarocks make from the checkout.
test-install: deps
	JOBS=$(JOBS) sh examples/host/test-install.sh

test-gpu: build
	cd $(BUILD) && $(CTEST) -L gpu
	bash tools/gpu-sanitize.sh $(BUILD)

# The CPU benchmarks; with a GPU visible, bench/gpu/run.sh too (loramoe and the torch
# peer on the same card).
bench: build
	@set -e; for b in $$(find $(BUILD)/bench -maxdepth 1 -type f -executable | sort); do \
	  echo "== $$b"; "$$b"; done
	@if $(BUILD)/cli/loramoe info | grep -q '^devices: *[1-9]' && [ -x $(BUILD)/bench/gpu/bench_gpu ]; then \
	  BUILD=$(abspath $(BUILD)) bash bench/gpu/run.sh; \
	else echo "(no GPU visible or no CUDA build: GPU benchmarks skipped)"; fi

# The WebAssembly module (wasm/build.sh): the same C sources with emscripten, Lua 5.4
# and cJSON from Debian's source packages; `$(WASM_BUILD)/loramoe run SCRIPT` under Node.
wasm:
	@sh tools/install-wasm-deps.sh $(WASM_BUILD)/src
	JOBS=$(JOBS) sh wasm/build.sh $(WASM_BUILD)

# Under Node: the spec files and the malformed-file corpus on the WebAssembly module,
# the command's tests and the examples, the JavaScript face (tests/wasm/run.mjs).
test-wasm: wasm
	node tests/wasm/run.mjs $(WASM_BUILD)

# The web page (examples/web/), served on the loopback with the headers that allow
# threads (cross-origin isolation); open the URL it prints.
web: wasm
	node examples/web/serve.mjs --build $(WASM_BUILD) --port $(WEB_PORT)

# The web page in Debian's chromium, headless (installed when missing; CHROMIUM names
# another): the quickstart, an experiment's plot, an error, a PEFT adapter from the file
# input, the one-thread build (tests/web/run.mjs). Writes $(WASM_BUILD)/web-page.png.
test-web: wasm
	@sh tools/install-wasm-deps.sh $(WASM_BUILD)/src --browser
	node tests/web/run.mjs $(WASM_BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(WASM_BUILD)
