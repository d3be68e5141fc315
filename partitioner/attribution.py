"""Which ONNX node each onnxruntime kernel's time belongs to, from what onnxruntime reports
about the node, never from how it is named.

Division of labour: `partitioner.profile` runs the sessions and collects kernel times; this
module only maps them to the model's own nodes (plain functions on the graphs).

Two profiles are mapped:
- unoptimised (ORT_DISABLE_ALL): one kernel per ONNX node, and the profiler's `node_index` is
  the node's index in the file: each node's own cost, exactly;
- fully optimised (ORT_ENABLE_ALL, as the workers run), mapped through the optimised graph
  onnxruntime writes (`optimized_model_filepath`). A kernel there is tied to the ONNX nodes it
  stands for by the tensors it touches (its *anchors*):
  - an output tensor that exists in the original graph: that tensor's producer (a fused Gemm
    writes the Add's output; a SkipLayerNormalization writes the LayerNorm's);
  - a weight of the original graph that exactly one node reads: that node (a fused Gemm
    reads the MatMul's weight and the Add's bias; an NCHWc convolution its conv's bias).
  - otherwise, its position: a kernel computing op X fed by kernels standing for nodes S
    stands for the nearest unanchored X below S in the original graph (an NCHWc
    convolution with a padded bias touches only renamed tensors).
  An original node no kernel anchors was fused away without a trace (an activation folded
  into a convolution, a residual Add into SkipLayerNormalization, GELU's Div/Erf/Add into
  Gelu). It joins the kernel that reads its inputs and anchors one of the first anchored
  nodes downstream of it, or else the kernels of its producer.
  (The producer taken is its latest direct one: a kernel's or a node that joined one, so
  GELU's Erf and Add follow its Div into Gelu, a residual Add its block's last conv.)
  A kernel with no anchors at all (layout reorders, the reshapes around a fused Gemm)
  prepares the input of the next kernel: its time goes to the first anchored kernel
  downstream. Each kernel's time is then shared by its anchors and joined nodes in
  proportion to their unoptimised costs.

This replaces matching kernel names against node names with fusion suffixes stripped, which
charged `/m/encoder/layer.0/intermediate/dense/MatMul/MatMulAddFusion` to nothing (the
prefix before the first `/` is empty) and so its time to whatever kernel came next.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx


@dataclass(frozen=True)
class KernelTime:
    """One kernel's time in one run, as the onnxruntime profiler reports it."""

    name: str                 # the node's name in the session's (optimised) graph
    node_index: int
    op: str
    ms: float


@dataclass
class Attribution:
    node_ms: dict[str, float]                      # original node name -> ms
    unmatched_ms: float = 0.0                      # kernels tied to no original node
    kernels: dict[str, list[str]] = field(default_factory=dict)   # kernel -> nodes charged


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The name a node goes by in the analysis (unnamed nodes get a distinct stand-in)."""
    return node.name or f"<node {index}: {node.op_type}>"


def unoptimised_node_ms(model: onnx.ModelProto, kernels: dict[int, float]) -> dict[str, float]:
    """Per-node ms from an ORT_DISABLE_ALL profile: `kernels` maps node_index -> ms, and the
    index is the node's position in the file."""
    nodes = model.graph.node
    return {node_name(nodes[i], i): ms for i, ms in kernels.items() if 0 <= i < len(nodes)}


