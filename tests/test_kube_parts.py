"""The emulated cluster's parts that need no root: the PKI (chains, names, usages), the
kubelet's, containerd's and the CNI's configuration, the driver's link addresses, the node
topology, the scenario's `control:` reaching the controller pod and the command line's
checks of `--cluster`. The cluster itself: tests/test_kube_cluster.py (root)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from formats.topology import load_topology
from testbed.emulation.kubecontrol import driver_link
from testbed.emulation.kubenodes import (
    NodeTuning,
    cni_conflist,
    containerd_toml,
    kubelet_yaml,
    pod_cidr,
)
from testbed.emulation.kubepki import Pki, apiserver_names

ROOT = Path(__file__).resolve().parent.parent


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_chain_names_and_usages(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.issue("apiserver", "kube-apiserver", client=False, server=True,
                       dns=apiserver_names(), ips=["10.96.0.1", "10.0.0.1"])
    kubelet = pki.issue("kubelet-edge1", "system:node:edge1", ["system:nodes"])
    for issued in (server, kubelet):
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca.cert),
                                 str(issued.cert)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
        assert (issued.key.stat().st_mode & 0o777) == 0o600
    sans = _cert(server.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc.cluster.local" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.96.0.1") in sans.get_values_for_type(x509.IPAddress)
    usage = _cert(server.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    subject = _cert(kubelet.cert).subject
    # what the Node authorizer matches: CN system:node:<name>, O system:nodes
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:edge1"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"


def test_kubeconfig_embeds_everything(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    path = pki.kubeconfig(tmp_path / "admin.conf", "https://10.0.0.1:22443", "admin",
                          pki.issue("admin", "kubernetes-admin", ["system:masters"]))
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://10.0.0.1:22443"
    assert "certificate-authority-data" in config["clusters"][0]["cluster"]
    assert {"client-certificate-data", "client-key-data"} <= set(config["users"][0]["user"])


def test_node_configuration() -> None:
    kubelet = json.loads(kubelet_yaml("/etc/edgepipe/node", "10.0.0.1", NodeTuning.tuned()))
    assert kubelet["cgroupDriver"] == "cgroupfs" and kubelet["failSwapOn"] is False
    assert kubelet["clusterDNS"] == ["10.0.0.1"] and kubelet["nodeLeaseDurationSeconds"] == 8
    assert kubelet["imageGCHighThresholdPercent"] == 100    # imported images stay
    cni = json.loads(cni_conflist(pod_cidr(2)))
    assert cni["plugins"][0]["type"] == "ptp"
    assert cni["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24"}]]
    toml = containerd_toml()
    assert 'sandbox_image = "docker.io/library/edgepipe-pause:v1.34.4"' in toml
    assert "SystemdCgroup = false" in toml


def test_driver_link_is_a_link_local_pair_per_run() -> None:
    a, b = driver_link("kbx1")
    assert ipaddress.ip_network(f"{a}/30", strict=False) == \
        ipaddress.ip_network(f"{b}/30", strict=False)
    assert ipaddress.ip_address(a) in ipaddress.ip_network("169.254.0.0/16")
    assert driver_link("kbx1") == (a, b) and driver_link("kbx2") != (a, b)


def test_every_host_is_a_node_container() -> None:
    from testbed.experiment.k8s_cluster import NodeNetwork, node_topology

    topology = node_topology(load_topology(ROOT / "topologies" / "kube-3.yaml"))
    assert {spec.kind for spec in topology.hosts.values()} == {"docker"}
    assert {spec.image for spec in topology.hosts.values()} == {"edgepipe-node:latest"}
    assert NodeNetwork.docker_dispatcher


def test_the_controller_service_needs_no_kube_proxy() -> None:
    from testbed.k8s import manifests as k8s

    settings = k8s.settings_for_topology(load_topology(ROOT / "topologies" / "kube-3.yaml"))
    service = next(m for m in k8s.controller_manifests(settings) if m["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"        # headless: CoreDNS answers with the pod


@pytest.mark.parametrize("extra", [["--kubeconfig", "x"], ["--dry-run"], []])
def test_cluster_flag_checks(extra: list[str], tmp_path: Path) -> None:
    backend = [] if not extra else ["--backend", "k3s"]
    proc = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"),
                           str(ROOT / "scenarios" / "kube_node_failure.yaml"), "--cluster",
                           "emulated", *backend, *extra, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--cluster emulated goes with --backend k3s" in proc.stderr + proc.stdout
