"""The recipes' ``compression`` section: it validates and builds, a bad option names its key, and a run reports
int8 and pruned students whose figures match an independent evaluation of the exported models."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import prune

from composer_kd import Distillation
from composer_kd.compression import Pruning, QuantizationAwareTraining, quantization_backend
from composer_kd.recipes import RecipeError, build_run, load_recipe

TINY = ['progress_bar=false', 'max_duration=6ba', 'teachers.0.train.max_duration=4ba', 'eval_interval=3ba']
QAT = ['compression.qat.backend=x86', 'compression.qat.freeze_observers=0.5']
PRUNING = ['compression.pruning.amount=0.5', 'compression.pruning.start=2ba', 'compression.pruning.end=4ba']


pytestmark = pytest.mark.usefixtures('nondeterministic_algorithms_allowed')


def refusal(overrides) -> list[str]:
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe('digits', [*TINY, *overrides]))
    return info.value.problems


def test_compression_options_validate_and_build_algorithms_for_the_student_only():
    recipe = load_recipe('digits', [*TINY, *QAT, *PRUNING, 'compression.pruning.modules=[module.1]'])
    assert recipe.compression.qat.backend == 'x86' and recipe.compression.pruning.amount == 0.5
    run = build_run(recipe)
    algorithms = run.trainer.state.algorithms
    kinds = [type(a) for a in algorithms]
    # Quantization first (pruning then masks the quantization-aware layers), Distillation last.
    assert kinds == [QuantizationAwareTraining, Pruning, Distillation]
    qat, pruning = algorithms[0], algorithms[1]
    assert qat.backend == 'x86' and qat.freeze_observers.value == 0.5
    assert pruning.amount == 0.5 and pruning.modules == ['module.1']
    assert (str(pruning.schedule.start), str(pruning.schedule.end)) == ('2ba', '4ba')
    # Event.INIT has run: the student is quantization-aware and reparametrized; the teacher is neither.
    assert quantization_backend(run.student) == 'x86' and hasattr(run.student.module.get_submodule('1'), 'weight_mask')
    teacher = run.teachers[0]
    assert not any(isinstance(m, FakeQuantizeBase) for m in teacher.modules()) and not prune.is_pruned(teacher)


def test_a_bad_option_names_its_key():
    problems = refusal(
        [
            'compression.qat.backend=x87',
            'compression.qat.freeze_observers=soon',
            'compression.pruning.amount=1.5',
            'compression.pruning.start=later',
        ]
    )
    assert problems[0].startswith("compression.qat.backend: unknown quantization backend 'x87'; did you mean 'x86'?")
    assert [p.split(':')[0] for p in problems] == [
        'compression.qat.backend',
        'compression.qat.freeze_observers',
        'compression.pruning.amount',
        'compression.pruning.start',
    ]
    assert refusal(
        ['compression.pruning.amount=0.5', 'compression.pruning.start=4ba', 'compression.pruning.end=2ba']
    ) == ["compression.pruning.end: '2ba' must come after start '4ba'"]
    (problem,) = refusal(['compression.pruning.amount=0.5', 'compression.pruning.modules=[module.1, modul.3]'])
    assert problem.startswith(
        "compression.pruning.modules.1: the model has no module 'modul.3'; did you mean 'module.3'?"
    )
    (problem,) = refusal(['compression.pruning.amount=0.5', 'compression.pruning.modules=[module.2]'])
    assert problem.startswith("compression.pruning.modules.0: 'module.2' is a ReLU")
    (problem,) = refusal(['compression.pruning.amount=0.5', 'student.hidden=[]'])
    assert problem.startswith('compression.pruning.modules: by default every Linear and Conv layer but the last')


def test_unknown_and_missing_compression_keys_are_named():
    with pytest.raises(RecipeError) as info:
        load_recipe('digits', ['compression.pruning.amout=0.5', 'compression.qat.backnd=x86'])
    assert set(info.value.problems) == {
        "compression.qat.backnd: unknown key; did you mean 'compression.qat.backend'? (the keys of compression.qat "
        'are: backend, freeze_observers, freeze_bn_stats)',
        "compression.pruning.amout: unknown key; did you mean 'compression.pruning.amount'? (the keys of "
        'compression.pruning are: amount, structured, modules, start, end)',
        'compression.pruning.amount: required, expected a number',
    }


def test_qat_needs_a_student_that_torch_fx_can_trace():
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe('bert_synthetic', ['compression.qat.backend=x86']))
    assert any(
        p.startswith('compression.qat: quantization-aware training traces a ComposerClassifier')
        for p in info.value.problems
    )


def accuracy(model, dataset) -> float:
    images, labels = dataset.tensors
    with torch.no_grad():
        return float((model.module(images).argmax(dim=1) == labels).float().mean())


@pytest.fixture(scope='module')
def compressed_run():
    run = build_run(load_recipe('digits', [*TINY, *QAT, *PRUNING, 'data.eval_splits=[val]']))
    return run, run.fit()


def test_compressed_run_rows_and_notes(compressed_run):
    run, summary = compressed_run
    roles = [m.role for m in summary.models]
    assert roles == [
        'teacher 0',
        'student (distilled)',
        'student (distilled) int8',
        'student alone',
        'student alone int8',
    ]
    described = {m.role: m.description for m in summary.models}
    assert described['student (distilled)'] == 'mlp [32] + QAT x86 + pruned 50%'
    assert described['student alone int8'].endswith('-> int8 (CPU)')
    assert set(run.exported) == {'student (distilled)', 'student alone'}
    for role, exported in run.exported.items():
        # The int8 row's accuracy is the exported model's, computed here independently on the validation split.
        assert summary.value(f'{role} int8') == pytest.approx(accuracy(exported, run.data.splits['val']), abs=1e-6)
        layer = exported.module.get_submodule('1')
        zeros = float((layer.weight().int_repr() == 0).float().mean())
        assert zeros >= 0.5  # the pruned half, plus any weight that rounds to 0
        assert not [k for k in exported.state_dict() if k.endswith(('_orig', '_mask'))]
    notes = '\n'.join(summary.notes)
    assert "student (distilled): 50.0% of the pruned layers' weights are zero (module.1)" in notes
    assert 'student alone: state_dict' in notes and 'bytes in int8' in notes
