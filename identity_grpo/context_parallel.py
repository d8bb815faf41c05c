"""Context parallelism for the Wan transformers: diffusers' Ulysses / ring attention.

The ranks of a context-parallel group run ONE batch together: each holds a contiguous share of the
video tokens through every block, attention exchanges the rest (Ulysses: an all-to-all over heads;
ring: K/V passed around), and the output projection gathers the full sequence, so every rank gets
the whole velocity. Activations per rank shrink by the degree, which is what long videos need
(480x832x81: 32,760 tokens per sample, see docs/performance.md).

diffusers ships a plan (which module inputs to split, which output to gather) for
``WanTransformer3DModel`` (Wan2.1 T2V, the Phantom architecture) but none for
``WanVACETransformer3DModel``; :data:`VACE_CP_PLAN` is that plan. Gradients: a rank's parameter
gradient is the contribution of its own tokens, so the sum over the group's ranks is the full
gradient (DDP averages instead: scale the loss by the degree when the group shares one DDP world).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataRanks:
    """The data-parallel view of the processes when ``degree`` consecutive ranks form one
    context-parallel group: the group runs ONE batch together, so it is one data replica.

    Attributes:
        rank: this process's replica (``process_index // degree``): what data, noise and
            shuffles are seeded with, so a group's ranks agree on every sample.
        size: number of replicas (``num_processes // degree``).
        degree: ranks per context-parallel group (1: plain data parallelism).
        writes: whether this process writes per-replica files (the group's first rank).
    """

    rank: int
    size: int
    degree: int
    writes: bool

    def own_share(self, gathered: torch.Tensor, num_processes: int) -> torch.Tensor:
        """Of a tensor gathered from every process (``num_processes`` equal chunks), each
        replica's chunk once: the first rank's of every context-parallel group."""
        return gathered.view(num_processes, -1, *gathered.shape[1:])[::self.degree].flatten(0, 1)

    def mine(self, per_replica: torch.Tensor) -> torch.Tensor:
        """This replica's chunk of a tensor holding every replica's in order."""
        return per_replica.view(self.size, -1, *per_replica.shape[1:])[self.rank]


def data_ranks(accelerator, config) -> DataRanks:
    """:class:`DataRanks` of ``accelerator``'s process under ``config.context_parallel_degree``."""
    degree = max(int(config.get("context_parallel_degree", 1)), 1)
    return DataRanks(rank=accelerator.process_index // degree, size=accelerator.num_processes // degree,
                     degree=degree, writes=accelerator.process_index % degree == 0)


def vace_cp_plan() -> dict:
    """Where ``WanVACETransformer3DModel``'s sequence is split and gathered.

    As diffusers' Wan plan (rotary embeddings and the main stream split before ``blocks.0``, the
    output gathered at ``proj_out``, text left whole) plus the control stream: VACE's blocks run
    before the main ones and ``vace_blocks.0`` adds the patch-embedded video to the control tokens,
    so both of its sequence inputs are split there. Later VACE blocks receive the unsplit video
    tokens but do not use them (only block 0 has ``proj_in``). Their hints are added token-wise to
    the split main stream, so they stay split.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split(dims: int, split_output: bool = False) -> ContextParallelInput:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=split_output)

    return {
        "rope": {0: split(4, split_output=True), 1: split(4, split_output=True)},
        "vace_blocks.0": {"hidden_states": split(3), "control_hidden_states": split(3)},
        "blocks.0": {"hidden_states": split(3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def context_parallel_plan(transformer) -> dict:
    """The plan of ``transformer``'s class: :func:`vace_cp_plan` for VACE, diffusers' own for the
    text-to-video transformer (Phantom)."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    if isinstance(transformer, WanVACETransformer3DModel):
        return vace_cp_plan()
    if isinstance(transformer, WanTransformer3DModel):
        return transformer._cp_plan
    raise ValueError(f"no context-parallel plan for {type(transformer).__name__}")


@contextmanager
def _cpu_device_count():
    """diffusers picks a rank's device as ``rank % torch.accelerator.device_count()``, which divides
    by zero on CPU ranks (gloo); there every rank's device is the CPU."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(transformer, degree: int, *, ring: bool = False):
    """Split ``transformer``'s sequence over ``degree`` ranks (all ranks of the default process
    group, which must have exactly ``degree`` ranks unless a 2-D mesh is built by the caller).

    ``ring=False``: Ulysses, which needs ``num_attention_heads % degree == 0`` (1.3B: 12 heads,
    14B: 40) and works with every attention backend, PyTorch SDPA ("native") included. ``ring=True``:
    ring attention, which needs a backend that returns the log-sum-exp (flash-attn, cuDNN), so CUDA.
    Call it before wrapping the model (peft, DDP, FSDP); the hooks sit on the diffusers modules.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if degree < 2:
        raise ValueError(f"context parallelism needs a degree >= 2, got {degree}")
    heads = transformer.config.num_attention_heads
    if not ring and heads % degree:
        raise ValueError(f"Ulysses splits the {heads} attention heads over {degree} ranks; choose a degree that "
                         "divides them, or ring attention")
    if dist.get_world_size() != degree:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but the degree is {degree}; "
                         "combining context and data parallelism needs a 2-D mesh (not built here)")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (degree, 1) if ring else (1, degree)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ring_degree=shape[0], ulysses_degree=shape[1], mesh=mesh)
    with _cpu_device_count():
        transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(transformer))
    return transformer
