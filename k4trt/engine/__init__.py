"""ONNX -> TensorRT: builds and the decision what to build. `tensorrt` is imported lazily.

build     one plan from one ONNX, with progress, timing cache and atomic writes
update    build what changed in an engines folder, then record it (what build-engines calls)
trt_api   TensorRT presence, version and error collection

The graphs, their profiles and the manifest these read and write are `k4trt.core`'s.
"""
