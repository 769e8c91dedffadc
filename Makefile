# The two commands the README promises: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/mailhost.toml

.PHONY: run test venv clean

# The venv is rebuilt when pyproject.toml changes. The install is editable in
# setuptools' "compat" mode: it puts the project root on sys.path, which is what
# lets twistd find twisted/plugins/mailhost_plugin.py (a PEP 660 editable
# install would not, and `twistd mailhost` would be "Unknown command").
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/twistd -n --pidfile= mailhost --config $(CONFIG)

# Most tests wait on a daemon, a socket or a timer, not the CPU: four runners keep two
# cores busy (TEST_JOBS=0 runs them in one process, for a debugger).
TEST_JOBS ?= 4

test: venv
	tests/ensure-peers
# Bytecode for the source, once: where PYTHONDONTWRITEBYTECODE is set (as on our CI) every daemon,
# worker and `mailhost` command a test starts would compile it all again (~0.1-0.3 s of CPU each).
	$(BIN)/python -m compileall -q mailhost twisted
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadgroup)

clean:
	rm -rf $(VENV) var
