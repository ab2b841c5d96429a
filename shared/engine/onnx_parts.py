"""An ONNX graph cut at layer boundaries into parts, each a graph of its own, so that ONNX Runtime can
build (and repack the weights of) one part as soon as that part's bytes of ``weights.bin`` arrived.

Why: repacking the weights for ONNX Runtime's kernels makes bert-large fp32 about 7% faster, but
the session that repacks holds its own copy of every weight beside the download until it is
built (twice the weights: 2,742 MiB at the load's peak). Built part by part while ``weights.bin``
streams in, the download's pages of a part are handed back as soon as its session owns them, so
the load holds the repacked parts so far plus one part twice, not the whole model twice.

The cut is made on the protobuf bytes (the ``onnx`` package is a build-time dependency): each part
is the original nodes of a run of layers, verbatim, with the initializers they read, the values
they take from earlier parts as graph inputs and those later parts need as graph outputs (their
types from the graph's ``value_info``). A cut goes right after a ``LayerNormalization`` node (a
layer's end in every encoder exported here), where only the hidden state and a few shape and mask
values cross; ONNX Runtime then fuses within each part what it fused in the whole graph, so each
part computes what the same nodes computed in one session. A graph with control flow, sparse
initializers, a large weight read by two parts, or a ``weights.bin`` not laid out in the order the
nodes first read it (artifacts built before this layout) is not cut (:func:`split_graph` returns
``None``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .onnx_graph import ExternalTensor, _fields, _tensor
from .onnx_graph import _varint as _read_varint

_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_SHARED_LIMIT = 1 << 20  # a weight read by two parts is copied by both: only small ones may be
_CUT_AFTER = "LayerNormalization"


@dataclass(frozen=True)
class GraphPart:
    """One part: its ``ModelProto`` bytes, the values it takes and gives, the external weights it
    reads, and how many bytes of ``weights.bin`` must have arrived before it can be built."""

    graph: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: tuple[ExternalTensor, ...]
    ready_at: int


@dataclass
class _Node:
    raw: bytes
    op_type: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def split_graph(model: bytes, *, part_bytes: int) -> list[GraphPart] | None:
    """Cut ``model`` into parts of about ``part_bytes`` of external weights each (see the module).

    Returns:
        The parts in order (the last one gives the graph's outputs), or ``None`` when the graph
        cannot be cut as described, or would be one part.
    """
    try:
        return _split(memoryview(model).cast("B"), part_bytes)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _split(data: memoryview, part_bytes: int) -> list[GraphPart] | None:
    model_fields: list[bytes] = []
    graph: memoryview | None = None
    for number, value, raw in _raw_fields(data):
        if number == 7 and isinstance(value, memoryview):
            graph = value
        else:
            model_fields.append(raw)
    if graph is None:
        return None
    nodes: list[_Node] = []
    initializers: dict[str, tuple[bytes, ExternalTensor | None]] = {}
    inputs: dict[str, bytes] = {}
    outputs: dict[str, bytes] = {}
    value_info: dict[str, bytes] = {}
    graph_rest: list[bytes] = []
    for number, value, raw in _raw_fields(graph):
        if number == 1 and isinstance(value, memoryview):
            nodes.append(_node(value, raw))
        elif number == 5 and isinstance(value, memoryview):
            initializers[_name(value, 8)] = (raw, _tensor(value))
        elif number in (11, 12, 13) and isinstance(value, memoryview):
            {11: inputs, 12: outputs, 13: value_info}[number][_name(value, 1)] = raw
        elif number == 15:
            return None  # sparse initializers
        elif number == 2:
            graph_rest.append(raw)
        # doc strings, quantization annotations, metadata: not needed by a part
    if any(node.op_type in _CONTROL_FLOW for node in nodes):
        return None
    typed = {**value_info, **outputs, **inputs}
    producer = {out: index for index, node in enumerate(nodes) for out in node.outputs if out}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                last_use[name] = index
    for name in outputs:
        last_use[name] = len(nodes)
    cuts = _choose_cuts(nodes, initializers, producer, last_use, typed, part_bytes)
    if not cuts:
        return None
    bounds = [0, *cuts, len(nodes)]
    parts = []
    for first, end in itertools.pairwise(bounds):
        part = _part(model_fields, graph_rest, nodes[first:end], first, end, initializers, producer, last_use, typed, outputs)
        if part is None:
            return None
        parts.append(part)
    if not _laid_out_in_order(parts):
        return None
    return parts


def _choose_cuts(
    nodes: list[_Node],
    initializers: dict[str, tuple[bytes, ExternalTensor | None]],
    producer: dict[str, int],
    last_use: dict[str, int],
    typed: dict[str, bytes],
    part_bytes: int,
) -> list[int]:
    """Node positions to cut before: after a layer's last LayerNormalization, once the part has
    about ``part_bytes`` of weights, where every crossing value has a known type."""
    cuts, weight, seen = [], 0, set()
    for index, node in enumerate(nodes):
        for name in node.inputs:
            found = initializers.get(name)
            if found is not None and found[1] is not None and name not in seen:
                seen.add(name)
                weight += found[1].length
        if node.op_type != _CUT_AFTER or weight < part_bytes or index + 1 >= len(nodes):
            continue
        cut = index + 1
        crossing = [name for name, at in producer.items() if at < cut and last_use.get(name, -1) >= cut]
        if all(name in typed for name in crossing):
            cuts.append(cut)
            weight = 0
    return cuts


def _part(
    model_fields: list[bytes],
    graph_rest: list[bytes],
    nodes: list[_Node],
    first: int,
    end: int,
    initializers: dict[str, tuple[bytes, ExternalTensor | None]],
    producer: dict[str, int],
    last_use: dict[str, int],
    typed: dict[str, bytes],
    graph_outputs: dict[str, bytes],
) -> GraphPart | None:
    read = list(dict.fromkeys(name for node in nodes for name in node.inputs if name))
    made = [name for node in nodes for name in node.outputs if name]
    own_initializers = [name for name in read if name in initializers]
    taken = [name for name in read if name not in initializers and producer.get(name, -1) < first]
    given = [name for name in made if last_use.get(name, -1) >= end or name in graph_outputs]
    if any(name not in typed for name in taken + given):
        return None
    tensors = tuple(t for name in own_initializers if (t := initializers[name][1]) is not None)
    graph = b"".join([*graph_rest, *(node.raw for node in nodes), *(initializers[n][0] for n in own_initializers)])
    graph += b"".join(_retag(typed[name], 11) for name in taken)
    graph += b"".join(_retag(typed[name], 12) for name in given)
    internal = [name for name in made if name not in given and name in typed]
    graph += b"".join(_retag(typed[name], 13) for name in internal)
    model = b"".join(model_fields) + _key(7) + _varint(len(graph)) + graph
    ready = max((t.offset + t.length for t in tensors), default=0)
    return GraphPart(graph=model, inputs=tuple(taken), outputs=tuple(given), tensors=tensors, ready_at=ready)


def _laid_out_in_order(parts: list[GraphPart]) -> bool:
    """No large weight is read by two parts (it would be copied, and repacked, twice), and when a
    part can be built (all its bytes arrived) the weights of later parts that arrived before it
    (a layout that is not in the nodes' order: biases first) are few: at most half a part."""
    owner: dict[str, int] = {}
    for index, part in enumerate(parts):
        for tensor in part.tensors:
            if tensor.name in owner and tensor.length >= _SHARED_LIMIT:
                return False
            owner.setdefault(tensor.name, index)
    sizes = [sum(t.length for t in part.tensors) for part in parts]
    for index, part in enumerate(parts[:-1]):
        early = sum(t.length for p in parts[index + 1 :] for t in p.tensors if owner[t.name] > index and t.offset < part.ready_at)
        if early > max(sizes) // 2:
            return False
    return True


def still_needed(parts: list[GraphPart], built: int) -> list[tuple[int, int]]:
    """The byte ranges of ``weights.bin`` that the parts after the first ``built`` ones read, in
    order and merged: everything else that has arrived can be handed back."""
    ranges = sorted((t.offset, t.offset + t.length) for part in parts[built:] for t in part.tensors)
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# --- protobuf bytes -------------------------------------------------------------------------------


def _raw_fields(data: memoryview) -> list[tuple[int, int | memoryview, bytes]]:
    """(field number, value, the field's own bytes with its key) of a message, in order."""
    found = []
    at = 0
    for number, value in _fields(data):
        _, after_key = _read_varint(data, at)
        if isinstance(value, memoryview):
            size, start = _read_varint(data, after_key)
            end = start + size
        else:
            end = _skip_scalar(data, at)
        found.append((number, value, bytes(data[at:end])))
        at = end
    return found


def _skip_scalar(data: memoryview, at: int) -> int:
    key, at = _read_varint(data, at)
    wire = key & 7
    if wire == 0:
        return _read_varint(data, at)[1]
    return at + (8 if wire == 1 else 4)


def _node(value: memoryview, raw: bytes) -> _Node:
    node = _Node(raw=raw)
    for number, item in _fields(value):
        if isinstance(item, memoryview):
            text = bytes(item).decode("utf-8") if number in (1, 2, 4) else ""
            if number == 1:
                node.inputs.append(text)
            elif number == 2:
                node.outputs.append(text)
            elif number == 4:
                node.op_type = text
    return node


def _name(message: memoryview, number: int) -> str:
    for field_number, value in _fields(message):
        if field_number == number and isinstance(value, memoryview):
            return bytes(value).decode("utf-8")
    return ""


def _retag(raw: bytes, number: int) -> bytes:
    """The same length-delimited message under another field number (a value_info as an input)."""
    view = memoryview(raw)
    _, at = _read_varint(view, 0)
    return _key(number) + bytes(view[at:])


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
