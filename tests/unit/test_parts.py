"""Each part and source of a fit on its own, against the formula written out: the batch plan, the loss terms, the
live, cached and stored-signal sources, the fused source, the guard as a part, on-policy's reweighting, the event
routing of ``FitParts`` and the registry of part kinds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from composer.core import Event, Precision, Time, Timestamp
from composer.models import HuggingFaceModel
from torch import nn

from composer_kd import KLDivergence, LinearSchedule
from composer_kd.cache import topk_compress
from composer_kd.models.teachers import TeacherInference, TeacherRunner
from composer_kd.parts.base import FitContext, LossTerms, Part, Source, TeacherKeys, log_key
from composer_kd.parts.fused import Fused, FusedSource
from composer_kd.parts.guard import NonFiniteGuard
from composer_kd.parts.live import CachedTeachers, LiveTeachers
from composer_kd.parts.onpolicy import OnPolicy, OnPolicyFit
from composer_kd.parts.plan import BatchPlan
from composer_kd.parts.registry import PART_KINDS, FitParts, PartKind, alone_reason, part_kind, register_part_kind
from composer_kd.parts.signal import StoredSignal
from composer_kd.signal import TeacherSignal


class RecordingLogger:
    def __init__(self):
        self.logged = {}

    def log_metrics(self, metrics):
        self.logged.update(metrics)


def make_state(batch=None, outputs=None, loss=None, batch_index=0, max_duration='6ba'):
    return SimpleNamespace(
        batch=batch,
        outputs=outputs,
        loss=loss,
        precision=Precision.FP32,
        precision_config=None,
        timestamp=Timestamp(batch=batch_index),
        rank_zero_seed=17,
        max_duration=Time.from_input(max_duration),
        dataloader_len=None,
        train_metrics={},
        algorithms=[],
    )


class FixedPlan(Part):
    """A batch plan that never changes: these teachers, these weights."""

    def __init__(self, active=(0,), weights=(0.3, 0.7), log=None):
        self.active, self.weights, self.log = list(active), weights, log

    def teachers_for_batch(self, state):
        return self.active

    def end(self):
        if self.log is not None:
            self.log.append(('plan', 'end'))


def make_fit(state, runners=(), kd_loss_fn=None, active=(0,), weights=(0.3, 0.7), causal=False, policy='raise'):
    plan = FixedPlan(active, weights)
    kd_loss_fn = kd_loss_fn if kd_loss_fn is not None else KLDivergence(temperature=2.0)
    return FitContext(state, list(runners), kd_loss_fn, TeacherKeys(), causal, plan, NonFiniteGuard(policy))


def forward_kl(student, teacher, temperature, mask=None):
    """T^2 * sum_c p_c (log p_c - log q_c), averaged over the positions that count, in float64."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    return per_position[mask].mean() if mask is not None else per_position.mean()


def assert_close(value, expected):
    torch.testing.assert_close(value.double(), expected.double(), rtol=1e-5, atol=1e-6)


def runner(module):
    r = TeacherRunner(module.eval().requires_grad_(False), TeacherInference())
    r.prepare()
    return r


# ---- LossTerms ------------------------------------------------------------------------------------------------


def test_loss_terms_combine_into_the_weighted_sum_and_a_source_total_replaces_it():
    terms = LossTerms(torch.tensor(2.0), torch.tensor(3.0), 0.1, 0.9, extra={'feature_0': (torch.tensor(4.0), 0.5)})
    losses = terms.combine()
    assert set(losses) == {'original', 'kd', 'feature_0', 'total'}
    assert math.isclose(float(losses['total']), 0.1 * 2.0 + 0.9 * 3.0 + 0.5 * 4.0, rel_tol=1e-6)
    named = LossTerms(torch.tensor(2.0), torch.tensor(3.0), 1.0, 1.0).combine('digit')
    assert 'kd/digit' in named and 'kd' not in named
    carried = torch.tensor(7.0)
    assert LossTerms(torch.tensor(2.0), torch.tensor(3.0), 1.0, 1.0, total=carried).combine()['total'] is carried
    assert log_key(None, 'x') == 'distillation/x' and log_key('digit', 'x') == 'distillation/digit/x'


# ---- BatchPlan ------------------------------------------------------------------------------------------------


def plan_at(batch_index, **settings):
    defaults = dict(
        n_sources=3,
        n_teachers_to_sample=None,
        start=Time.from_input('0dur'),
        end=None,
        org_loss_weight=1.0,
        kd_loss_weight=1.0,
        temperature=None,
    )
    state = make_state(batch_index=batch_index)
    plan = BatchPlan(state, **{**defaults, **settings})
    return plan, state


