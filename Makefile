# Everything a fresh clone needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; installing it first keeps
# pip from resolving the pyproject range to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install browser sshd clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The demo trains the small GPT (9 minutes) with the levers of issue 34 (Muon at lr 0.05, distillation from a
# 3-gram), then counts a 5-gram on the same data (seconds), mixes the two and prints one table: unigram
# entropy, 5-gram, GPT and mixture on the val split, and on 2,000 distinct chn-reviews texts (off-domain).
DEMO_LEVERS := --set train.optimizer=muon --set train.muon_lr=0.05 --set train.distill_weight=0.5
demo: install
	$(BIN)/hanlm train $(DEMO_LEVERS)
	$(BIN)/hanlm mix runs/default --order 5 --out runs/default/mix

# The playground test drives Debian's Chromium through selenium; install it when it is missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The remote-storage tests (tests/test_remote.py) start their own OpenSSH sshd on a loopback port;
# install Debian's openssh-server (sshd and sftp-server) when it is missing.
sshd:
	@test -x /usr/sbin/sshd && test -x /usr/lib/openssh/sftp-server || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server; }

# lint-imports: the layer contracts of pyproject.toml (an import that climbs a layer or closes a loop fails here,
# named; tests/test_layers.py proves that it would). HANLM_REQUIRE_SERVERS=1: a test whose server (sshd, moto's S3)
# is missing fails instead of skipping. --durations: the slowest tests in every log, to keep the suite in budget.
test: install browser sshd
	$(BIN)/lint-imports --no-cache
	HANLM_REQUIRE_SERVERS=1 $(BIN)/python -m pytest -q --durations=20

clean:
	rm -rf $(VENV) build *.egg-info
