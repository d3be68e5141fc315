#!/usr/bin/env bash
# Provision the lab VM (run by the Vagrantfile as root; safe to run again).
#
# Installs Docker (Ubuntu's docker.io, running under systemd), the project via the same
# `make setup` as CI, Containernet from source into the project's venv, the k3s image, and
# builds the stage and controller images. Environment: PROJECT_DIR, K3S_IMAGE,
# CONTAINERNET_REF.
set -euo pipefail

PROJECT_DIR=${PROJECT_DIR:-/vagrant}
K3S_IMAGE=${K3S_IMAGE:-rancher/k3s:v1.31.4-k3s1}
CONTAINERNET_REF=${CONTAINERNET_REF:-master}
export DEBIAN_FRONTEND=noninteractive

echo "== apt: Docker, build tools, Open vSwitch, the kernel's extra modules (netem)"
apt-get update -q
apt-get install -y -q docker.io debootstrap git make python3-venv python3-dev \
    build-essential openvswitch-switch "linux-modules-extra-$(uname -r)" || \
  apt-get install -y -q docker.io debootstrap git make python3-venv python3-dev \
    build-essential openvswitch-switch
systemctl enable --now docker
# netem and the OVS datapath are modules on Ubuntu; load them now and at boot.
for module in sch_netem openvswitch br_netfilter; do
  modprobe "$module" || echo "warning: cannot load $module"
  echo "$module" > "/etc/modules-load.d/edgepipe-$module.conf"
done
usermod -aG docker vagrant || true

echo "== the project: make setup (apt packages + .venv, exactly as CI)"
cd "$PROJECT_DIR"
make setup

echo "== Containernet ($CONTAINERNET_REF) into the project's venv"
# Containernet is a Mininet fork (Python package 'mininet'): installed in the venv it takes
# precedence over Debian's mininet for the project only; mnexec still comes from apt.
# Its setup.py imports the package, which imports the docker SDK: install that first and
# build without isolation. docker<=6.0.1 (Containernet's cap) needs requests<2.32.
src=/opt/containernet
if [ ! -d "$src/.git" ]; then
  git clone https://github.com/containernet/containernet.git "$src"
fi
git -C "$src" fetch -q origin && git -C "$src" checkout -q "$CONTAINERNET_REF"
.venv/bin/pip install -q "docker==6.0.1" "requests<2.32" python-iptables
.venv/bin/pip install -q --no-build-isolation --no-deps "$src"
.venv/bin/python -c "from mininet.node import Docker; print('containernet ok')"

echo "== k3s image ($K3S_IMAGE)"
docker pull "$K3S_IMAGE"

echo "== the stage and controller images, built against the system dockerd"
# The VM's dockerd runs under systemd with iptables on: build there (no private daemon),
# from Docker Hub's debian image, which is reachable here.
EDGEPIPE_DOCKER_HOST=unix:///var/run/docker.sock BASE=debian:bookworm-slim \
  .venv/bin/python -m testbed.emulation.images --quiet --target controller

echo "== done: vagrant ssh, then: cd $PROJECT_DIR && sudo make lab-test"
