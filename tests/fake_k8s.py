"""A small fake Kubernetes API server on loopback, for the k3s backend's tests (no cluster can
run on the project's machines): lists, reads, watches (Nodes, Pods), server-side apply,
strategic-merge patches of Nodes, deletes, `/version`, and pod port-forward over a real
WebSocket (the `v4.channel.k8s.io` protocol the official client speaks), relayed to a TCP
address the test names. The official client talks to it unchanged; every request is
recorded for the tests to assert on."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client

from testbed.k8s import manifests as k8s

_PATH = re.compile(r"^/(?:api/v1|apis/[a-z0-9.]+/v1)/(?:namespaces/([^/]+)/)?([a-z]+)"
                   r"(?:/([^/?]+))?(?:/(portforward))?(?:\?(.*))?$")
_KINDS = {"nodes": ("v1", "Node"), "pods": ("v1", "Pod"), "services": ("v1", "Service"),
          "configmaps": ("v1", "ConfigMap"), "secrets": ("v1", "Secret"),
          "deployments": ("apps/v1", "Deployment"), "namespaces": ("v1", "Namespace"),
          "serviceaccounts": ("v1", "ServiceAccount"),
          "roles": ("rbac.authorization.k8s.io/v1", "Role"),
          "rolebindings": ("rbac.authorization.k8s.io/v1", "RoleBinding"),
          "clusterroles": ("rbac.authorization.k8s.io/v1", "ClusterRole"),
          "clusterrolebindings": ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
          "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy")}
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def node(name: str, ready: str = "True", unschedulable: bool = False) -> client.V1Node:
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name}),
        spec=client.V1NodeSpec(unschedulable=unschedulable),
        status=client.V1NodeStatus(conditions=[
            client.V1NodeCondition(type="Ready", status=ready)]))


class FakeCluster:
    """What the loop and the driver see of a cluster. A Deployment applied gets a Ready pod
    on its nodeSelector's node at once; the pods it replaces go away, except on nodes that
    are `down`, where they stay Terminating until force-deleted (their kubelet cannot
    confirm it). `forward(pod, port)` says where a port-forward to a pod really goes."""

    def __init__(self, nodes: list[str]) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in _KINDS}
        self.pending: dict[str, list[dict[str, Any]]] = {"nodes": [], "pods": []}
        self.requests: list[tuple[str, str, str, Any]] = []    # method, kind, name, body
        self.down: set[str] = set()
        self.version = 100
        self.forward: Callable[[str, int], tuple[str, int]] | None = None
        for name in nodes:
            self.objects["nodes"][name] = client.ApiClient().sanitize_for_serialization(
                node(name))

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        return obj

    def _event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        if kind in self.pending:
            self.pending[kind].append({"type": type_, "object": json.loads(json.dumps(obj))})

    def apply(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append(("PATCH", kind, name, body))
            if kind == "nodes":
                # a strategic merge of spec fields (taints: the list is replaced)
                current = self.objects["nodes"][name]
                current.setdefault("spec", {}).update(body.get("spec", {}))
                self._event("nodes", "MODIFIED", self._stamp(current))
                return current
            self.objects[kind][name] = self._stamp(body)
            if kind == "deployments":
                self._roll(body)
            return body

    def _roll(self, deployment: dict[str, Any]) -> None:
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        host = template["spec"]["nodeSelector"]["kubernetes.io/hostname"]
        slot = (labels.get(k8s.LABEL_COMPONENT), labels.get(k8s.LABEL_STAGE))
        for name, old in list(self.objects["pods"].items()):
            old_labels = old["metadata"]["labels"]
            if (old_labels.get(k8s.LABEL_COMPONENT), old_labels.get(k8s.LABEL_STAGE)) != slot:
                continue
            if old["spec"]["nodeName"] in self.down:
                old["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                self._event("pods", "MODIFIED", self._stamp(old))
            else:
                del self.objects["pods"][name]
                self._event("pods", "DELETED", old)
        name = f"{deployment['metadata']['name']}-e{labels.get(k8s.LABEL_EPOCH, '0')}"
        new = self._stamp({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "edgepipe", "labels": dict(labels)},
            "spec": {"nodeName": host, "containers": [{"name": "worker"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}})
        self.objects["pods"][name] = new
        self._event("pods", "ADDED", new)

    def delete(self, kind: str, name: str, query: str) -> dict[str, Any] | None:
        with self.lock:
            self.requests.append(("DELETE", kind, name, query))
            obj = self.objects[kind].pop(name, None)
            if obj is not None:
                self._event(kind, "DELETED", obj)
            return obj

    def list(self, kind: str) -> dict[str, Any]:
        api, name = _KINDS[kind]
        with self.lock:
            return {"apiVersion": api, "kind": f"{name}List",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": [json.loads(json.dumps(o)) for o in self.objects[kind].values()]}

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects[kind].get(name)
            return json.loads(json.dumps(obj)) if obj is not None else None

    def watch(self, kind: str) -> list[dict[str, Any]]:
        """The events since the last watch request; waits a little for some (a real server
        holds the request open)."""
        deadline = time.monotonic() + 0.3
        while True:
            with self.lock:
                events, self.pending[kind] = self.pending[kind], []
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(0.02)

    def applied(self, kind: str) -> list[dict[str, Any]]:
        return [body for method, k, _, body in self.requests if method == "PATCH" and k == kind]

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        cluster = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _route(self) -> tuple[str, str | None, str | None, str]:
                match = _PATH.match(self.path)
                assert match, self.path
                return match.group(2), match.group(3), match.group(4), match.group(5) or ""

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.rstrip("/").split("?")[0] in ("/version", "/version/"):
                    self._send(200, json.dumps({
                        "major": "1", "minor": "30", "gitVersion": "v1.30.0-fake",
                        "gitCommit": "0" * 40, "gitTreeState": "clean",
                        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22",
                        "compiler": "gc", "platform": "linux/amd64"}).encode())
                    return
                kind, name, sub, query = self._route()
                if sub == "portforward":
                    port = int(re.search(r"ports=(\d+)", query).group(1))
                    _port_forward(self, cluster, name or "", port)
                elif "watch=true" in query:
                    lines = "".join(json.dumps(e) + "\n" for e in cluster.watch(kind))
                    self._send(200, lines.encode())
                elif name is None:
                    self._send(200, json.dumps(cluster.list(kind)).encode())
                else:
                    obj = cluster.get(kind, name)
                    if obj is None:
                        self._send(404, b'{"kind":"Status","code":404,"reason":"NotFound"}')
                    else:
                        self._send(200, json.dumps(obj).encode())

            def do_PATCH(self) -> None:  # noqa: N802
                kind, name, _, _ = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert name is not None
                if kind == "nodes" and name not in cluster.objects["nodes"]:
                    self._send(404, b'{"kind":"Status","code":404}')
                    return
                self._send(200, json.dumps(cluster.apply(kind, name, body)).encode())

            def do_DELETE(self) -> None:  # noqa: N802
                kind, name, _, query = self._route()
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                assert name is not None
                found = cluster.delete(kind, name, query)
                status = {"kind": "Status", "apiVersion": "v1", "code": 200 if found else 404,
                          "status": "Success" if found else "Failure"}
                # like the API server: Pods and Services answer with the deleted object
                body = found if found is not None and kind in ("pods", "services") else status
                self._send(200 if found else 404, json.dumps(body).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


# -- pod port-forward: a minimal WebSocket server (RFC 6455) with the k8s channel protocol ----

def _ws_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x82, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x82, 126, size)
    else:
        header = struct.pack("!BBQ", 0x82, 127, size)
    return header + payload


def _ws_read(stream: Any) -> tuple[int, bytes] | None:
    head = stream.read(2)
    if len(head) < 2:
        return None
    opcode, size = head[0] & 0x0F, head[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", stream.read(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", stream.read(8))[0]
    mask = stream.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = bytearray(stream.read(size))
    for i in range(len(data)):
        data[i] ^= mask[i % 4]
    return opcode, bytes(data)


def _port_forward(handler: http.server.BaseHTTPRequestHandler, cluster: FakeCluster,
                  pod: str, port: int) -> None:
    with cluster.lock:
        cluster.requests.append(("PORTFORWARD", "pods", pod, port))
    assert cluster.forward is not None, "the test did not say where port-forwards go"
    target = socket.create_connection(cluster.forward(pod, port), timeout=10)
    target.settimeout(None)
    key = handler.headers["Sec-WebSocket-Key"]
    accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
    handler.send_response(101)
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    out = handler.connection
    send_lock = threading.Lock()
    port_bytes = struct.pack("<H", port)
    with send_lock:             # each channel's first frame names its port
        out.sendall(_ws_frame(b"\x00" + port_bytes) + _ws_frame(b"\x01" + port_bytes))

    def pod_to_client() -> None:
        try:
            while data := target.recv(1 << 16):
                with send_lock:
                    out.sendall(_ws_frame(b"\x00" + data))
        except OSError:
            pass
        try:
            with send_lock:
                out.sendall(struct.pack("!BB", 0x88, 0))       # close
        except OSError:
            pass

    back = threading.Thread(target=pod_to_client, daemon=True)
    back.start()
    try:
        while (frame := _ws_read(handler.rfile)) is not None:
            opcode, data = frame
            if opcode == 0x8:
                break
            if opcode == 0x2 and data[:1] == b"\x00" and len(data) > 1:
                target.sendall(data[1:])
    except OSError:
        pass
    finally:
        target.close()
        back.join(5)


@contextlib.contextmanager
def serve_fake_cluster(port: int = 0) -> Iterator[tuple[FakeCluster, client.ApiClient]]:
    """A fake cluster of edge1-3 and the dispatcher on 127.0.0.61 (these tests use
    127.0.0.61-69), with a previous controller's epoch 6 still there: a loop numbers its
    epochs from 7 and prunes it."""
    cluster = FakeCluster(["edge1", "edge2", "edge3", "dispatcher"])
    cluster.objects["configmaps"]["edgepipe-e6-stages"] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "edgepipe-e6-stages", "namespace": "edgepipe",
                     "labels": {k8s.LABEL_NAME: "edgepipe", k8s.LABEL_EPOCH: "6"}}}
    server = http.server.ThreadingHTTPServer(("127.0.0.61", port), cluster.handler())
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.61:{server.server_port}"
    api = client.ApiClient(client.Configuration(host=url))
    try:
        yield cluster, api
    finally:
        api.close()
        server.shutdown()
        server.server_close()
