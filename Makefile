# pve-gpu-hook — developer entry points. `make test` needs only python3 (with venv) and network
# access to the package registries; it creates .venv itself.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEV_PACKAGES := pytest hypothesis PyYAML rich argcomplete ruff prometheus_client

.PHONY: all test lint demo bench clean venv deb package-test

all: test

# the stamp lists what was installed: a package added to DEV_PACKAGES reaches an existing venv
DEV_STAMP := $(VENV)/dev-packages.txt

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

$(DEV_STAMP): $(VPY) Makefile
	$(VPY) -m pip install --quiet $(DEV_PACKAGES)
	echo "$(DEV_PACKAGES)" > $@

venv: $(DEV_STAMP)

test: $(DEV_STAMP) lint
	$(VPY) -m pytest -q tests

lint: $(DEV_STAMP)
	$(VPY) -m ruff check pvegpuhook tests tools
	$(VPY) -m ruff format --check pvegpuhook tests tools

# demo, bench and soak live in tools/: they drive the product over the test simulator (tests/sim)
demo:
	$(PYTHON) -m tools.demo

bench:
	$(PYTHON) -m tools.bench

# what each restart: policy costs the holders over the soak's random nights (BENCHMARKS.md)
.PHONY: bench-policies
bench-policies: $(DEV_STAMP)
	$(VPY) -m tools.policies

# the soak (tools/soak.py): >= 2,000 random jobs through the simulator, invariants after each;
# bounded by --max-seconds (default 1500); prints the seed to replay a counterexample
.PHONY: soak
soak: $(DEV_STAMP)
	$(VPY) -m tools.soak --jobs 2000

clean:
	rm -rf $(VENV) build dist .pytest_cache *.egg-info

# ---- committed generated files: tests/unit/test_manpage.py and tests/unit/test_completion.py
# fail when they are stale. Written through a temporary file, so a failing generator leaves the
# old one.
.PHONY: man completion

# by tools/manpage.py: pve-gpu-hook(8) from the argparse parser; the KEYS section of
# pve-gpu-hook.yaml(5) and the template etc/config.yaml from the settings schema
man:
	$(PYTHON) -m tools.manpage page8 > man/pve-gpu-hook.8.tmp
	mv man/pve-gpu-hook.8.tmp man/pve-gpu-hook.8
	$(PYTHON) -m tools.manpage yaml5 > man/pve-gpu-hook.yaml.5.tmp
	mv man/pve-gpu-hook.yaml.5.tmp man/pve-gpu-hook.yaml.5
	$(PYTHON) -m tools.manpage config > etc/config.yaml.tmp
	mv etc/config.yaml.tmp etc/config.yaml

# the bash completion script, by the venv's argcomplete (the one the tests compare with)
completion: $(DEV_STAMP)
	mkdir -p completion
	$(VENV)/bin/register-python-argcomplete pve-gpu-hook > completion/pve-gpu-hook.tmp
	mv completion/pve-gpu-hook.tmp completion/pve-gpu-hook

# ---- Debian package (debian/, tests/packaging/) ------------------------------------------------
# `make deb` installs nothing: it needs the Debian packages listed in
# tests/packaging/apt-packages.txt. stdeb's sdist_dsc lays out the source tree and the orig tarball
# (made from the git work tree by tests/packaging/orig_tarball.py, since setuptools' sdist would
# leave out bin/, etc/, man/ and completion/); the hand-written debian/ then replaces the one stdeb
# generated, and dpkg-buildpackage builds the source package (.dsc, orig tarball) and the .deb
# into $(DEB_BUILD)/.
DEB_BUILD := deb-build
DEB_SOURCE := pve-gpu-hook
# Debian's python3, which has stdeb: the venv's has not
DEB_PYTHON := /usr/bin/python3
DEB_VERSION = $(shell dpkg-parsechangelog -l debian/changelog -S Version)
DEB_UPSTREAM = $(shell dpkg-parsechangelog -l debian/changelog -S Version | sed 's/-[^-]*$$//')
DEB_TIMESTAMP = $(shell dpkg-parsechangelog -l debian/changelog -S Timestamp)
DEB_TREE = $(DEB_BUILD)/$(DEB_SOURCE)-$(DEB_UPSTREAM)

deb:
	@code=$$($(DEB_PYTHON) setup.py --version) && [ "$$code" = "$(DEB_UPSTREAM)" ] || { \
	  echo "make deb: debian/changelog is at $(DEB_VERSION) but pvegpuhook.__version__ is" \
	    "'$$code': add a debian/changelog entry for $$code-1" >&2; exit 1; }
	rm -rf $(DEB_BUILD)
	mkdir -p $(DEB_BUILD)
	$(DEB_PYTHON) tests/packaging/orig_tarball.py $(DEB_SOURCE)-$(DEB_UPSTREAM) \
	  $(DEB_BUILD)/$(DEB_SOURCE)-$(DEB_UPSTREAM).tar.gz $(DEB_TIMESTAMP)
	$(DEB_PYTHON) setup.py --quiet --command-packages=stdeb.command sdist_dsc \
	  --dist-dir $(DEB_BUILD) --use-premade-distfile $(DEB_BUILD)/$(DEB_SOURCE)-$(DEB_UPSTREAM).tar.gz
	rm -rf $(DEB_TREE)/debian $(DEB_BUILD)/*.dsc $(DEB_BUILD)/*.debian.tar.* \
	  $(DEB_BUILD)/$(DEB_SOURCE)-$(DEB_UPSTREAM).tar.gz
	cp -a debian $(DEB_TREE)/debian
	cd $(DEB_TREE) && dpkg-buildpackage -us -uc
	@ls -1 $(DEB_BUILD)/*.dsc $(DEB_BUILD)/*.orig.tar.* $(DEB_BUILD)/*.deb

# the packaging tests alone (they run `make deb` themselves; clean Debian roots need root)
package-test: $(DEV_STAMP)
	$(VPY) -m pytest -q tests/packaging
