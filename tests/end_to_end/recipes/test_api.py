"""``distill()``: its report against separate evaluations, equivalence with a hand-built Trainer, named errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import DataSpec
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, DistillationTask, KLDivergence, MultiTaskClassifier, distill
from composer_kd.recipes.data import digits_multitask, load_digits_splits
from composer_kd.run.reporting import distillation_ratio, format_summary

SEED = 5


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def digits():
    return load_digits_splits()


def trained_teacher(data: TensorDataset, classes: int = 10, steps: int = 60) -> nn.Module:
    """An MLP fitted by plain full-batch Adam: a teacher better than a linear student."""
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    x, y = data.tensors
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher


@pytest.fixture(scope='module')
def teacher(digits):
    return trained_teacher(digits.train)


def linear_student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def test_report_numbers_match_a_separate_evaluation(digits, teacher):
    student = linear_student()
    initial = copy.deepcopy(student)
    returned, report = distill(
        teacher,
        student,
        digits.train,
        {'val': digits.val, 'test': digits.test},
        max_duration='2ep',
        lr=0.01,
        temperature=2.0,
        org_loss_weight=0.5,
        kd_loss_weight=0.5,
        baseline=True,
        device='cpu',
        seed=SEED,
    )
    assert returned is student  # trained in place
    assert not torch.equal(student[1].weight, initial[1].weight)
    assert [m.role for m in report.models] == ['teacher 0', 'student (distilled)', 'student alone']
    assert (report.recipe, report.split, report.metric) == ('distill()', 'val', 'MulticlassAccuracy')
    by_role = {m.role: m for m in report.models}
    for split, data in (('val', digits.val), ('test', digits.test)):
        assert by_role['teacher 0'].metrics[split]['MulticlassAccuracy'] == pytest.approx(accuracy(teacher, data))
        assert by_role['student (distilled)'].metrics[split]['MulticlassAccuracy'] == pytest.approx(
            accuracy(student, data)
        )
    assert by_role['teacher 0'].parameters == 64 * 64 + 64 + 64 * 10 + 10
    assert by_role['student (distilled)'].parameters == by_role['student alone'].parameters == 64 * 10 + 10
    values = {role: m.metrics['val']['MulticlassAccuracy'] for role, m in by_role.items()}
    expected_ratio = distillation_ratio(values['teacher 0'], values['student alone'], values['student (distilled)'])
    assert report.ratio == pytest.approx(expected_ratio)
    speed = report.inference
    assert report.speedup == pytest.approx(speed['teacher_us_per_example'] / speed['student_us_per_example'])
    trained = [m.train_seconds for m in report.models if m.train_seconds is not None]
    assert len(trained) == 2 and report.wall_seconds > sum(trained)
    printed = format_summary(report)
    assert printed.startswith('Summary of distill()') and str(report) == printed
    assert f'{100 * values["student (distilled)"]:.2f}%' in printed and f'{report.speedup:.1f}x' in printed


def test_the_student_alone_is_the_same_start_trained_without_the_teacher(digits, teacher):
    # The baseline of distill() is a separate run: reproduce it with kd_loss_weight=0 (the teacher's term off).
    _, report = distill(
        teacher, linear_student(), digits.train, digits.val, max_duration='1ep', baseline=True, device='cpu'
    )
    alone, _ = distill(teacher, linear_student(), digits.train, max_duration='1ep', kd_loss_weight=0.0, device='cpu')
    alone_accuracy = next(m for m in report.models if m.role == 'student alone').metrics['eval']['MulticlassAccuracy']
    assert alone_accuracy == pytest.approx(accuracy(alone, digits.val))


def hand_built(teacher, student, loader, optimizer, **distillation) -> Trainer:
    trainer = Trainer(
        model=student,
        train_dataloader=loader,
        max_duration='2ep',
        optimizers=optimizer,
        algorithms=[Distillation(teacher, **distillation)],
        device='cpu',
        seed=SEED,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


def test_same_final_weights_as_a_hand_built_trainer_with_distillation(digits, teacher):
    loader = DataLoader(digits.train, batch_size=64, sampler=dist.get_sampler(digits.train, shuffle=True, seed=SEED))
    by_hand = ComposerClassifier(linear_student(), num_classes=10)
    through_api = copy.deepcopy(by_hand)
    hand_built(
        teacher,
        by_hand,
        loader,
        torch.optim.Adam(by_hand.parameters(), lr=0.02),
        kd_loss_fn=KLDivergence(temperature=3.0),
        org_loss_weight=0.3,
        kd_loss_weight=0.7,
    )
    distill(
        teacher,
        through_api,
        loader,
        max_duration='2ep',
        lr=0.02,
        temperature=3.0,
        org_loss_weight=0.3,
        kd_loss_weight=0.7,
        device='cpu',
        seed=SEED,
    )
    for (name, expected), (_, actual) in zip(by_hand.named_parameters(), through_api.named_parameters(), strict=True):
        assert torch.equal(expected, actual), name


def test_a_plain_module_and_a_dataset_train_as_a_hand_built_classifier_would(digits, teacher):
    by_hand = linear_student()
    through_api = copy.deepcopy(by_hand)
    loader = DataLoader(digits.train, batch_size=32, sampler=dist.get_sampler(digits.train, shuffle=True, seed=SEED))
    model = ComposerClassifier(by_hand, num_classes=10)
    hand_built(teacher, model, loader, torch.optim.Adam(model.parameters(), lr=1e-3))
    distill(teacher, through_api, digits.train, max_duration='2ep', device='cpu', seed=SEED)
    # distill() wraps the module with a loss that skips hidden labels: the same value, summed in another order.
    for expected, actual in zip(by_hand.parameters(), through_api.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_teacher_is_given_back_exactly_as_it_was(digits):
    teacher = trained_teacher(digits.train, steps=5)
    teacher.insert(2, nn.Dropout(0.3))
    teacher.train()
    teacher[3].eval()  # mixed modes, and one parameter frozen by the user
    teacher[1].bias.requires_grad_(False)
    weights = copy.deepcopy(teacher.state_dict())
    modes = [m.training for m in teacher.modules()]
    flags = [p.requires_grad for p in teacher.parameters()]
    distill(teacher, linear_student(), digits.train, digits.val, max_duration='4ba', baseline=True, device='cpu')
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())
    assert [m.training for m in teacher.modules()] == modes
    assert [p.requires_grad for p in teacher.parameters()] == flags


def test_composer_model_and_data_spec_forms(digits, teacher):
    composer_teacher = ComposerClassifier(teacher, num_classes=10)
    student = ComposerClassifier(linear_student(), num_classes=10)
    spec = DataSpec(DataLoader(digits.train, batch_size=64))
    returned, report = distill(composer_teacher, student, spec, digits.val, max_duration='3ba', device='cpu')
    assert returned is student
    assert report.models[0].description == 'ComposerClassifier(Sequential)'
    assert report.models[0].metrics['eval']['MulticlassAccuracy'] == pytest.approx(accuracy(teacher, digits.val))


def test_a_hugging_face_student_and_teacher(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from composer_kd.recipes.data import synthetic_text_classification

    def bert(width: int, seed: int) -> BertForSequenceClassification:
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=40,
            hidden_size=width,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=16,
            num_labels=3,
        )
        return BertForSequenceClassification(config)

    train = synthetic_text_classification(32, vocab_size=40, seq_len=12, n_classes=3, keywords_per_class=4)
    val = synthetic_text_classification(16, vocab_size=40, seq_len=12, n_classes=3, keywords_per_class=4, seed=1)
    student = bert(16, 1)
    returned, report = distill(bert(32, 0), student, train, val, max_duration='2ba', batch_size=16, device='cpu')
    assert returned is student
    assert [m.description for m in report.models] == ['BertForSequenceClassification'] * 2
    assert 0.0 <= report.value('student (distilled)') <= 1.0 and report.speedup is not None


def test_multi_task_distillation_in_one_call(digits):
    tasks = ['digit', 'parity']
    train, val = digits_multitask(digits.train, tasks), digits_multitask(digits.val, tasks)
    teachers = {'digit': trained_teacher(digits.train), 'parity': trained_teacher(digits.train, classes=2, steps=0)}
    parity_x, parity_y = train.inputs, train.labels['parity']
    optimizer = torch.optim.Adam(teachers['parity'].parameters(), lr=0.01)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(teachers['parity'](parity_x), parity_y).backward()
        optimizer.step()
    torch.manual_seed(2)
    student = MultiTaskClassifier(nn.Flatten(), {'digit': nn.Linear(64, 10), 'parity': nn.Linear(64, 2)})
    _, report = distill(
        None,
        student,
        train,
        {'val': val},
        tasks=[
            DistillationTask('digit', teachers['digit'], kd_loss_weight=0.5, temperature=2.0),
            {'name': 'parity', 'teachers': teachers['parity'], 'kd_loss_weight': 0.25},
        ],
        org_loss_weight=0.5,
        temperature=3.0,  # the default of tasks that set none
        max_duration='2ep',
        lr=0.01,
        baseline=True,
        device='cpu',
    )
    assert [m.role for m in report.models] == ['teacher 0', 'teacher 1', 'student (distilled)', 'student alone']
    assert [m.description for m in report.models[:2]] == ['Sequential for task digit', 'Sequential for task parity']
    # Each teacher is evaluated on its own task's labels; the student on every task.
    x = val.inputs
    for i, task in enumerate(tasks):
        expected = (teachers[task](x).argmax(1) == val.labels[task]).float().mean().item()
        assert report.models[i].metrics['val'] == {f'accuracy/{task}': pytest.approx(expected)}
        with torch.no_grad():
            predicted = student({'inputs': x})[task].argmax(1)
        distilled = report.models[2].metrics['val'][f'accuracy/{task}']
        assert distilled == pytest.approx((predicted == val.labels[task]).float().mean().item())
    assert set(report.ratios) == {'accuracy/digit', 'accuracy/parity'}  # each teacher beats the student alone
    for metric, ratio in report.ratios.items():
        values = [report.value(role, metric) for role in ('teacher', 'student alone', 'student (distilled)')]
        teacher_value = report.value(f'teacher {tasks.index(metric.split("/")[1])}', metric)
        assert ratio == pytest.approx(distillation_ratio(teacher_value, values[1], values[2]))
    assert report.metric == 'accuracy/digit'


def bad_width_teacher() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))


def teachers_the_second_of_which_takes_other_inputs() -> list[nn.Module]:
    return [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), nn.Sequential(nn.Flatten(), nn.Linear(32, 10))]


@pytest.mark.parametrize(
    'change, error, message',
    [
        ({'teacher': 'teacher.pt'}, TypeError, 'teacher: teachers must be an nn.Module'),
        ({'student': 3}, TypeError, 'student must be an nn.Module, a ComposerModel'),
        ({'train_data': 5}, TypeError, 'train_data must be a map-style dataset'),
        ({'eval_data': {'val': 5}}, TypeError, "eval_data['val'] must be a map-style dataset"),
        ({'max_duration': '3xx'}, ValueError, 'max_duration: Invalid time string'),
        ({'lr': -1.0}, ValueError, 'lr must be a number > 0'),
        ({'optimizer': 'Adamm'}, ValueError, "optimizer: unknown optimizer 'Adamm'"),
        ({'kd_loss': 'kld'}, ValueError, "kd_loss: unknown loss 'kld'; did you mean 'kl'?"),
        ({'device': 'cuda'}, ValueError, "device: unknown value 'cuda'"),
        ({'precision': 'fp64'}, ValueError, "precision: unknown value 'fp64'"),
        ({'temprature': 2.0}, TypeError, "unexpected keyword argument 'temprature'; did you mean 'temperature'?"),
        ({'kd_loss_fn': KLDivergence()}, TypeError, "distill() sets 'kd_loss_fn' itself: pass the loss as kd_loss="),
        ({'num_classes': 7}, ValueError, 'num_classes=7 but the student returns 10 logits per example'),
        ({'teacher': bad_width_teacher()}, ValueError, 'teacher 0 returns 5 logits per example but the student 10'),
        (
            {'teacher': teachers_the_second_of_which_takes_other_inputs()},
            RuntimeError,
            'teachers[1] (Sequential) failed on the batch it was given, '
            '[Tensor[32, 1, 8, 8] float32, Tensor[32] int64], with input_key=None',
        ),
        (
            {'search': {'kd_loss': ['kl']}, 'teacher_cache': object()},
            ValueError,
            'search cannot be combined with teacher_cache: each candidate trains a student of its own.',
        ),
        ({'temperature': -1.0}, ValueError, 'temperature must be > 0, got -1.0'),
        ({'n_teachers_to_sample': 3}, ValueError, 'n_teachers_to_sample must be an integer between 1 and'),
        ({'baseline': 'yes'}, TypeError, "baseline must be True or False, got 'yes'"),
        ({'trainer_kwargs': {'seed': 1}}, TypeError, "trainer_kwargs: 'seed' is set by distill(); pass it as seed="),
        ({'trainer_kwargs': {'sead': 1}}, TypeError, "trainer_kwargs: Trainer has no argument 'sead'"),
        ({'algorithms': [nn.Linear(1, 1)]}, TypeError, 'algorithms[0] must be a Composer Algorithm, got Linear'),
        ({'tasks': [{'name': 'digit', 'teachers': None}]}, ValueError, 'teacher: with tasks=, each task names'),
    ],
)
def test_bad_input_is_refused_by_name_before_any_weight_changes(digits, teacher, change, error, message):
    student = linear_student()
    before = copy.deepcopy(student.state_dict())
    arguments = {'teacher': teacher, 'student': student, 'train_data': digits.train, 'eval_data': digits.val}
    arguments.update({'max_duration': '1ba', 'device': 'cpu', **change})
    with pytest.raises(error) as info:
        distill(**arguments)
    assert message in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_structural_misuse_is_named(digits, teacher):
    student = linear_student()
    with pytest.raises(ValueError, match=r'teachers\[0\] shares parameters with the student'):
        distill(student, student, digits.train)
    with pytest.raises(ValueError, match='algorithms: distill\\(\\) adds its own Distillation; use tasks='):
        distill(teacher, student, digits.train, algorithms=[Distillation(teacher)])
    dict_batches = digits_multitask(digits.train, ['digit'])
    with pytest.raises(TypeError, match=r'train_data: a plain nn.Module is trained as a classifier on \(inputs'):
        distill(teacher, student, dict_batches)
    with pytest.raises(TypeError, match='student: with tasks=, the student must be a ComposerModel'):
        distill(None, student, dict_batches, tasks=[{'name': 'digit', 'teachers': teacher}])
    with pytest.raises(TypeError, match='student_logits_key: with tasks=, each task sets its own'):
        distill(None, student, dict_batches, tasks=[{'name': 'digit', 'teachers': teacher}], student_logits_key='a')


def test_task_defaults_come_from_distill_s_own_loss_and_temperature(digits):
    from composer import Callback

    class AlgorithmsSeen(Callback):
        def fit_start(self, state, logger):
            self.distillations = [a for a in state.algorithms if isinstance(a, Distillation)]

    seen = AlgorithmsSeen()
    data = digits_multitask(digits.train, ['digit', 'parity'])
    student = MultiTaskClassifier(nn.Flatten(), {'digit': nn.Linear(64, 10), 'parity': nn.Linear(64, 2)})
    tasks = [
        {'name': 'digit', 'teachers': nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 'temperature': 8.0},
        {'name': 'parity', 'teachers': nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), 'kd_loss_weight': 0.3},
    ]
    distill(
        None,
        student,
        data,
        tasks=tasks,
        kd_loss='js',
        temperature=3.0,
        org_loss_weight=0.2,
        max_duration='1ba',
        callbacks=[seen],
        measure_speed=False,
        device='cpu',
    )
    digit, parity = seen.distillations
    assert [type(d.kd_loss_fn).__name__ for d in (digit, parity)] == ['JensenShannonDivergence'] * 2
    assert (digit.kd_loss_fn.temperature, parity.kd_loss_fn.temperature) == (8.0, 3.0)
    assert (digit.org_loss_weight, parity.org_loss_weight) == (0.2, 1.0)
    assert (digit.kd_loss_weight, parity.kd_loss_weight) == (1.0, 0.3)
    assert digit.input_key == parity.input_key == 'inputs'  # plain teachers read the inputs of dict batches


def test_composer_options_reach_the_distilled_student_s_trainer(digits, teacher, tmp_path):
    from composer import Callback
    from composer.algorithms import LabelSmoothing
    from composer.loggers import InMemoryLogger
    from composer.optim import LinearScheduler

    class Seen(Callback):
        def fit_start(self, state, logger):
            self.algorithms = [type(a).__name__ for a in state.algorithms]
            self.schedulers = [type(s).__name__ for s in state.schedulers]

    seen, logger = Seen(), InMemoryLogger()
    distill(
        teacher,
        linear_student(),
        digits.train,
        digits.val,
        max_duration='1ep',
        algorithms=[LabelSmoothing(smoothing=0.1)],
        callbacks=[seen],
        loggers=[logger],
        save_folder=str(tmp_path / 'checkpoints'),
        eval_interval='1ep',
        trainer_kwargs={'schedulers': [LinearScheduler()]},
        optimizer='SGD',
        lr=0.1,
        device='cpu',
        name='digits',  # a Distillation keyword
    )
    assert seen.algorithms == ['LabelSmoothing', 'Distillation'] and seen.schedulers == ['LambdaLR']
    assert {'loss/train/kd/digits', 'loss/train/original', 'metrics/eval/MulticlassAccuracy'} <= set(logger.data)
    assert [p.name for p in (tmp_path / 'checkpoints').glob('ep1-*.pt')]
