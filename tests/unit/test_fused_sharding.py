"""How the fused output layer meets FSDP, on real FSDP objects in a gloo process group of one (no Trainer): a model
sharded by FSDP version 1 is refused, naming where its output layer sits (a unit of its own, the root unit), and
under version 2 the layer's unit is found and its released weight gathered and released again.

The two-process trainings are in tests/end_to_end/multiprocess/test_fused_multiprocess.py; FSDP version 1 inside a
Trainer (CUDA only) in tests/end_to_end/gpu/test_fused_fsdp_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed
from composer.models import HuggingFaceModel
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd.parts.fused import OutputLayerCapture, output_layer

VOCAB = 40


@pytest.fixture(scope='module', autouse=True)
def process_group_of_one(tmp_path_factory):
    """FSDP needs torch.distributed started: a gloo group of this process alone, ended after the module's tests
    (left as found where one was running already)."""
    if torch.distributed.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp('process_group') / 'store'
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def gpt2(tied: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=tied, use_cache=False
    )
    return GPT2LMHeadModel(config)


def fsdp_v1(network: GPT2LMHeadModel, wrap) -> HuggingFaceModel:
    """A ``HuggingFaceModel`` whose network is wrapped as Composer's FSDP version 1 wraps it: the network as the
    root unit, the modules ``wrap`` picks as units inside it."""
    model = HuggingFaceModel(network, use_logits=True)
    model.model = FullyShardedDataParallel(
        network, auto_wrap_policy=CustomPolicy(wrap), device_id=torch.device('cpu'), use_orig_params=True
    )
    return model


def test_an_output_layer_wrapped_as_its_own_fsdp_v1_unit_is_refused():
    network = gpt2()
    head = network.lm_head
    model = fsdp_v1(network, lambda module: module is head)
    pattern = r"student's output layer \(model\.lm_head\) is wrapped as its own FSDP unit under FSDP version 1"
    with pytest.raises(ValueError, match=pattern) as refused:
        OutputLayerCapture(model, 'student')
    message = str(refused.value)
    assert 'Use FSDP version 2' in message and 'or DDP' in message and 'without fused=' in message
    assert 'forward' not in head.__dict__  # nothing was installed


def test_an_output_layer_in_the_fsdp_v1_root_unit_is_refused():
    network = gpt2(tied=True)
    model = fsdp_v1(network, lambda module: type(module).__name__ == 'GPT2Block')
    with pytest.raises(
        ValueError, match=r"student's output layer \(model\.lm_head\) is in the root unit of FSDP version 1"
    ):
        output_layer(model)


def test_under_fsdp_v2_an_output_layer_in_the_root_unit_is_found_with_its_unit():
    network = gpt2()
    fully_shard(network.transformer.h[0])
    fully_shard(network)
    assert output_layer(HuggingFaceModel(network, use_logits=True)) is network.lm_head
    assert OutputLayerCapture(network).unit is network  # the root unit holds it


def test_an_output_layer_in_its_own_fsdp_v2_unit_is_gathered_and_released():
    network = gpt2()
    whole_weight = network.lm_head.weight.detach().clone()
    fully_shard(network.lm_head)
    fully_shard(network)
    capture = OutputLayerCapture(HuggingFaceModel(network, use_logits=True))
    assert capture.unit is network.lm_head and capture.placeholder_requires_grad
    capture.install()
    capture.on = True
    try:
        tokens = torch.randint(0, VOCAB, (2, 5))
        logits = network(input_ids=tokens).logits
        # The placeholder takes part in autograd (for FSDP's hooks on the outputs) and holds one zero, broadcast.
        assert logits.requires_grad and logits.stride() == (0, 0, 0) and not logits.any()
        assert isinstance(network.lm_head.weight, DTensor)  # released after the layer's forward pass
        assert capture.gather() is network.lm_head
        assert type(network.lm_head.weight) is torch.nn.Parameter
        torch.testing.assert_close(network.lm_head.weight.detach(), whole_weight, rtol=0, atol=0)
        network.lm_head.reshard()
        assert capture.gather() is network.lm_head and capture.gather() is None  # nothing left to gather
    finally:
        network.lm_head.reshard()
        capture.remove()


def test_without_fsdp_the_placeholder_needs_no_gradient():
    network = gpt2()
    capture = OutputLayerCapture(network)
    assert capture.unit is None and not capture.placeholder_requires_grad
    capture.install()
    capture.on = True
    try:
        logits = network(input_ids=torch.randint(0, VOCAB, (2, 5))).logits
        assert not logits.requires_grad and logits.stride() == (0, 0, 0)
    finally:
        capture.remove()
