"""The emulated Kubernetes cluster's PKI: one CA per run and the certificates and kubeconfigs
of its parts, made with the `cryptography` package (ECDSA P-256: a whole PKI in well under a
second, so nothing is cached between runs and no key outlives its run).

Division of labour: testbed.emulation.kubecontrol decides where the PKI lives (under the run's
directory, recorded before it is written, so teardown and `edgepipe cleanup` remove it) and
which addresses the API server has; this module only makes keys, certificates and
kubeconfig files from those.

What is issued:
  ca                       the cluster CA (signs everything below; the API server, the
                           controller-manager and every kubelet trust it)
  apiserver                serving: DNS kubernetes[.default[.svc[.cluster.local]]], the
                           Service IP of `kubernetes` and the dispatcher-side addresses
  apiserver-kubelet-client the API server towards kubelets (logs, exec, port-forward)
  admin                    O=system:masters: the driver and its tests
  controller-manager, scheduler   their system: users
  kubelet-<node>           client O=system:nodes CN=system:node:<node> (the Node authorizer)
                           and serving (the node's address), so the API server verifies the
                           kubelet it forwards a port-forward to
  sa.key / sa.pub          service-account token signing
etcd listens on the dispatcher's loopback only and is spoken to without TLS.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)      # a run lasts minutes; a stale PKI is useless
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(common: str, orgs: Sequence[str] = ()) -> x509.Name:
    return x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


class Pki:
    """A CA in `directory` and what it signs there (`issue`, `kubeconfig`)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(minutes=5)   # tolerate clock skew
        self._not_after = now + VALIDITY
        self._ca_key = _key()
        name = _name("edgepipe-kubernetes-ca")
        self._ca_name = name
        self._ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self._ca_key, hashes.SHA256()))
        self.ca = Issued(self.dir / "ca.crt", self.dir / "ca.key")
        self.ca.cert.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self._ca_key, self.ca.key)

    def issue(self, name: str, common: str, orgs: Sequence[str] = (), *,
              client: bool = True, server: bool = False, dns: Iterable[str] = (),
              ips: Iterable[str] = ()) -> Issued:
        key = _key()
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + \
                 ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (
            x509.CertificateBuilder().subject_name(_name(common, orgs))
            .issuer_name(self._ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        alt = [*(x509.DNSName(d) for d in dns),
               *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        issued = Issued(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued

    def service_account_keys(self) -> Issued:
        """sa.pub (verifies tokens: API server) and sa.key (signs them: API server and
        controller-manager)."""
        key = _key()
        pair = Issued(self.dir / "sa.pub", self.dir / "sa.key")
        pair.cert.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        _write_key(key, pair.key)
        return pair

    def kubeconfig(self, path: Path, server: str, user: str, issued: Issued) -> Path:
        """A kubeconfig with everything embedded (valid wherever the file is mounted)."""
        def b64(file: Path) -> str:
            return base64.b64encode(file.read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "edgepipe",
            "clusters": [{"name": "edgepipe", "cluster": {
                "server": server, "certificate-authority-data": b64(self.ca.cert)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(issued.cert),
                                              "client-key-data": b64(issued.key)}}],
            "contexts": [{"name": "edgepipe", "context": {"cluster": "edgepipe",
                                                          "user": user}}],
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path


def apiserver_names() -> list[str]:
    return ["kubernetes", "kubernetes.default", "kubernetes.default.svc",
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}", "localhost"]
