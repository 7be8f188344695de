"""Prompt -> video: the pipeline, the three executors, CUDA graphs, the video writer and the stage report.

Only the executor differs between backends; `BACKENDS` lives here, not in `pipeline`, so the command line
can list them without importing torch.
"""

#: trt: TensorRT engines (the product); torch: the PyTorch modules (the reference); onnxruntime: the exported
#: graphs' float32 twins (checking those files on a CPU)
BACKENDS = ("trt", "torch", "onnxruntime")