def attribute(original: onnx.ModelProto, optimised: onnx.ModelProto,
              kernel_ms: dict[str, float], base_ms: dict[str, float]) -> Attribution:
    """Charge each optimised kernel's ms (`kernel_ms`: optimised node name -> ms) to the
    original nodes it stands for; `base_ms` (unoptimised per-node ms) sets the shares."""
    nodes = list(original.graph.node)
    names = [node_name(n, i) for i, n in enumerate(nodes)]
    producer = {t: i for i, n in enumerate(nodes) for t in n.output if t}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    weights = {t.name for t in original.graph.initializer}

    opt_nodes = {n.name: n for n in optimised.graph.node}
    anchors: dict[str, set[int]] = {}
    for kname, node in opt_nodes.items():
        found = {producer[t] for t in node.output if t in producer}
        found.update(consumers[t][0] for t in node.input
                     if t in weights and len(consumers.get(t, [])) == 1)
        anchors[kname] = found

    _anchor_by_position(original, optimised, anchors, producer, consumers, weights)
    anchored_by: dict[int, list[str]] = {}
    for kname, found in anchors.items():
        for i in found:
            anchored_by.setdefault(i, []).append(kname)
    readers: dict[str, list[str]] = {}          # tensor -> optimised kernels reading it
    for kname, node in opt_nodes.items():
        for t in node.input:
            readers.setdefault(t, []).append(kname)

    # Nodes fused away without a trace join a kernel (see the module docstring).
    joined: dict[str, set[int]] = {k: set() for k in opt_nodes}
    orphan_hosts: dict[int, set[str]] = {}
    dynamic = _dynamic_nodes(original)
    for i in sorted(dynamic):
        if i in anchored_by:
            continue
        after = _anchored_descendants(i, nodes, consumers, anchored_by)
        hosts = {k for t in nodes[i].input if t for k in readers.get(t, [])
                 if anchors[k] & after}
        latest = max((producer[t] for t in nodes[i].input if t in producer
                      and (producer[t] in anchored_by or producer[t] in orphan_hosts)),
                     default=None)
        if not hosts and latest is not None:
            hosts = set(anchored_by.get(latest, orphan_hosts.get(latest, set())))
        if not hosts:
            hosts = set(anchored_by.get(_anchored_ancestor(i, nodes, producer, anchored_by),
                                        []))
        orphan_hosts[i] = hosts
        for k in hosts:
            joined[k].add(i)

    result = Attribution({})
    for kname, ms in kernel_ms.items():
        target = kname if anchors.get(kname) else _downstream_anchored(
            kname, opt_nodes, readers, anchors)
        if target is None:
            result.unmatched_ms += ms
            continue
        members = sorted(anchors[target] | joined[target])
        weight = sum(base_ms.get(names[i], 0.0) for i in members)
        for i in members:
            share = base_ms.get(names[i], 0.0) / weight if weight > 0 else 1 / len(members)
            result.node_ms[names[i]] = result.node_ms.get(names[i], 0.0) + ms * share
        result.kernels[kname] = [names[i] for i in members]
    return result


def _op(node: onnx.NodeProto) -> str:
    """The operation a kernel computes, whatever fusion it carries (FusedConv is a Conv)."""
    return node.op_type.removeprefix("Fused")


def _anchor_by_position(original: onnx.ModelProto, optimised: onnx.ModelProto,
                        anchors: dict[str, set[int]], producer: dict[str, int],
                        consumers: dict[str, list[int]], weights: set[str]) -> None:
    """Anchor, in place, kernels that touch no original tensor by where they sit: a kernel
    computing op X whose data comes from kernels standing for nodes S stands for the first
    unanchored X found walking down the original graph from S. (An NCHWc convolution whose
    output channels are not a multiple of the block size reads a padded, renamed bias and
    writes a renamed tensor: MobileNetV2's 24-channel projections; without this its time went
    to the next block's expansion.)"""
    opt_node = {n.name: n for n in optimised.graph.node}
    opt_producer = {t: n.name for n in optimised.graph.node for t in n.output if t}
    opt_weights = {t.name for t in optimised.graph.initializer} | weights
    nodes = list(original.graph.node)
    taken = set().union(*anchors.values()) if anchors else set()

    def sources(tensor: str, seen: set[str]) -> set[int] | None:
        """Original nodes whose output `tensor` carries (None: a graph input)."""
        kernel = opt_producer.get(tensor)
        if kernel is None:
            return None if tensor in consumers else set()
        if anchors.get(kernel):
            return set(anchors[kernel])
        if kernel in seen:
            return set()
        seen.add(kernel)
        found: set[int] = set()
        for t in opt_node[kernel].input:
            if t and t not in opt_weights:
                up = sources(t, seen)
                found |= up if up is not None else set(consumers.get(t, []))
        return found

    for node in optimised.graph.node:
        if anchors.get(node.name):
            continue
        starts: list[int] = []
        for t in node.input:
            if not t or t in opt_weights:
                continue
            up = sources(t, set())
            if up is None:                            # reads a graph input directly
                starts.extend(c for c in consumers.get(t, []) if c not in taken)
            else:
                starts.extend(c for s in up for o in nodes[s].output if o
                              for c in consumers.get(o, []))
        match = _first_unanchored(starts, _op(node), nodes, consumers, taken)
        if match is not None:
            anchors[node.name] = {match}
            taken.add(match)


