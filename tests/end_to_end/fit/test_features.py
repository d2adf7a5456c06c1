"""Feature and attention distillation: hooks on named modules, projections, masks, and their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerClassifier, HuggingFaceModel
from conftest import N_CLASSES, N_FEATURES, AfterLossRecorder
from conftest import fit as fit_on
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from composer_kd import Distillation, FeaturePair
from composer_kd.parts.features import attention_map, attention_map_loss, attention_probs_mse, output_width


def mlp(width: int, activation: nn.Module, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(N_FEATURES, width), activation), nn.Linear(width, N_CLASSES))


def fit(student, algorithm, dataloader=None, max_duration='1ep', **kwargs) -> tuple[Trainer, AfterLossRecorder]:
    steps = AfterLossRecorder()
    trainer = fit_on(student, [algorithm], dataloader, max_duration, [steps], seed=3, **kwargs)
    return trainer, steps


@pytest.mark.parametrize('path', ['0.1', 'module.0.1'])
def test_nested_module_features_equal_the_formula(path):
    student_net, teacher = mlp(8, nn.ReLU(), seed=1), mlp(8, nn.Tanh(), seed=2)
    initial = [p.detach().clone() for p in student_net.parameters()]
    pair = FeaturePair(student=path, teacher='0.1', loss='mse', weight=0.5)
    algorithm = Distillation(teacher, org_loss_weight=1.0, kd_loss_weight=1.0, feature_pairs=[pair])
    _, steps = fit(ComposerClassifier(student_net, num_classes=N_CLASSES), algorithm, max_duration='1ba')
    assert not algorithm.projections  # same width: nothing to learn
    x, loss = steps.steps[0]['inputs'], steps.steps[0]['loss']
    student_features = torch.relu(F.linear(x, initial[0], initial[1]))
    expected = F.mse_loss(student_features, teacher[0](x))
    assert loss['feature_0'].item() == pytest.approx(expected.item(), rel=1e-5)
    total = loss['original'] + loss['kd'] + 0.5 * expected
    assert loss['total'].item() == pytest.approx(total.item(), rel=1e-5)


def test_width_mismatch_trains_a_projection_owned_by_the_algorithm(tmp_path):
    student_net, teacher = mlp(4, nn.ReLU(), seed=1), mlp(12, nn.ReLU(), seed=2)
    algorithm = Distillation(teacher, feature_pairs=[{'student': '0', 'teacher': '0', 'loss': 'cosine'}])
    student = ComposerClassifier(student_net, num_classes=N_CLASSES)
    trainer, steps = fit(student, algorithm, save_folder=str(tmp_path), save_filename='ck.pt')
    projection = algorithm.projections['0']
    assert projection.weight.shape == (12, 4)
    optimizer_params = {id(p) for group in trainer.state.optimizers[0].param_groups for p in group['params']}
    assert id(projection.weight) in optimizer_params
    assert not any(name.startswith('projections') for name in student.state_dict())
    assert all('feature_0' in s['loss'] for s in steps.steps)

    # The training checkpoint carries the projection (to resume), beside the student's own weights.
    checkpoint = torch.load(tmp_path / 'ck.pt', weights_only=False)['state']['model']
    torch.testing.assert_close(checkpoint['distillation_projections.0.weight'], projection.weight.detach())
    assert set(checkpoint) - {'distillation_projections.0.weight'} == set(student.state_dict())


def test_projection_resumes_exactly(tmp_path):
    def algorithm():
        return Distillation(mlp(12, nn.ReLU(), seed=2), feature_pairs=[FeaturePair('0', '0')])

    def student():
        return ComposerClassifier(mlp(4, nn.ReLU(), seed=1), num_classes=N_CLASSES)

    common = {'save_interval': '1ep', 'save_filename': 'ep{epoch}.pt', 'deterministic_mode': True}
    full_algorithm = algorithm()
    full, _ = fit(student(), full_algorithm, max_duration='2ep', save_folder=str(tmp_path / 'a'), **common)
    fit(student(), algorithm(), max_duration='1ep', save_folder=str(tmp_path / 'b'), **common)
    resumed_algorithm = algorithm()
    resumed, _ = fit(
        student(),
        resumed_algorithm,
        max_duration='2ep',
        save_folder=str(tmp_path / 'c'),
        load_path=str(tmp_path / 'b' / 'ep1.pt'),
        **common,
    )
    torch.testing.assert_close(resumed_algorithm.projections['0'].weight, full_algorithm.projections['0'].weight)
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)


def test_unknown_module_path_is_refused_before_training_with_nearest_names():
    student = ComposerClassifier(mlp(8, nn.ReLU(), seed=1), num_classes=N_CLASSES)
    before = [p.detach().clone() for p in student.parameters()]
    bad_student = Distillation(mlp(8, nn.ReLU(), seed=2), feature_pairs=[FeaturePair('0.2', '0.1')])
    with pytest.raises(ValueError, match=r"The student has no module '0.2'. Nearest existing names: \['0.1', '0.0'"):
        fit(student, bad_student)
    bad_teacher = Distillation(mlp(8, nn.ReLU(), seed=2), feature_pairs=[FeaturePair('0.1', 'encoder.layer.1')])
    with pytest.raises(ValueError, match="The teacher has no module 'encoder.layer.1'"):
        fit(student, bad_teacher)
    for p, q in zip(student.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_hooks_are_removed_when_the_fit_ends():
    student_net, teacher = mlp(8, nn.ReLU(), seed=1), mlp(8, nn.ReLU(), seed=2)
    fit(
        ComposerClassifier(student_net, num_classes=N_CLASSES),
        Distillation(teacher, feature_pairs=[FeaturePair('0', '0')]),
    )
    assert not student_net[0]._forward_hooks and not teacher[0]._forward_hooks


def bert(layers: int, hidden: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=30,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        output_attentions=True,
        attn_implementation='eager',
        initializer_range=0.5,
    )
    return BertForSequenceClassification(config)


def test_padding_changes_no_loss_term():
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    input_ids = torch.randint(1, 30, attention_mask.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    other_padding = input_ids.clone()
    other_padding[attention_mask == 0] = 7  # different tokens under the padding

    def run(ids):
        torch.manual_seed(0)
        teacher, student = bert(2, 32), HuggingFaceModel(bert(1, 16), use_logits=True)
        pairs = [
            FeaturePair('bert.encoder.layer.0', 'bert.encoder.layer.1', loss='mse'),
            FeaturePair(
                'bert.encoder.layer.0.attention.self', 'bert.encoder.layer.1.attention.self', 'attention_probs'
            ),
        ]
        batch = {'input_ids': ids, 'attention_mask': attention_mask, 'labels': labels}
        _, steps = fit(
            student,
            Distillation(teacher, feature_pairs=pairs),
            [batch],
            '1ba',
            device_train_microbatch_size=3,
            optimizers=torch.optim.SGD(student.parameters(), lr=0.0),
        )
        return steps.steps[0]['loss']

    a, b = run(input_ids), run(other_padding)
    assert set(a) == {'original', 'kd', 'feature_0', 'feature_1', 'total'}
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-5), key
    assert a['feature_0'].item() > 0 and a['feature_1'].item() > 0


def test_attention_map_loss_formula():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 7, 4, 4, generator=generator)

    def written_out(features):
        maps = features.pow(2).mean(1).reshape(2, -1)
        return maps / maps.norm(dim=1, keepdim=True)

    torch.testing.assert_close(attention_map(student), written_out(student))
    expected = (written_out(student) - written_out(teacher)).pow(2).sum(1).mean()
    assert attention_map_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_probs_mse_formula_with_mask_and_head_mismatch():
    generator = torch.Generator().manual_seed(5)
    student = torch.softmax(torch.randn(2, 2, 3, 3, generator=generator), -1)
    teacher = torch.softmax(torch.randn(2, 4, 3, 3, generator=generator), -1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    s, t = student.mean(1), teacher.mean(1)
    per_query = (s - t).pow(2).mean(-1)
    expected = per_query[mask].mean()
    assert attention_probs_mse(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_output_width_reads_common_blocks():
    assert output_width(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU())) == 5
    assert output_width(bert(1, 16).bert.encoder.layer[0]) == 16
    assert output_width(nn.ReLU()) is None


def test_feature_pair_validation():
    with pytest.raises(ValueError, match="loss 'l1' is unknown"):
        FeaturePair('a', 'b', loss='l1')
    with pytest.raises(TypeError, match=r'feature_pairs\[0\].*unexpected keyword'):
        Distillation(mlp(8, nn.ReLU(), 2), feature_pairs=[{'student': 'a', 'teacher': 'b', 'wieght': 1}])
    with pytest.raises(ValueError, match='teacher_index=1 but there are 1 teachers'):
        Distillation(mlp(8, nn.ReLU(), 2), feature_pairs=[FeaturePair('a', 'b', teacher_index=1)])
