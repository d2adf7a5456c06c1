"""Teachers sharded like an FSDP student: forward-only FSDP-2 copies whose parameters are gathered one unit at a
time during the teacher's forward pass and released right after it.

When the student is sharded by FSDP (version 1 or 2), each rank holding a full replica of a teacher that is larger
than the student would cap the teacher's size at what one device holds beside a shard of the student. A sharded
teacher holds ``1/N`` of its parameters on each of ``N`` ranks between forward passes. It never trains: its
parameters need no gradients, no optimizer state, and it is not in the student's checkpoints.

The user's teacher is never changed: :func:`shard_teacher` builds a structural copy on the meta device (no memory),
shards it with Composer's FSDP-2 preparation, materialises each rank's shards on its device and fills them from the
user's weights. On ranks whose teacher was built on the meta device (holding no weights), the shards are broadcast
from rank zero, which alone then holds a full copy of the teacher in host memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from composer.core import Precision, State
from composer.distributed.fsdp2 import prepare_fully_shard
from composer.models import HuggingFaceModel
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp.wrap import CustomPolicy

__all__ = [
    'TeacherSharding',
    'held_bytes',
    'holds_weights',
    'is_sharded',
    'release_gathered',
    'shard_teacher',
    'shard_units',
    'unsharded_class',
]


def holds_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds real tensors (not on the meta device)."""
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules gathered one at a time, as FSDP units of their own: those marked ``_fsdp_wrap = True``, those
    a model's ``fsdp_wrap_fn`` picks (llm-foundry's blocks), and the Hugging Face blocks a model names in
    ``_no_split_modules`` (its transformer layers). The root, which holds the rest, is not among them.
    """
    block_names = set()
    wrap_fns = []
    for submodule in module.modules():
        block_names.update(getattr(submodule, '_no_split_modules', None) or ())
        wrap_fn = getattr(submodule, 'fsdp_wrap_fn', None)
        if callable(wrap_fn):
            wrap_fns.append(wrap_fn)
    units = []
    for submodule in module.modules():
        if submodule is module:
            continue
        marked = getattr(submodule, '_fsdp_wrap', None)
        if marked is not None:
            chosen = bool(marked)
        else:
            chosen = type(submodule).__name__ in block_names or any(bool(fn(submodule)) for fn in wrap_fns)
        if chosen and any(True for _ in submodule.parameters()):
            units.append(submodule)
    return units


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (ties kept, no memory used)."""
    memo: dict[int, torch.Tensor] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device='meta'), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device='meta')
    return copy.deepcopy(module, memo)


def _weights_from_rank0(teacher: nn.Module) -> bool:
    """Whether the shards must come from rank zero's weights (some rank's teacher holds none), decided by every rank
    together; refused on every rank, so that none waits for the others, when rank zero's teacher holds none."""
    held = [holds_weights(teacher)]
    if dist.get_world_size() > 1:
        held = dist.all_gather_object(held[0])
    if not held[0]:
        raise ValueError(
            f'The teacher ({type(teacher).__name__}) is on the meta device on rank 0: to shard it, rank 0 must hold '
            'its weights (the other ranks may build it on the meta device and receive theirs from rank 0).'
        )
    return not all(held)


