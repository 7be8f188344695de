"""Sequence parallelism for the DiT (DeepSpeed-Ulysses form) over torch.distributed, one rank per GPU.

Every rank runs the shared sampler on the full latents; only the DiT call is split. `layout` says which rows
of the joint sequence a rank holds, `attention` exchanges heads around attention, `exchange` carries the
collectives over the process group, `executor` wraps a backend's per-rank DiT into the sampler's `Executor`,
and `world` starts or finds the process group and broadcasts the prompt.
"""