def _first_unanchored(starts: list[int], op: str, nodes: list[onnx.NodeProto],
                      consumers: dict[str, list[int]], taken: set[int]) -> int | None:
    """The one unanchored node computing `op` nearest below `starts` (walking through other
    unanchored nodes), or None when there is none or more than one at that distance."""
    frontier, seen = sorted(set(starts)), set(starts)
    while frontier:
        hits = [i for i in frontier if i not in taken and nodes[i].op_type == op]
        if hits:
            return hits[0] if len(hits) == 1 else None
        following = []
        for i in frontier:
            if i in taken:
                continue
            for t in nodes[i].output:
                for c in consumers.get(t, []) if t else []:
                    if c not in seen:
                        seen.add(c)
                        following.append(c)
        frontier = sorted(following)
    return None


def _dynamic_nodes(model: onnx.ModelProto) -> set[int]:
    """Indices of nodes that depend on a graph input (the rest are constant computations,
    folded away by any optimiser)."""
    static = {t.name for t in model.graph.initializer}
    dynamic = set()
    for i, node in enumerate(model.graph.node):
        if all(t in static for t in node.input if t):
            static.update(node.output)
        else:
            dynamic.add(i)
    return dynamic


def _anchored_descendants(i: int, nodes: list[onnx.NodeProto], consumers: dict[str, list[int]],
                          anchored_by: dict[int, list[str]]) -> set[int]:
    """The first anchored nodes found walking down from node i (through nodes that are
    themselves fused away: GELU's Div -> Erf -> Add -> Mul all become one Gelu kernel)."""
    found, queue, seen = set(), deque([i]), {i}
    while queue:
        j = queue.popleft()
        for t in nodes[j].output:
            for c in consumers.get(t, []) if t else []:
                if c in seen:
                    continue
                seen.add(c)
                if c in anchored_by:
                    found.add(c)
                else:
                    queue.append(c)
    return found


def _anchored_ancestor(i: int, nodes: list[onnx.NodeProto], producer: dict[str, int],
                       anchored_by: dict[int, list[str]]) -> int:
    """The latest (in file order) anchored node found walking up from node i."""
    best, queue, seen = -1, deque([i]), {i}
    while queue:
        j = queue.popleft()
        for t in nodes[j].input:
            p = producer.get(t)
            if p is None or p in seen:
                continue
            seen.add(p)
            if p in anchored_by:
                best = max(best, p)
            else:
                queue.append(p)
    return best


def _downstream_anchored(kname: str, opt_nodes: dict[str, onnx.NodeProto],
                         readers: dict[str, list[str]],
                         anchors: dict[str, set[int]]) -> str | None:
    """The first anchored kernel fed (directly or through unanchored ones) by `kname`."""
    queue, seen = deque([kname]), {kname}
    while queue:
        k = queue.popleft()
        for t in opt_nodes[k].output if k in opt_nodes else []:
            for c in readers.get(t, []):
                if c in seen:
                    continue
                if anchors.get(c):
                    return c
                seen.add(c)
                queue.append(c)
    return None