def test_the_plan_runs_no_teacher_outside_its_window_and_every_teacher_inside():
    active = []
    for batch in range(6):
        plan, state = plan_at(batch, start=Time.from_input('2ba'), end=Time.from_input('0.75dur'))
        active.append(plan.teachers_for_batch(state))
    # '0.75dur' of 6 batches is batch 4.5: batches begun before it, 2, 3 and 4, distil.
    assert active == [[], [], [0, 1, 2], [0, 1, 2], [0, 1, 2], []]
    assert plan.events == {Event.BATCH_START}


def test_the_plan_samples_the_teachers_from_the_seed_and_the_step():
    for batch in range(4):
        plan, state = plan_at(batch, n_teachers_to_sample=2)
        generator = torch.Generator().manual_seed((17 * 1_000_003 + batch) % (2**63 - 1))
        assert plan.teachers_for_batch(state) == sorted(torch.randperm(3, generator=generator)[:2].tolist())


def test_a_constant_plan_handles_no_event_and_is_made_once():
    plan, state = plan_at(3, org_loss_weight=0.25, kd_loss_weight=0.75, temperature=3.0)
    assert plan.events == frozenset()
    loss = KLDivergence(temperature=1.0)
    fit = FitContext(state, [], loss, TeacherKeys(), False, plan, NonFiniteGuard())
    logger = RecordingLogger()
    plan.begin(fit, logger)
    assert plan.active == [0, 1, 2] and plan.weights == (0.25, 0.75) and loss.temperature == 3.0
    assert logger.logged == {}  # nothing is scheduled, so nothing is logged


def test_scheduled_values_are_read_at_each_batch_set_on_the_loss_and_logged():
    weight = LinearSchedule(1.0, 0.0, end='4ba')
    temperature = LinearSchedule(4.0, 2.0, end='4ba')
    plan, state = plan_at(1, kd_loss_weight=weight, temperature=temperature)
    loss = KLDivergence(temperature=1.0)
    fit = FitContext(state, [], loss, TeacherKeys(), False, plan, NonFiniteGuard(), name='digit')
    logger = RecordingLogger()
    plan.on_event(Event.BATCH_START, fit, logger)
    assert plan.weights == (1.0, 0.75) and loss.temperature == 3.5
    assert logger.logged == {'distillation/digit/kd_loss_weight': 0.75, 'distillation/digit/temperature': 3.5}
    plan.end()
    assert plan.active == []


# ---- LiveTeachers ---------------------------------------------------------------------------------------------


def two_teachers_and_a_batch():
    torch.manual_seed(0)
    teachers = [nn.Linear(4, 5), nn.Linear(4, 5)]
    inputs, labels = torch.randn(6, 4), torch.randint(0, 5, (6,))
    student_logits = torch.randn(6, 5, requires_grad=True)
    return teachers, (inputs, labels), student_logits


def test_live_teachers_give_the_kl_to_the_average_of_the_active_teachers_logits():
    teachers, batch, student_logits = two_teachers_and_a_batch()
    state = make_state(batch=batch, outputs=student_logits, loss=torch.tensor(1.5))
    fit = make_fit(state, [runner(t) for t in teachers], active=(0, 1))
    terms = LiveTeachers(fit).terms(fit)
    with torch.no_grad():
        average = (teachers[0](batch[0]) + teachers[1](batch[0])) / 2
    assert_close(terms.kd, forward_kl(student_logits, average, 2.0))
    assert (terms.org_loss_weight, terms.kd_loss_weight) == (0.3, 0.7) and bool(terms.usable)
    only_second = make_fit(state, fit.runners, active=(1,))
    with torch.no_grad():
        second = teachers[1](batch[0])
    assert_close(LiveTeachers(only_second).terms(only_second).kd, forward_kl(student_logits, second, 2.0))


def test_live_teachers_zero_the_term_of_nan_logits_and_the_guard_raises_once_the_batch_is_done():
    teachers, batch, student_logits = two_teachers_and_a_batch()
    with torch.no_grad():
        teachers[0].bias[2] = float('nan')
    state = make_state(batch=batch, outputs=student_logits, loss=torch.tensor(1.5))
    fit = make_fit(state, [runner(teachers[0])], active=(0,))
    terms = LiveTeachers(fit).terms(fit)
    assert float(terms.kd) == 0.0 and not bool(terms.usable)
    (grad,) = torch.autograd.grad(terms.kd, student_logits)
    assert torch.isfinite(grad).all()
    assert fit.guard.events == {Event.AFTER_TRAIN_BATCH} and fit.guard.pending
    with pytest.raises(FloatingPointError, match='NaN or \\+inf'):
        fit.guard.on_event(Event.AFTER_TRAIN_BATCH, fit, RecordingLogger())


