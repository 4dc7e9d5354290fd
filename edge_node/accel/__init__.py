"""Acceleration on the node: which backend runs the model, and the exports they run.

`registry` names every backend (torch eager, onnxruntime, tensorrt, cuda) and the module
that implements it, imported only when chosen; `backend` is the interface the node sees
and `load_backend`; `export` writes ONNX graphs (+ `quantize` for INT8) with a `manifest`
that a node checks before serving; `resolve` finds or builds the export a node needs;
`cli` is `fedretrieve export`.
"""
