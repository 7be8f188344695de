"""ONNX -> TensorRT: builds and the decision what to build. `tensorrt` is imported lazily.

build     one plan from one ONNX, with progress, timing cache and atomic writes
update    build what changed in an engines folder, inspect and record it (what build-engines calls)
inspect   the engine inspector's layer information: what is recorded per plan, and unfused attention refused
plan_io   plans streamed to and from their files
trt_api   TensorRT presence, version rules, alignment and error collection

The graphs, their profiles and the manifest these read and write are `k4trt.core`'s.
"""
