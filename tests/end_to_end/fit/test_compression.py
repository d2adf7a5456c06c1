"""Quantization-aware training and pruning: each checked against the formula written out, in a Composer fit with
``Distillation``, through checkpoints, and at export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from conftest import N_CLASSES, N_FEATURES, Preempt, Preempted, make_dataloader, make_teacher
from conftest import fit as fit_on
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import composer_kd
from composer_kd import Distillation, KLDivergence, compression
from composer_kd.compression import (
    Pruning,
    QuantizationAwareTraining,
    calibrate,
    convert_to_int8,
    fake_quantizers,
    make_pruning_permanent,
    model_size_bytes,
    prepare_qat,
    prune_model,
    pruning_masks,
    quantization_backend,
    sparsity,
)
from composer_kd.recipes.data import load_digits_splits

DIGITS_INPUT = torch.zeros(1, 1, 8, 8)


pytestmark = pytest.mark.usefixtures('nondeterministic_algorithms_allowed')


def mlp_student(seed: int = 3, inputs: int = N_FEATURES, hidden: int = 16, classes: int = N_CLASSES):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return ComposerClassifier(nn.Sequential(*layers), num_classes=classes)


def fit(student, algorithms, max_duration='4ba', loader=None, callbacks=(), **kwargs) -> Trainer:
    loader = loader if loader is not None else make_dataloader(n=64)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    return fit_on(student, algorithms, loader, max_duration, callbacks, seed=5, optimizers=optimizer, **kwargs)


def linear(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


# --- quantization-aware training ------------------------------------------------------------------------------


def test_the_x86_quantized_engine_is_available():
    assert {'x86', 'fbgemm'} <= set(torch.backends.quantized.supported_engines)
    assert torch.backends.quantized.engine == 'x86'


def test_prepare_qat_copies_fuses_and_fake_quantizes_without_touching_the_model():
    student = mlp_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prepared = prepare_qat(student, torch.zeros(1, N_FEATURES))
    assert quantization_backend(prepared) == 'x86' and quantization_backend(student) is None
    assert type(student.module) is nn.Sequential and not hasattr(student.module[1], 'qconfig')
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not {id(p) for p in prepared.parameters()} & {id(p) for p in student.parameters()}
    # Linear + ReLU fused into one quantization-aware module; input, hidden and output activations and both
    # weights are fake-quantized.
    assert type(linear(prepared, 'module.1')).__name__ == 'LinearReLU'
    assert len(fake_quantizers(prepared)) == 5


def test_fake_quantized_forward_is_the_quantization_formula():
    """The prepared network computes, in floats, what the int8 kernels will: each tensor rounded to its grid."""
    prepared = prepare_qat(mlp_student(), torch.zeros(1, N_FEATURES))
    x = torch.randn(32, N_FEATURES)
    prepared.module(x)  # observers set the ranges
    prepared.eval()
    for fq in fake_quantizers(prepared):
        fq.disable_observer()
    network = prepared.module

    def fake_quant(t, fq, axis=None):
        scale, zero = fq.scale, fq.zero_point.float()
        if axis is not None:  # per output channel
            scale, zero = scale.view(-1, 1), zero.view(-1, 1)
        q = torch.clamp(torch.round(t / scale) + zero, fq.quant_min, fq.quant_max)
        return (q - zero) * scale

    first, last = network.get_submodule('1'), network.get_submodule('3')
    h = fake_quant(x, network.activation_post_process_0)
    h = fake_quant(F.relu(F.linear(h, fake_quant(first.weight, first.weight_fake_quant, 0), first.bias)),
                   network.activation_post_process_1)  # fmt: skip
    expected = fake_quant(F.linear(h, fake_quant(last.weight, last.weight_fake_quant, 0), last.bias),
                          network.activation_post_process_2)  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(network(x), expected, atol=1e-6)
    # The x86 configuration: uint8 activations on 7 bits (reduce_range), int8 per-channel symmetric weights.
    assert (network.activation_post_process_0.quant_min, network.activation_post_process_0.quant_max) == (0, 127)
    assert (first.weight_fake_quant.quant_min, first.weight_fake_quant.quant_max) == (-128, 127)
    assert first.weight_fake_quant.qscheme == torch.per_channel_symmetric


@pytest.fixture(scope='module')
def qat_digits():
    """A QAT student distilled on the digits for 60 batches, its test images, and the teacher it learnt from."""
    torch.set_num_threads(1)
    splits = load_digits_splits()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(ComposerClassifier(teacher, num_classes=10), [], max_duration='3ep', loader=loader)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp_student(inputs=64, hidden=32, classes=10)
    fit(
        student,
        [QuantizationAwareTraining(DIGITS_INPUT), Distillation(teacher, KLDivergence(temperature=4.0), 0.1, 0.9)],
        max_duration='60ba',
        loader=loader,
    )
    return student, splits.test.tensors[0], teacher, teacher_state


def test_int8_model_matches_its_fake_quantized_predictions(qat_digits):
    """Given the same ranges, the int8 model is the fake-quantized one up to requantization rounding.

    Tolerance: every logit within 2 steps of the output grid (its scale), and at least 99% of argmaxes equal
    (a flip needs two logits within those steps). The ranges are calibrated on the images compared, so every
    activation lies in its range: outside it, fake quantization clamps to the 7-bit range of the x86
    configuration while the int8 kernels do not (docs/compression.md measures that on held-out images).
    """
    student, images, _, _ = qat_digits
    calibrated = calibrate(student, [images])
    int8 = convert_to_int8(calibrated)
    with torch.no_grad():
        fake, real = calibrated.module(images), int8.module(images)
    step = float(calibrated.module.activation_post_process_2.scale)
    assert real.dtype == torch.float32 and real.shape == (len(images), 10)
    assert (real - fake).abs().max() <= 2 * step + 1e-6
    assert (real.argmax(1) == fake.argmax(1)).float().mean() >= 0.99
    assert isinstance(int8, ComposerClassifier) and not int8.training
    assert len([m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]) == 2
    # The int8 weights are the float weights rounded on the grid their observer chose: round(w / scale) per output
    # channel, within [-128, 127].
    first = calibrated.module.get_submodule('1')
    scale, zero_point = first.weight_fake_quant.calculate_qparams()
    ratio = first.weight.detach() / scale.view(-1, 1)
    expected = torch.clamp(torch.round(ratio), -128, 127)
    int8_weight = int8.module.get_submodule('1').weight()
    off = (int8_weight.int_repr().float() - expected).abs()
    # Halves (the largest weight of a row lands on -127.5 of the symmetric grid) may round either way, and which
    # side of the half a float32 division lands on is itself a rounding matter.
    halves = ((ratio.abs() % 1) - 0.5).abs() < 1e-3
    assert torch.all(off[~halves] == 0) and torch.all(off <= 1)
    assert torch.all(zero_point == 0) and torch.allclose(int8_weight.q_per_channel_scales().float(), scale)


def test_converted_model_is_smaller_and_its_state_dict_round_trips(qat_digits, tmp_path):
    student, images, _, _ = qat_digits
    int8 = convert_to_int8(student)
    float_student = mlp_student(inputs=64, hidden=32, classes=10)
    assert model_size_bytes(int8) < model_size_bytes(float_student)
    torch.save(int8.state_dict(), tmp_path / 'int8.pt')
    # Another int8 model of the architecture, with other ranges and weights, takes the saved state exactly.
    other = prepare_qat(mlp_student(seed=9, inputs=64, hidden=32, classes=10), DIGITS_INPUT)
    other.module(torch.rand(16, 1, 8, 8) * 3)
    other = convert_to_int8(other)
    other.load_state_dict(torch.load(tmp_path / 'int8.pt'))
    with torch.no_grad():
        assert torch.equal(other.module(images), int8.module(images))


def test_qat_in_a_distillation_fit_leaves_the_teacher_alone(qat_digits):
    student, _, teacher, teacher_state = qat_digits
    assert quantization_backend(student) == 'x86'
    assert not any(isinstance(m, FakeQuantizeBase) for m in teacher.modules())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert type(teacher[1]) is nn.Linear and all(p.requires_grad for p in teacher.parameters())


def test_qat_trains_the_parameters_the_optimizer_was_built_with():
    student = mlp_student()
    weight = student.module[1].weight
    start = weight.detach().clone()
    trainer = fit(student, [QuantizationAwareTraining(torch.zeros(1, N_FEATURES))])
    assert linear(student, 'module.1').weight is weight and not torch.equal(weight.detach(), start)
    assert {id(p) for g in trainer.state.optimizers[0].param_groups for p in g['params']} == {
        id(p) for p in student.parameters()
    }


class RecordQuantizers(Callback):
    """The scales and observer switches of every fake quantizer after each batch."""

    def __init__(self):
        self.scales, self.enabled = [], []

    def batch_end(self, state, logger):
        self.scales.append([fq.scale.clone() for fq in fake_quantizers(state.model)])
        self.enabled.append([int(fq.observer_enabled[0]) for fq in fake_quantizers(state.model)])


def test_observers_are_paused_while_evaluating():
    student = mlp_student()
    far = TensorDataset(100 * torch.randn(32, N_FEATURES), torch.randint(0, N_CLASSES, (32,)))
    trainer = fit(
        student,
        [QuantizationAwareTraining(torch.zeros(1, N_FEATURES))],
        eval_dataloader=DataLoader(far, batch_size=8),
        eval_interval='2ba',
    )
    ranges = [fq.activation_post_process.max_val.clone() for fq in fake_quantizers(student)]
    trainer.eval()  # inputs a hundred times larger than any seen in training
    assert all(
        torch.equal(fq.activation_post_process.max_val, r)
        for fq, r in zip(fake_quantizers(student), ranges, strict=True)
    )
    assert all(int(fq.observer_enabled[0]) == 1 for fq in fake_quantizers(student))
    assert float(student.module.activation_post_process_0.activation_post_process.max_val) < 10


def test_freeze_observers_fixes_the_ranges_from_then_on():
    record = RecordQuantizers()
    fit(mlp_student(), [QuantizationAwareTraining(torch.zeros(1, N_FEATURES), freeze_observers='2ba')],
        max_duration='6ba', callbacks=[record])  # fmt: skip
    assert record.enabled[0] == [1] * 5 and record.enabled[2:] == [[0] * 5] * 4
    # Batches 3 to 6 ran after the freeze: their scales are those left by batch 2.
    for later in record.scales[2:]:
        assert all(torch.equal(a, b) for a, b in zip(later, record.scales[1], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(record.scales[1], record.scales[0], strict=True))


@pytest.fixture
def deterministic():
    """Composer's deterministic_mode switches PyTorch's deterministic algorithms on for the process; switch them
    back off, since PyTorch's int8 kernels have no deterministic version and later tests run them."""
    yield
    torch.use_deterministic_algorithms(False)


