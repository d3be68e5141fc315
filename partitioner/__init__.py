"""ONNX analysis, profiling, the cost model, partition + placement, and stage extraction.
Everything here is plain computation on files and dataclasses: no network, no root."""
