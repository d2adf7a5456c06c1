"""Teachers sharded under FSDP versions 1 and 2 on a CUDA device (one rank): the teacher that runs is a sharded
copy, its logits are the teacher's, and plain distillation and a teacher cache train the student as without FSDP;
so does a stored teacher signal (no teacher runs). Several ranks (version 2, CPU):
tests/end_to_end/multiprocess/test_sharded_teacher.py."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from composer.utils.parallelism import FSDP2Config
from tiny_models import tiny_gpt2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache
from composer_kd.models.sharding import is_sharded
from composer_kd.models.teachers import teacher_logits

pytestmark = pytest.mark.gpu


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


class ShardedTeacherCheck(Callback):
    """On the first batch: whether the teacher that runs is sharded, and its logits against the user's teacher's."""

    def __init__(self, distillation: Distillation, teacher: nn.Module):
        self.distillation, self.teacher = distillation, teacher
        self.sharded, self.difference = None, None

    def batch_end(self, state, logger):
        if self.sharded is not None:
            return
        runner = self.distillation._fit.runners[0]
        self.sharded = is_sharded(runner.module)
        with torch.no_grad():
            ran = teacher_logits([runner], state.batch)
            own = teacher_logits([self.teacher.to(ran.device)], state.batch)
        self.difference = float((ran - own).abs().max())


def signal_weights(parallelism: dict | None) -> dict[str, torch.Tensor]:
    """A GPT-2 student distilled from a stored signal of a GPT-2 teacher (top 8 of 48): no teacher runs."""
    from composer.models import HuggingFaceModel
    from transformers import GPT2LMHeadModel

    from composer_kd import TeacherSignal
    from composer_kd.signal.encoding import decode_signal, encode_signal
    from composer_kd.signal.shards import collate_signal

    def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
        return tiny_gpt2(layers, width, seed, vocab=48, positions=16)

    tokens = torch.randint(0, 48, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = gpt2(2, 32, seed=1).eval()(tokens).logits
    samples = []
    for row, row_logits in zip(tokens, logits, strict=True):
        values, indices, log_tail = decode_signal(encode_signal(row_logits, k=8))
        samples.append({
            'input_ids': row, 'teacher_topk_indices': indices, 'teacher_topk_logits': values,
            'teacher_log_tail': log_tail, 'teacher_vocab_size': torch.tensor(48),
        })  # fmt: skip
    student = HuggingFaceModel(gpt2(1, 16, seed=2), use_logits=True, shift_labels=True)
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(samples, batch_size=4, collate_fn=collate_signal),
        max_duration='3ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[Distillation(TeacherSignal(), KLDivergence(2.0), 0.5, 0.5)],
        device='gpu',
        precision='fp32',
        seed=7,
        progress_bar=False,
        parallelism_config=parallelism,
    )
    trainer.fit()
    with torch.no_grad():
        return {k: (v.full_tensor() if hasattr(v, 'full_tensor') else v).cpu() for k, v in student.state_dict().items()}


CONFIGS = {'none': None, 'fsdp1': {'fsdp': {'sharding_strategy': 'FULL_SHARD'}}, 'fsdp2': {'fsdp': FSDP2Config()}}


def fit(parallelism: str, cached: bool) -> tuple[dict[str, torch.Tensor], ShardedTeacherCheck]:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator))
    teacher = mlp(64, seed=1)
    student = ComposerClassifier(mlp(8, seed=3), num_classes=4)
    distillation = Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_cache=TeacherCache() if cached else None)
    check = ShardedTeacherCheck(distillation, mlp(64, seed=1))
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(IndexedDataset(data) if cached else data, batch_size=8),
        max_duration='2ep',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        callbacks=[check],
        device='gpu',
        precision='fp32',
        seed=7,
        progress_bar=False,
        parallelism_config=CONFIGS[parallelism],
    )
    trainer.fit()
    with torch.no_grad():
        weights = {
            k: (v.full_tensor() if hasattr(v, 'full_tensor') else v).cpu() for k, v in student.state_dict().items()
        }
    return weights, check


@pytest.mark.parametrize('cached', [False, True])
@pytest.mark.parametrize('version', ['fsdp1', 'fsdp2'])
def test_a_sharded_teacher_trains_the_student_as_without_fsdp(version, cached):
    reference, unsharded = fit('none', cached)
    weights, check = fit(version, cached)
    assert unsharded.sharded is False and check.sharded is True
    assert check.difference <= 1e-5
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize('version', ['fsdp1', 'fsdp2'])
def test_a_student_distilled_from_a_stored_signal_trains_as_without_fsdp(version):
    reference = signal_weights(None)
    for name, value in signal_weights(CONFIGS[version]).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)