def train_with_checkpoints(
    folder, algorithms, max_duration, load_path=None, save_interval='1ep', save_filename='ep{epoch}.pt', callbacks=()
) -> Trainer:
    student = mlp_student()
    trainer = Trainer(
        model=student,
        train_dataloader=make_dataloader(n=32),
        max_duration=max_duration,
        optimizers=torch.optim.Adam(student.parameters(), lr=0.01),
        algorithms=algorithms,
        save_folder=str(folder),
        save_filename=save_filename,
        save_interval=save_interval,
        load_path=load_path,
        callbacks=list(callbacks),
        progress_bar=False,
        device='cpu',
        seed=5,
        deterministic_mode=True,
    )
    trainer.fit()
    trainer.close()
    return trainer


def first_part(folder, algorithms, stop) -> str:
    """Train the first part of a 2-epoch run (4 batches an epoch): to the end of epoch 1 (``stop='ep1'``, a 1-epoch
    run), or preempted as batch ``stop`` starts, after the checkpoint written there; the checkpoint's path."""
    if stop == 'ep1':
        train_with_checkpoints(folder, algorithms, '1ep')
        return str(folder / 'ep1.pt')
    with pytest.raises(Preempted):
        train_with_checkpoints(
            folder,
            algorithms,
            '2ep',
            save_interval=f'{stop}ba',
            save_filename='ba{batch}.pt',
            callbacks=[Preempt(stop)],
        )
    return str(folder / f'ba{stop}.pt')


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Bitwise: weights, masks, observers' statistics, scales and zero points."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize('stop', [3, 'ep1'], ids=['mid-epoch', 'epoch-end'])
def test_qat_checkpoint_resumes_weights_and_observers(tmp_path, deterministic, stop):
    def algorithms():
        return [QuantizationAwareTraining(torch.zeros(1, N_FEATURES)), Distillation(make_teacher())]

    full = train_with_checkpoints(tmp_path / 'full', algorithms(), '2ep')
    checkpoint = first_part(tmp_path / 'first', algorithms(), stop)
    saved = torch.load(checkpoint, weights_only=False)['state']['model']
    assert any(key.endswith('activation_post_process.max_val') for key in saved)
    assert any(key.endswith('.scale') for key in saved)
    assert not torch.equal(saved['module.activation_post_process_0.scale'], torch.ones(1))  # observed, not initial
    resumed = train_with_checkpoints(tmp_path / 'second', algorithms(), '2ep', load_path=checkpoint)
    assert int(resumed.state.timestamp.batch) == 8
    assert_same_state(resumed.state.model, full.state.model)