class RecordedRows:
    """Stands in for a cache's fit: serves the rows it holds, records the others."""

    def __init__(self, held=None):
        self.held, self.recorded = held, []

    def lookup(self, state, n_rows, device):
        return self.held, torch.arange(n_rows)

    def record(self, rows, logits):
        self.recorded.append((rows, logits))


def cached_source(fit, held=None):
    source = CachedTeachers.__new__(CachedTeachers)
    LiveTeachers.__init__(source, fit)
    source.cached = RecordedRows(held)
    return source


def test_cached_teachers_read_recorded_logits_without_running_the_teachers_and_record_the_rest():
    teachers, batch, student_logits = two_teachers_and_a_batch()
    state = make_state(batch=batch, outputs=student_logits, loss=torch.tensor(1.5))
    fit = make_fit(state, [runner(teachers[0])], active=(0,))
    held = torch.randn(6, 5)
    served = cached_source(fit, held)
    assert_close(served.terms(fit).kd, forward_kl(student_logits, held, 2.0))
    assert served.cached.recorded == [] and not fit.guard.pending  # recorded logits are not screened again

    missing = cached_source(fit)
    kd = missing.terms(fit).kd
    with torch.no_grad():
        live = teachers[0](batch[0])
    assert_close(kd, forward_kl(student_logits, live, 2.0))
    ((rows, recorded),) = missing.cached.recorded
    assert rows.tolist() == list(range(6)) and torch.equal(recorded, live)


# ---- StoredSignal ---------------------------------------------------------------------------------------------


def test_the_stored_signal_gives_the_kl_to_the_teacher_it_stands_for():
    torch.manual_seed(0)
    vocab, k, temperature = 30, 5, 2.0
    teacher, student = torch.randn(2, 6, vocab) * 3, torch.randn(2, 6, vocab, requires_grad=True)
    values, indices, log_tail = topk_compress(teacher, k)
    signal = TeacherSignal()
    batch = {
        'input_ids': torch.zeros(2, 6, dtype=torch.long),
        'attention_mask': torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        signal.indices_key: indices,
        signal.logits_key: values,
        signal.log_tail_key: log_tail,
        signal.vocab_size_key: torch.tensor([vocab, vocab]),
    }
    state = make_state(batch=batch, outputs={'logits': student}, loss=torch.tensor(1.0))
    fit = make_fit(state, kd_loss_fn=KLDivergence(temperature=temperature), causal=True)
    terms = StoredSignal(signal).terms(fit)
    # Each kept class has its stored logit; every other class shares what is left of the mass.
    dense = torch.full((2, 6, vocab), 0.0, dtype=torch.float64) + (log_tail.double() - math.log(vocab - k))[..., None]
    dense.scatter_(-1, indices.long(), values.double())
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # causal: the last predicts none
    torch.testing.assert_close(terms.kd.double(), forward_kl(student, dense, temperature, mask), rtol=1e-5, atol=1e-6)

    batch[signal.vocab_size_key] = torch.tensor([vocab + 1, vocab + 1])
    with pytest.raises(ValueError, match='vocabulary of 31 classes'):
        StoredSignal(signal).terms(fit)


# ---- FusedSource ----------------------------------------------------------------------------------------------


def test_the_fused_source_gives_the_students_cross_entropy_and_the_kl_of_the_logits_it_never_made():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=48, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    student, teacher = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    input_ids = torch.randint(0, 48, (2, 8))
    batch = {'input_ids': input_ids, 'labels': input_ids.clone(), 'attention_mask': torch.ones_like(input_ids)}
    state = make_state(batch=batch)
    state.model = HuggingFaceModel(student, use_logits=True)
    fit = make_fit(state, [runner(teacher)], weights=(0.4, 0.6), causal=True)
    source = FusedSource(Fused(chunk_size=5), fit)
    student.train()
    source.on_event(Event.BEFORE_FORWARD, fit, RecordingLogger())
    state.outputs = state.model(batch)
    terms = source.terms(fit)
    source.end()

    with torch.no_grad():
        plain = student.eval()(**batch)
        teacher_logits = teacher(input_ids=input_ids).logits
    torch.testing.assert_close(terms.original, plain.loss, rtol=1e-5, atol=1e-6)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, -1] = False
    expected_kd = forward_kl(plain.logits, teacher_logits, 2.0, mask)
    torch.testing.assert_close(terms.kd.double(), expected_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total, 0.4 * plain.loss + 0.6 * expected_kd.float(), rtol=1e-5, atol=1e-6)
    assert 'forward' not in student.lm_head.__dict__  # the output layer is given back