def shard_teacher(teacher: nn.Module, device: torch.device, mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """A forward-only copy of ``teacher`` sharded across the ranks by FSDP (version 2), the user's teacher untouched.

    Each unit of :func:`shard_units` and the root (the module the forward pass calls: the network inside a
    ``HuggingFaceModel``, else the teacher) are sharded; a forward pass gathers one unit at a time and
    releases it after its forward (call :func:`release_gathered` after each forward pass for the root's own
    parameters). Every rank must call this, with the same architecture.

    Args:
        teacher (nn.Module): The teacher, frozen. On every rank but zero it may be built on the meta device: its
            weights are then broadcast from rank zero's.
        device (torch.device): Where this rank's shards live.
        mesh (DeviceMesh, optional): The ranks to shard across. Default: every rank.

    Returns:
        nn.Module: The sharded copy, in eval mode with gradients off.

    Raises:
        ValueError: If rank zero's teacher holds no weights (a meta teacher there).

    Example:
        .. testcode::

            import tempfile
            import torch
            from composer_kd.models.sharding import shard_teacher

            # Sharding needs torch.distributed started: under Composer's launcher, or as a process group of one.
            started_here = not torch.distributed.is_initialized()
            if started_here:
                store = tempfile.NamedTemporaryFile(delete=False).name
                torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
            teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
            sharded = shard_teacher(teacher, torch.device('cpu'))
            inputs = torch.randn(2, 4)
            with torch.no_grad():
                assert torch.allclose(sharded(inputs), teacher(inputs))
            if started_here:
                torch.distributed.destroy_process_group()
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    real = holds_weights(teacher)
    from_rank0 = _weights_from_rank0(teacher)
    sharded = _meta_copy(teacher)
    root = _called_module(sharded)
    units = set(shard_units(root))
    policy = CustomPolicy(lambda module: module is root or module in units)
    prepare_fully_shard(root, FSDP2Config(device_mesh=mesh, reshard_after_forward=True), Precision.FP32, policy)
    sharded.to_empty(device=device)
    weights = teacher.state_dict() if real else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(sharded, weights, options=options)
    # Buffers are not sharded, and those kept out of the state dict (rotary frequencies, masks) must be copied too.
    own_buffers = dict(teacher.named_buffers())
    for name, buffer in sharded.named_buffers():
        if real:
            buffer.copy_(own_buffers[name])
        if from_rank0:
            dist.broadcast(buffer, src=0)
    sharded.eval()
    sharded.requires_grad_(False)
    return sharded


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a part of it) is sharded by FSDP version 2, so that its forward pass is collective."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(submodule, FSDPModule) for submodule in module.modules())


def unsharded_class(module: nn.Module) -> type:
    """``module``'s own class: FSDP version 2 gives a sharded module a subclass of it (``FSDP<class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _called_module(teacher: nn.Module) -> nn.Module:
    """The module a teacher's forward pass calls first (see :func:`~composer_kd.models.outputs.run_teacher`): the
    network inside Composer's ``HuggingFaceModel``, else the teacher. It is the sharded copy's FSDP root: the root
    gathers the parameters of no unit of their own when its forward pass starts, so it must be the module called."""
    return teacher.model if isinstance(teacher, HuggingFaceModel) else teacher


def release_gathered(module: nn.Module) -> None:
    """Release the parameters a sharded teacher's root gathered for its forward pass (its units release their own);
    nothing for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    root = _called_module(module)
    if isinstance(root, FSDPModule):
        root.reshard()


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (e.g. a module's ``parameters()``): each storage counted once (tied
    weights once), a sharded parameter by its local shard's storage (FSDP's padding included)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class TeacherSharding:
    """How a fit shards its teachers: on which device each rank's shards live (and across which ranks).

    Args:
        device (torch.device): This rank's device.
        mesh (DeviceMesh, optional): The ranks to shard across (the student's FSDP-2 mesh). Default: every rank.
    """

    device: torch.device
    mesh: Optional[DeviceMesh] = None

    @classmethod
    def for_fit(cls, state: State, shard: bool) -> Optional[TeacherSharding]:
        """The sharding for a fit whose student FSDP shards, when ``shard`` asks for it; ``None`` otherwise."""
        config = getattr(state, 'fsdp_config', None)
        if not shard or config is None:
            return None
        device = (
            torch.device('cuda', torch.cuda.current_device()) if state.device.name == 'gpu' else torch.device('cpu')
        )
        return cls(device, getattr(config, 'device_mesh', None))

    def apply(self, teacher: nn.Module) -> nn.Module:
        """The sharded copy of ``teacher`` (see :func:`shard_teacher`)."""
        return shard_teacher(teacher, self.device, self.mesh)
