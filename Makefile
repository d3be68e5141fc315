# One verb per job. `make demo` and `make test` are the README's two commands.
PY := .venv/bin/python
APT_PACKAGES := mininet bridge-utils iputils-ping ethtool iperf3 iptables cgroup-tools \
	iproute2 procps python3-venv python3-dev libnetfilter-queue-dev gcc libc6-dev docker.io debootstrap
OUT ?= results/baseline

.PHONY: setup demo test lint image kube-bin kube-image lab-test

setup: .venv/.installed

.venv/.installed: requirements.txt
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

demo: setup
	$(PY) run_scenario.py scenarios/baseline.yaml --out $(OUT)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15

lint: setup
	$(PY) -m ruff check .

# Both images: the stage image, and FROM it the k3s controller's (each rebuilt only if stale).
image: setup
	$(PY) -m testbed.emulation.images --target controller

# The emulated Kubernetes cluster's binaries (kube-apiserver, controller-manager, scheduler,
# kubelet, etcd, pause; CoreDNS) from the Go module proxy, cached per machine by version in
# /var/cache/edgepipe/kubernetes: a second call returns at once.
kube-bin:
	cluster/build-kubernetes.sh
	cluster/build-coredns.sh

# The node image (FROM the stage image: containerd, runc, CNI plugins, the kubelet) and the
# image tarballs each node imports into its containerd (stage, controller, pause).
kube-image: setup kube-bin
	$(PY) -m testbed.emulation.images --target node

# Only inside the lab VM (Vagrantfile): k3s in Docker hosts over shaped links.
lab-test: setup
	lab/lab-test.sh $(SCENARIO)