# ---- on-policy, FitParts, the registry -------------------------------------------------------------------------


def test_on_policy_trains_no_own_loss_on_the_students_samples_unless_asked():
    for keep, expected in ((False, 0.0), (True, 0.3)):
        part = OnPolicyFit.__new__(OnPolicyFit)
        part.options, part.student_generated = OnPolicy(org_loss_on_student_samples=keep), True
        terms = LossTerms(torch.tensor(1.0), torch.tensor(2.0), 0.3, 0.7)
        part.adjust(terms, None)
        assert terms.org_loss_weight == expected
    part.student_generated = False
    part.adjust(terms, None)
    assert terms.org_loss_weight == 0.3
    assert part.events == {Event.AFTER_DATALOADER}


class Option:
    def __init__(self, tag, log, events=frozenset(), source=False):
        self.tag, self.log, self.events, self.source = tag, log, frozenset(events), source


class RecordingPart(Part):
    def __init__(self, option):
        self.option, self.events = option, option.events

    def on_event(self, event, fit, logger):
        self.option.log.append((self.option.tag, event))

    def adjust(self, terms, fit):
        terms.extra[self.option.tag] = (torch.tensor(1.0), 1.0)

    def end(self):
        self.option.log.append((self.option.tag, 'end'))


class RecordingSource(Source, RecordingPart):
    def terms(self, fit):
        return LossTerms(torch.tensor(2.0), torch.tensor(3.0), *fit.plan.weights)


@pytest.fixture
def recording_kind():
    register_part_kind(
        Option, PartKind(start=lambda option, fit: (RecordingSource if option.source else RecordingPart)(option))
    )
    yield
    del PART_KINDS[Option]


def test_fit_parts_route_each_event_in_order_let_parts_adjust_the_terms_and_end_in_reverse(recording_kind):
    log = []
    plan = FixedPlan(weights=(0.5, 0.5), log=log)
    fit = FitContext(make_state(), [], KLDivergence(), TeacherKeys(), False, plan, NonFiniteGuard())
    options = [
        Option('a', log, {Event.BATCH_START, Event.BATCH_END}),
        Option('s', log, {Event.BATCH_START}, source=True),
        Option('b', log, {Event.BATCH_END}),
    ]
    parts = FitParts(fit, options)
    assert isinstance(parts.source, RecordingSource) and parts.events == {Event.BATCH_START, Event.BATCH_END}
    parts.on_event(Event.BATCH_START, fit, RecordingLogger())
    parts.on_event(Event.BATCH_END, fit, RecordingLogger())
    parts.on_event(Event.EPOCH_END, fit, RecordingLogger())
    losses = parts.loss(fit)
    # Every part adjusts the source's terms, the source too: 0.5 * 2 + 0.5 * 3 + one per part.
    assert math.isclose(float(losses['total']), 2.5 + 3.0)
    parts.end()
    assert log == [
        ('a', Event.BATCH_START),
        ('s', Event.BATCH_START),
        ('a', Event.BATCH_END),
        ('b', Event.BATCH_END),
        ('b', 'end'),
        ('s', 'end'),
        ('a', 'end'),
        ('plan', 'end'),
    ]


def test_without_a_source_among_the_options_live_teachers_are_the_source(recording_kind):
    fit = make_fit(make_state())
    parts = FitParts(fit, [Option('a', [])])
    assert type(parts.source) is LiveTeachers and parts.parts[-1] is parts.source


def test_the_registry_names_an_unknown_option_and_says_which_options_must_be_alone():
    with pytest.raises(TypeError, match='Option is not an option Distillation knows'):
        part_kind(Option('a', []))
    assert part_kind(NonFiniteGuard()).start(guard := NonFiniteGuard(), None) is guard
    assert alone_reason([NonFiniteGuard(), Fused()]).startswith('fused=... must be the only Distillation')
    assert alone_reason([NonFiniteGuard(), OnPolicy()]) is None
