"""What every backend and stage above the models shares, written once.

executor      the seam between the shared algorithms and a backend (PyTorch, ONNX Runtime, TensorRT)
sampler       the 4-step re-noise sampler
vae_schedule  the VAE's causal chunk schedule and pixel mapping
graphs        the graph registry: every exported graph's files, tensors, dtypes, dynamic axes and shapes
profiles      min/opt/max shape ranges of a build profile, derived from the requested cases
manifest      manifest.json of an engines folder: what each file was made from, one schema, one stamp cache
gpu           which GPU this process builds for or runs on
"""
