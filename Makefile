# Developer targets for qgnn-deploy (issue 9: hardening).
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
HARDENING_TESTS = tests/test_hostile_files.py tests/test_fuzz_kernels.py tests/test_numerics.py \
                  tests/test_concurrency.py tests/test_cli_errors.py

.PHONY: help ext hardening hardening-slow sanitize sanitize-run fuzz

help:
	@echo "make ext             build the C++ extension in place"
	@echo "make hardening       hostile files, kernel fuzzing, numerics, concurrency, CLI errors"
	@echo "make hardening-slow  the same with the @slow cases (bigger hypothesis runs)"
	@echo "make fuzz            kernel argument fuzzing only"
	@echo "make sanitize        ASan+UBSan build in build/sanitize/tree + kernel tests under it"
	@echo "make sanitize-run    rerun the sanitized tests without rebuilding"

ext:
	$(PYTHON) -m pip install -e . --no-build-isolation -q

hardening:
	$(PYTHON) -m pytest -q -m "not slow" $(HARDENING_TESTS)

hardening-slow:
	$(PYTHON) -m pytest -q -m "slow or not slow" $(HARDENING_TESTS)

fuzz:
	$(PYTHON) -m pytest -q tests/test_fuzz_kernels.py

# Builds a private sanitized copy (the in-place extension is untouched); see scripts/sanitize.sh.
sanitize:
	PYTHON=$(PYTHON) scripts/sanitize.sh $(TESTS)

sanitize-run:
	SANITIZE_SKIP_BUILD=1 PYTHON=$(PYTHON) scripts/sanitize.sh $(TESTS)
