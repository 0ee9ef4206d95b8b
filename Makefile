# pacsgw — the two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNDIR := run

.PHONY: venv run test bench bench-smb bench-replay model clean image image-test image-kernel-test

venv: $(VENV)/.installed

$(BIN)/python:
	@.ci/apt-needs venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What make run needs: the agent and the local object store (a quick first start: no test tools).
$(VENV)/.run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[devstack]'
	touch $@

# The agent, its test and lint tools. No compiler needed (pyfuse3 is the smb extra).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The smb extra (pyfuse3 builds against libfuse3-dev): SMB in make run, and make test.
$(VENV)/.smb: pyproject.toml | $(BIN)/python
	@.ci/apt-needs smb
	$(BIN)/pip install --quiet -e '.[smb]'
	touch $@

# A local SeaweedFS on 127.0.0.1:8333 and the agent with examples/agent.toml, in the foreground.
# SMB needs root and Samba + FUSE: without them the agent starts with SMB off and says how to turn it on.
run: $(VENV)/.run
	@mkdir -p $(RUNDIR)
	@chmod 600 examples/agent.toml  # it holds (example) secrets: the agent refuses a world-readable one
	@if [ "$$(id -u)" = 0 ] && [ -x /usr/sbin/smbd ] && command -v fusermount3 >/dev/null; then \
	  $(MAKE) --no-print-directory $(VENV)/.smb && cp examples/agent.toml $(RUNDIR)/agent.toml; \
	else \
	  sed '/^\[smb\]/,/^\[/ s/^enabled = true/enabled = false/' examples/agent.toml > $(RUNDIR)/agent.toml; \
	  echo "SMB   off: it needs root and Samba + FUSE. To turn it on, as root:"; \
	  echo "        apt-get install -y samba fuse3 libfuse3-dev pkg-config gcc python3-dev && make run"; \
	fi; chmod 600 $(RUNDIR)/agent.toml
	@$(BIN)/python tests/devstack.py --dir $(RUNDIR)/s3 --port 8333 --bucket pacs & \
	  store=$$!; trap 'kill $$store 2>/dev/null; wait $$store' EXIT INT TERM; \
	  for i in $$(seq 1 100); do curl -s -o /dev/null 127.0.0.1:8333 && break; sleep 0.2; done; \
	  echo "FTP   ftp://pacs:pacs-example@127.0.0.1:2121  (example credentials)"; \
	  echo "SFTP  sftp -P 2222 pacs@127.0.0.1             (password pacs-example)"; \
	  sed -n '/^\[smb\]/,/^\[/p' $(RUNDIR)/agent.toml | grep -q '^enabled = true' && \
	  echo "SMB3  smbclient //127.0.0.1/pacs -p 4450 -U pacs  (apt smbclient; password pacs-example)"; \
	  echo "HTTP  http://127.0.0.1:8080/status  /healthz  /metrics"; \
	  $(BIN)/pacsgw run --config $(RUNDIR)/agent.toml

# Everything CI runs. Needs root: installs the Debian packages it needs (.ci/apt-needs test) first.
# Two pytest-xdist workers: the tests that build and boot the appliance run in order on one (tests/conftest.py
# schedules them as one unit), the rest beside them, a module at a time.
# Serially: make test PYTEST_WORKERS=
PYTEST_WORKERS ?= -n 2
test:
	@.ci/apt-needs test
	@$(MAKE) --no-print-directory $(VENV)/.installed $(VENV)/.smb
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_WORKERS)

# The appliance disk image (issue 6): build/image/pacsgw.raw and pacsgw.qcow2. Needs root.
image: venv
	PACSGW_VENV_BIN=$(abspath $(BIN)) image/build.sh --out build/image

# Build the image and boot it under qemu (TCG), checking /healthz over a forwarded port.
image-test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/ansible/test_image_boot.py

# Only the kernel test: a newer kernel package installed on the booted image reaches the ESP and boots.
image-kernel-test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/ansible/test_image_boot.py -k kernel

bench: venv
	$(BIN)/python bench/ingest.py

# SMB ingest over the agent vs Samba over a plain directory (root, samba, fuse3).
bench-smb: venv $(VENV)/.smb
	$(BIN)/python bench/ingest_smb.py

# The cache replay table for both presets (docs/replay.md): traces in /tmp/pacsgw-bench, reports in bench/results.
bench-replay: venv
	$(BIN)/python bench/replay.py

# Retrain the cache-heat LSTM from gen-trace output (models/README.md). TensorFlow lives in its own venv
# (.venv-train, ~1.6 GB) so the agent's venv keeps proving it runs without it. Writes models/hotness.*
TRAIN_VENV := .venv-train
TRAIN_DIR  := build/train
TRAIN_SETS := general:101:1.0:45 oncology:102:0.5:45 general:201:1.0:21 oncology:202:0.5:21
model: venv
	test -x $(TRAIN_VENV)/bin/python || { $(PYTHON) -m venv $(TRAIN_VENV) && $(TRAIN_VENV)/bin/pip install --quiet -e '.[train]'; }
	@mkdir -p $(TRAIN_DIR)
	for spec in $(TRAIN_SETS); do \
	  set -- $$(echo $$spec | tr : ' '); \
	  test -s $(TRAIN_DIR)/$$1-$$2.tsv || $(BIN)/pacsgw gen-trace $(TRAIN_DIR)/$$1-$$2.tsv \
	    --preset $$1 --seed $$2 --monthly-tb $$3 --days $$4 --no-progress || exit 1; \
	done
	$(TRAIN_VENV)/bin/python models/train.py --version 0.1.0 \
	  --trace $(TRAIN_DIR)/general-101.tsv --trace $(TRAIN_DIR)/oncology-102.tsv \
	  --val-trace $(TRAIN_DIR)/general-201.tsv --val-trace $(TRAIN_DIR)/oncology-202.tsv

clean:
	rm -rf $(RUNDIR) .pytest_cache
