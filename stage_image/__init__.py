"""The stage image: everything that runs on an edge host.

Division of labour (Kubernetes-shaped, see docs/architecture.md):

- `stage_image.wire`: the only place that knows the bytes on the wire. Data frames
  (JSON header + raw tensor buffers, zero-copy) and control messages (JSON header + optional
  blob), encoded and strictly validated; nothing is ever pickled or evaluated.
- `stage_image.worker`: one pipeline stage, one process: onnxruntime with one thread between
  a ZeroMQ PULL (bound) and a PUSH (connected to the next stage or the sink). It knows nothing
  about the control plane except the JSON config file its agent wrote.
- `stage_image.agent`: one per host, the kubelet's role. Heartbeats to the controller,
  fetches and caches stage models (SHA-256 checked before every start), starts and stops
  workers and reports their state. It never decides *what* runs where; the controller does.

The controller, the dispatcher and the driver live in `testbed/`.
"""
