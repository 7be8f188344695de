"""ONNX -> TensorRT: shape profiles, builds, the engines folder's manifest. `tensorrt` is imported lazily.

profiles    shape lists -> one optimization profile (and why one engine covers every size and duration)
build       one plan from one ONNX, with progress, timing cache and atomic writes
manifest    what a folder's plans were built from / for; rebuild and compatibility decisions
update      build what changed in an engines folder, then record it (what build-engines calls)
fingerprint SHA-256 of weights and ONNX (with external data)
layout      file names in an engines folder; the rebuild command
gpu, trt_api  the current GPU; TensorRT presence, version and error collection
"""
