"""Sharded teachers in one process (a process group of one): which submodules become units, when a fit shards, the
sharded copy against the teacher it was made from, and the bytes a rank holds. Several ranks:
tests/end_to_end/multiprocess/test_sharded_teacher.py."""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd.models.sharding import (
    TeacherSharding,
    held_bytes,
    is_sharded,
    release_gathered,
    shard_teacher,
    shard_units,
    unsharded_class,
)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def process_group():
    """A gloo process group of one rank, closed afterwards."""
    started = not torch.distributed.is_initialized()
    if started:
        store = tempfile.NamedTemporaryFile(delete=False).name
        torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
    yield
    if started:
        torch.distributed.destroy_process_group()


def test_units_are_the_blocks_a_model_names_and_the_modules_marked():
    model = gpt2()
    assert shard_units(model) == list(model.transformer.h)  # GPT2Block is in _no_split_modules
    marked = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    marked[1]._fsdp_wrap = True
    marked[2]._fsdp_wrap = True  # no parameters: nothing to shard
    assert shard_units(marked) == [marked[1]]


def test_a_fit_shards_only_under_fsdp_and_when_asked():
    cpu = SimpleNamespace(name='cpu')
    assert TeacherSharding.for_fit(SimpleNamespace(fsdp_config=None, device=cpu), shard=True) is None
    fsdp = SimpleNamespace(fsdp_config=SimpleNamespace(device_mesh=None), device=cpu)
    assert TeacherSharding.for_fit(fsdp, shard=False) is None
    assert TeacherSharding.for_fit(fsdp, shard=True) == TeacherSharding(torch.device('cpu'), None)


def test_the_sharded_copy_computes_the_teachers_logits_and_leaves_the_teacher_as_it_was(process_group):
    teacher = gpt2()
    before = copy.deepcopy(teacher.state_dict())
    parameters = list(teacher.parameters())
    sharded = shard_teacher(teacher, torch.device('cpu'))
    assert is_sharded(sharded) and not is_sharded(teacher)
    assert unsharded_class(sharded) is GPT2LMHeadModel and type(teacher) is GPT2LMHeadModel
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    assert not sharded.training and not any(p.requires_grad for p in sharded.parameters())
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    release_gathered(sharded)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # the root's parameters released too
    assert list(teacher.parameters()) == parameters
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_rank_zero_must_hold_the_weights(process_group):
    with torch.device('meta'):
        teacher = nn.Linear(4, 2)
    with pytest.raises(ValueError, match='on the meta device on rank 0'):
        shard_teacher(teacher, torch.device('cpu'))


def test_held_bytes_count_each_storage_once():
    model = gpt2()  # lm_head.weight is wte.weight
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held_bytes(model.parameters()) == expected
    assert held_bytes([model.lm_head.weight, model.transformer.wte.weight]) == 32 * 16 * 4
