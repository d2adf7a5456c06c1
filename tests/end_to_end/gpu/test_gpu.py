"""CUDA-only behaviour: teachers moved to the trainer's device, and run under its precision context."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.devices import DeviceGPU
from conftest import make_dataloader, make_student, make_teacher

from composer_kd import Distillation, KLDivergence

pytestmark = pytest.mark.gpu


class TeacherProbe(Callback):
    def __init__(self, teacher):
        self.teacher = teacher
        self.devices, self.dtypes, self.kd = [], [], []
        teacher.register_forward_hook(lambda m, a, out: self.dtypes.append(out.dtype))

    def after_loss(self, state, logger):
        self.devices.append(next(self.teacher.parameters()).device.type)
        self.kd.append(state.loss['kd'].detach())


@pytest.mark.parametrize('precision', ['fp32', 'amp_bf16', 'amp_fp16'])
def test_teacher_on_cuda_under_trainer_precision(precision):
    teacher = make_teacher()
    probe = TeacherProbe(teacher)
    Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        device='gpu',
        precision=precision,
        algorithms=[Distillation(teacher, KLDivergence(2.0))],
        callbacks=[probe],
        progress_bar=False,
    ).fit()
    assert probe.devices == ['cuda'] * 4
    expected = {'fp32': torch.float32, 'amp_bf16': torch.bfloat16, 'amp_fp16': torch.float16}[precision]
    assert probe.dtypes == [expected] * 4
    assert all(torch.isfinite(kd) and kd.dtype == torch.float32 for kd in probe.kd)
    # Moved once, and left on the device (parameters are bit-identical, only placed).
    assert next(teacher.parameters()).device.type == 'cuda'


def test_loss_equals_formula_on_cuda():
    teacher, student = make_teacher(), make_student()
    seen = []

    class Capture(Callback):
        def after_loss(self, state, logger):
            x, _ = state.batch
            seen.append((x.detach().cpu(), state.outputs.detach().cpu(), state.loss['kd'].detach().cpu()))

    Trainer(
        model=student,
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        # Composer allows TF32 matmuls by default, which alone moves logits by ~1e-3 relative.
        device=DeviceGPU(allow_tf32=False),
        precision='fp32',  # Composer's GPU default is amp_fp16
        algorithms=[Distillation(teacher, KLDivergence(3.0))],
        callbacks=[Capture()],
        progress_bar=False,
    ).fit()
    cpu_teacher = teacher.cpu().eval()
    for x, student_logits, kd in seen:
        p = torch.softmax(cpu_teacher(x).double() / 3.0, -1)
        q = torch.softmax(student_logits.double() / 3.0, -1)
        expected = 9.0 * (p * (p.log() - q.log())).sum(-1).mean()
        assert kd.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_out_of_memory_is_retried_with_smaller_microbatches():
    class HungryTeacher(torch.nn.Module):
        """Runs out of memory on microbatches larger than 2, as a big teacher would."""

        def __init__(self):
            super().__init__()
            self.net = make_teacher()
            self.sizes = []

        def forward(self, x):
            self.sizes.append(x.shape[0])
            if x.shape[0] > 2:
                raise RuntimeError('CUDA out of memory. Tried to allocate 1.00 GiB (simulated by the test)')
            return self.net(x)

    teacher = HungryTeacher()
    trainer = Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        device='gpu',
        device_train_microbatch_size='auto',
        algorithms=[Distillation(teacher)],
        progress_bar=False,
    )
    trainer.fit()
    assert trainer.state.device_train_microbatch_size <= 2
    assert int(trainer.state.timestamp.batch) == 4
    assert teacher.sizes[0] == 8 and max(teacher.sizes[-4:]) <= 2


def test_student_under_fsdp_mixed_precision_distils():
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    class Capture(Callback):
        def after_loss(self, state, logger):
            seen.append(state.loss['kd'].detach().float().cpu())

    trainer = Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        device='gpu',
        precision='amp_bf16',
        parallelism_config={'fsdp': {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE'}},
        algorithms=[Distillation(teacher, KLDivergence(2.0))],
        callbacks=[Capture()],
        progress_bar=False,
    )
    trainer.fit()
    assert len(seen) == 4 and all(torch.isfinite(kd) and kd > 0 for kd in seen)
    for key, value in teacher.state_dict().items():  # the user's teacher: frozen, untouched (a sharded copy ran)
        torch.testing.assert_close(value.cpu(), before[key], rtol=0, atol=0)


def test_distilling_a_microbatch_never_waits_for_the_gpu():
    """CUDA's own sync detector, set to error, around the distillation of every microbatch (token logits with
    padding, so the masked loss runs too)."""
    from test_step_cost import BATCH, TokenModel, token_batches

    distillation = Distillation(TokenModel(width=16), KLDivergence(2.0))
    apply = distillation.apply
    checked = []

    def strict_apply(event, state, logger):
        if event.name != 'AFTER_LOSS':
            return apply(event, state, logger)
        torch.cuda.set_sync_debug_mode('error')
        try:
            apply(event, state, logger)
        finally:
            torch.cuda.set_sync_debug_mode('default')
        checked.append(state.loss['kd'].device.type)

    distillation.apply = strict_apply
    model = TokenModel(width=4)
    Trainer(
        model=model,
        train_dataloader=token_batches(3),
        device_train_microbatch_size=BATCH // 2,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[distillation],
        max_duration='3ba',
        device='gpu',
        progress_bar=False,
    ).fit()
    assert checked == ['cuda'] * 6


def _projected_feature_fit(parallelism_config, precision='fp32', **student_kwargs):
    """A student whose 8-wide hidden layer is matched to a 16-wide teacher's through a learned projection, trained
    on the GPU; returns the student, the distillation and the feature terms seen at each step."""
    from collections import OrderedDict

    from torch import nn

    from composer_kd import FeaturePair

    def net(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(OrderedDict(hidden=nn.Linear(6, width), act=nn.ReLU(), out=nn.Linear(width, 4)))

    student = make_student()
    student.module = net(8, seed=3)
    distillation = Distillation(net(16, seed=1), feature_pairs=[FeaturePair(student='hidden', teacher='hidden')])
    seen = []

    class Capture(Callback):
        def after_loss(self, state, logger):
            seen.append(state.loss['feature_0'].detach().float().cpu())

    trainer = Trainer(
        model=student,
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        device='gpu',
        precision=precision,
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        parallelism_config=parallelism_config,
        algorithms=[distillation],
        callbacks=[Capture()],
        seed=11,
        progress_bar=False,
        **student_kwargs,
    )
    trainer.fit()
    return student, distillation, seen


def _whole_state(module):
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu()
        for k, v in module.state_dict().items()
    }


@pytest.mark.parametrize('version', [1, 2])
def test_learned_feature_projection_under_fsdp_trains_as_without(version):
    """The projection is kept out of sharding (whole, in full precision) and student and projection train as
    without FSDP."""
    from composer.utils.parallelism import FSDP2Config

    config = {'sharding_strategy': 'FULL_SHARD'} if version == 1 else FSDP2Config()
    plain_student, plain, plain_seen = _projected_feature_fit(None)
    student, distillation, seen = _projected_feature_fit({'fsdp': config})
    assert len(seen) == 4 and all(torch.isfinite(term) and term > 0 for term in seen)
    torch.testing.assert_close(torch.stack(seen), torch.stack(plain_seen), rtol=1e-5, atol=1e-6)
    weight = distillation.projections['0'].weight
    assert type(weight) is torch.nn.Parameter and weight.shape == (16, 8)
    for key, value in _whole_state(plain_student).items():
        torch.testing.assert_close(_whole_state(student)[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(_whole_state(distillation.projections), _whole_state(plain.projections))


def test_learned_feature_projection_under_fsdp_mixed_precision():
    _, distillation, seen = _projected_feature_fit(
        {'fsdp': {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE'}}, precision='amp_bf16'
    )
    assert len(seen) == 4 and all(torch.isfinite(term) and term > 0 for term in seen)
    assert distillation.projections['0'].weight.dtype == torch.float32


def test_learned_feature_projection_under_fsdp_without_orig_params_is_refused_before_training():
    from collections import OrderedDict

    from torch import nn

    from composer_kd import FeaturePair

    def net(width: int) -> nn.Module:
        return nn.Sequential(OrderedDict(hidden=nn.Linear(6, width), act=nn.ReLU(), out=nn.Linear(width, 4)))

    student = make_student()
    student.module = net(8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distillation = Distillation(net(16), feature_pairs=[FeaturePair(student='hidden', teacher='hidden')])
    with pytest.raises(ValueError, match=r"pairs \[0\] need a learned projection .*\['use_orig_params'\] = True"):
        Trainer(
            model=student,
            train_dataloader=make_dataloader(),
            max_duration='1ep',
            device='gpu',
            parallelism_config={'fsdp': {'sharding_strategy': 'FULL_SHARD', 'use_orig_params': False}},
            algorithms=[distillation],
        )
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value.cpu(), before[key].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize('precision', ['fp32', 'amp_bf16'])
def test_on_policy_generation_on_cuda_is_reproducible(precision):
    """Generation runs on the GPU under the trainer's precision, seeded: two runs generate the same tokens."""
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import GPT2Config, GPT2LMHeadModel

    from composer_kd import OnPolicy

    def gpt2(layers, width, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=24, n_positions=48, n_embd=width, n_layer=layers, n_head=2))

    def collate(rows):
        input_ids = torch.tensor(rows)
        return {'input_ids': input_ids, 'labels': input_ids.clone(), 'prompt_length': torch.full((len(rows),), 4)}

    rows = torch.randint(0, 24, (16, 10), generator=torch.Generator().manual_seed(0)).tolist()

    def run():
        batches = []

        class Batches(Callback):
            def after_loss(self, state, logger):
                batches.append(state.batch['input_ids'].detach().cpu())
                assert state.batch['input_ids'].device.type == 'cuda'
                assert torch.isfinite(state.loss['kd'])

        student = HuggingFaceModel(gpt2(1, 16, 1), use_logits=True, shift_labels=True)
        Trainer(
            model=student,
            train_dataloader=DataLoader(rows, batch_size=8, collate_fn=collate),
            max_duration='2ba',
            device='gpu',
            precision=precision,
            algorithms=[Distillation(gpt2(2, 32, 0), on_policy=OnPolicy(max_new_tokens=6))],
            callbacks=[Batches()],
            progress_bar=False,
            seed=3,
        ).fit()
        return batches

    first, second = run(), run()
    assert len(first) == 2 and all(batch.shape == (8, 10) for batch in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