def test_qat_refusals_name_the_problem():
    student = mlp_student()
    with pytest.raises(ValueError, match='backend must be one of'):
        prepare_qat(student, torch.zeros(1, N_FEATURES), backend='avx')
    with pytest.raises(ValueError, match='backend must be one of'):
        QuantizationAwareTraining(torch.zeros(1, N_FEATURES), backend='x64')
    with pytest.raises(ValueError, match='not prepared'):
        convert_to_int8(student)
    with pytest.raises(ValueError, match='already prepared'):
        prepare_qat(prepare_qat(student, torch.zeros(1, N_FEATURES)), torch.zeros(1, N_FEATURES))
    with pytest.raises(ValueError, match='before pruning'):
        prepare_qat(prune_model(student, 0.5), torch.zeros(1, N_FEATURES))
    with pytest.raises(ValueError, match='freeze_observers'):
        QuantizationAwareTraining(torch.zeros(1, N_FEATURES), freeze_observers='soon')

    from composer.models import HuggingFaceModel

    with pytest.raises(TypeError, match='ComposerClassifier'):
        prepare_qat(HuggingFaceModel.__new__(HuggingFaceModel), torch.zeros(1, 4))


# --- pruning -------------------------------------------------------------------------------------------------


def test_unstructured_pruning_zeroes_the_smallest_weights_of_each_chosen_layer():
    student = mlp_student(hidden=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pruned = prune_model(student, amount=0.75)
    weight = student.module[1].weight.detach()
    k = round(0.75 * weight.numel())
    smallest = torch.zeros(weight.numel(), dtype=torch.bool)
    smallest[weight.abs().flatten().argsort()[:k]] = True
    assert torch.equal(pruned.module[1].weight_mask == 0, smallest.view_as(weight))
    assert torch.equal(pruned.module[1].weight, weight * ~smallest.view_as(weight))
    # The default leaves the classifier dense, and the original model is untouched.
    assert set(pruning_masks(pruned)) == {'module.1.weight'}
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not prune.is_pruned(student)


def test_structured_pruning_removes_whole_units_with_their_bias():
    student = mlp_student(hidden=32)
    pruned = prune_model(student, amount=0.25, structured=True)
    weight = student.module[1].weight.detach()
    weakest = weight.norm(dim=1).argsort()[:8]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[weakest] = True
    layer = pruned.module[1]
    assert torch.equal(layer.weight_mask.sum(dim=1) == 0, dead) and torch.all(layer.weight_mask[~dead] == 1)
    assert torch.equal(layer.bias_mask == 0, dead) and torch.all(layer.bias[dead] == 0)
    with torch.no_grad():
        hidden = pruned.module[2](layer(torch.randn(5, N_FEATURES)))
    assert torch.all(hidden[:, dead] == 0)


def test_pruning_again_only_raises_the_share_and_keeps_what_was_pruned():
    once = prune_model(mlp_student(hidden=32), amount=0.5)
    twice = prune_model(once, amount=0.8)
    assert sparsity(twice, ['module.1']) == pytest.approx(round(0.8 * 32 * N_FEATURES) / (32 * N_FEATURES))
    assert torch.all(twice.module[1].weight_mask[once.module[1].weight_mask == 0] == 0)
    assert torch.equal(prune_model(twice, amount=0.3).module[1].weight_mask, twice.module[1].weight_mask)


class RecordEffectiveWeights(Callback):
    """After each optimizer step, what the pruned layer computes on a probe, against ``weight_orig * mask``."""

    def __init__(self, path: str):
        self.path, self.records = path, []
        self.probe = torch.randn(7, N_FEATURES)

    def batch_end(self, state, logger):
        layer = state.model.get_submodule(self.path)
        if not hasattr(layer, 'weight_mask'):
            return
        with torch.no_grad():
            out = layer(self.probe)  # the pre-forward hook applies the mask
            expected = F.linear(self.probe, layer.weight_orig * layer.weight_mask, layer.bias)
        self.records.append(
            (
                layer.weight_mask.clone(),
                layer.weight.detach().clone(),
                layer.weight_orig.detach().clone(),
                out,
                expected,
            )
        )


def test_masks_hold_through_optimizer_steps_in_a_distillation_fit():
    teacher = make_teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    record = RecordEffectiveWeights('module.1')
    student = mlp_student(hidden=32)
    # Pruned after two dense Adam steps: the optimizer's momentum keeps moving the pruned entries of weight_orig.
    fit(student, [Pruning(amount=0.5, start='2ba'), Distillation(teacher)], max_duration='8ba', callbacks=[record])
    # Reparametrized from the start (all-ones masks), pruned at the start of batch 3.
    assert len(record.records) == 8 and all(torch.all(r[0] == 1) for r in record.records[:2])
    pruned = record.records[2:]
    first_mask = pruned[0][0]
    assert float((first_mask == 0).float().mean()) == 0.5
    for mask, weight, _, out, expected in record.records:
        assert torch.equal(mask, first_mask) or torch.all(mask == 1)
        assert torch.all(weight[mask == 0] == 0)
        assert torch.allclose(out, expected, atol=1e-6)
    origs = [orig for _, _, orig, _, _ in pruned]
    assert not torch.equal(origs[0][first_mask == 0], origs[-1][first_mask == 0])  # moved, yet never used
    assert not torch.equal(origs[0][first_mask == 1], origs[-1][first_mask == 1])  # still trained
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not prune.is_pruned(teacher)


def test_gradual_pruning_follows_the_cubic_schedule():
    class RecordSparsity(Callback):
        def __init__(self):
            self.values = []

        def after_forward(self, state, logger):
            self.values.append(sparsity(state.model, ['module.1']))

    record = RecordSparsity()
    fit(mlp_student(hidden=32), [Pruning(amount=0.75, start='2ba', end='6ba')], max_duration='8ba',
        callbacks=[record])  # fmt: skip
    n = 32 * N_FEATURES
    expected = []
    for batch in range(8):
        progress = min(max((batch - 2) / 4, 0.0), 1.0)
        expected.append(round(0.75 * (1 - (1 - progress) ** 3) * n) / n)
    assert record.values == pytest.approx(expected)


def test_export_makes_pruning_permanent():
    student = mlp_student(hidden=32)
    fit(student, [Pruning(amount=0.6, structured=False, modules=['module.1', 'module.3'])])
    masks = {k: v.clone() for k, v in pruning_masks(student).items()}
    exported = make_pruning_permanent(student)
    keys = exported.state_dict().keys()
    assert not [k for k in keys if k.endswith(('_orig', '_mask'))] and not prune.is_pruned(exported)
    for path in ('module.1', 'module.3'):
        weight = exported.get_submodule(path).weight
        assert isinstance(weight, nn.Parameter)
        assert torch.equal(weight == 0, masks[f'{path}.weight'] == 0)
    # A fresh, never pruned model of the architecture takes the exported weights as they are.
    fresh = mlp_student(seed=11, hidden=32)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    x = torch.randn(9, N_FEATURES)
    with torch.no_grad():
        assert torch.allclose(fresh.module(x), student.module(x), atol=1e-6)
    assert prune.is_pruned(student)  # the trained model keeps its masks to train on
    assert model_size_bytes(exported) < model_size_bytes(student)


@pytest.mark.parametrize(
    ('stop', 'pruned'),
    [(1, (0.0, 0.0)), (3, (0.0, 0.5)), ('ep1', (0.0, 0.5))],
    ids=['before-the-schedule', 'mid-epoch', 'epoch-end'],
)
def test_pruning_checkpoint_resumes_with_its_masks(tmp_path, deterministic, stop, pruned):
    def algorithms():
        # Pruned at the start of batches 1 to 6; the checkpoint at batch 1 is written before the first.
        return [Pruning(amount=0.5, start='1ba', end='6ba'), Distillation(make_teacher())]

    full = train_with_checkpoints(tmp_path / 'full', algorithms(), '2ep')
    checkpoint = first_part(tmp_path / 'first', algorithms(), stop)
    saved = torch.load(checkpoint, weights_only=False)['state']['model']
    # One layout for the whole run, all-ones masks before the schedule starts.
    assert set(saved) == {
        'module.1.weight_orig',
        'module.1.weight_mask',
        'module.1.bias',
        'module.3.weight',
        'module.3.bias',
    }
    low, high = pruned
    share = float((saved['module.1.weight_mask'] == 0).float().mean())
    assert share == 0.0 if high == 0.0 else low < share < high  # none yet, or half way through the schedule
    resumed = train_with_checkpoints(tmp_path / 'second', algorithms(), '2ep', load_path=checkpoint)
    assert_same_state(resumed.state.model, full.state.model)
    assert sparsity(resumed.state.model, ['module.1']) == 0.5


def test_pruning_refusals_name_the_argument():
    student = mlp_student()
    with pytest.raises(ValueError, match=r"modules\[1\]: the model has no module 'modul.1'; did you mean 'module.1'"):
        prune_model(student, 0.5, modules=['module.1', 'modul.1'])
    with pytest.raises(ValueError, match=r"modules\[0\]: 'module.2' is a ReLU"):
        prune_model(student, 0.5, modules=['module.2'])
    for amount in (1.0, -0.1, True, '0.5'):
        with pytest.raises(ValueError, match='amount must be a fraction'):
            Pruning(amount=amount)
    with pytest.raises(ValueError, match='must come after'):
        Pruning(amount=0.5, start='4ba', end='2ba')
    with pytest.raises(ValueError, match='modules: by default'):
        prune_model(ComposerClassifier(nn.Linear(N_FEATURES, N_CLASSES), num_classes=N_CLASSES), 0.5)
    with pytest.raises(ValueError, match=r'modules\[0\]'):
        fit(mlp_student(), [Pruning(0.5, modules=['module.7'])])


# --- both, and the package's surface -------------------------------------------------------------------------


def test_pruned_quantization_aware_student_converts_with_its_zeros():
    student = mlp_student(hidden=32)
    fit(student, [QuantizationAwareTraining(torch.zeros(1, N_FEATURES)), Pruning(amount=0.5)], max_duration='6ba')
    mask = student.module.get_submodule('1').weight_mask.clone()
    int8 = convert_to_int8(student)
    weight = int8.module.get_submodule('1').weight()
    assert torch.all(weight.int_repr()[mask == 0] == 0) and int((weight.int_repr() != 0).sum()) > 0
    assert prune.is_pruned(student)
    with pytest.raises(ValueError, match='list QuantizationAwareTraining before Pruning'):
        fit(mlp_student(), [Pruning(amount=0.5), QuantizationAwareTraining(torch.zeros(1, N_FEATURES))])


def test_copy_model_copies_a_pruned_model_in_the_middle_of_training():
    student = prune_model(mlp_student(), 0.5)
    student.module(torch.randn(2, N_FEATURES)).sum().backward()  # the layer's weight now has a graph
    twin = compression.copy_model(student)
    assert torch.equal(twin.module[1].weight, student.module[1].weight)
    assert twin.module[1].weight_orig is not student.module[1].weight_orig


def test_the_package_exports_the_compression_api():
    for name in ('Pruning', 'QuantizationAwareTraining', 'prepare_qat', 'convert_to_int8', 'prune_model',
                 'make_pruning_permanent', 'model_size_bytes'):  # fmt: skip
        assert getattr(composer_kd, name) is getattr(compression, name)
