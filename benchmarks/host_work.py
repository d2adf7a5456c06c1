"""Work each training step asks of the host: operators dispatched and host synchronizations.

Counted, not timed, so the figures are exact and repeatable on any machine. They matter most where a step is
dispatch-bound (small models, or a GPU at millisecond steps): there every operator costs a kernel launch's worth
of CPU time and every synchronization stalls the host until the device catches up, whatever the arithmetic.

Counts come from a ``TorchDispatchMode`` active over one whole step, from ``BATCH_START`` to ``BATCH_END`` in
Composer (forward, losses, backward, optimizer step, Composer's own bookkeeping) and over one call in a plain
loop. A host synchronization is an ``aten._local_scalar_dense`` call, what ``.item()``, ``int()`` and ``bool()`` of
a tensor dispatch.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from composer import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.controls import LossTermAlgorithm, MinimalKDAlgorithm
from benchmarks.pairs import Pair, plain_step, student_trainer
from composer_kd import Distillation, KLDivergence

HOST_SYNC = 'aten._local_scalar_dense.default'


class OperatorCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _CountOneStep(Callback):
    def __init__(self):
        self.counter: OperatorCounter | None = None
        self.counts: Counter[str] = Counter()

    def batch_start(self, state, logger):
        self.counter = OperatorCounter()
        self.counter.__enter__()

    def batch_end(self, state, logger):
        assert self.counter is not None
        self.counter.__exit__(None, None, None)
        self.counts, self.counter = self.counter.counts, None


def composer_step_counts(pair: Pair, algorithms: list, device: str = 'cpu', warmup: int = 2) -> Counter[str]:
    """Operators of one Composer step of ``pair.student`` with ``algorithms``, after ``warmup`` steps."""
    counter = _CountOneStep()
    trainer = student_trainer(pair, algorithms, device, warmup + 1)
    trainer.fit(duration=f'{warmup}ba')
    trainer.state.callbacks.append(counter)
    trainer.fit(duration='1ba')
    return counter.counts


def plain_step_counts(pair: Pair, with_teacher: bool, temperature: float, device: str = 'cpu') -> Counter[str]:
    """Operators of one step of the hand-written PyTorch loop (student alone, or distilled)."""
    step = plain_step(pair, device, with_teacher, temperature)
    step()  # the optimizer's state is made on the first step
    return _counted(step)


def _counted(fn: Callable[[], Any]) -> Counter[str]:
    counter = OperatorCounter()
    with counter:
        fn()
    return counter.counts


def measure(pair: Pair, temperature: float = 4.0) -> dict[str, Any]:
    """Operators and host synchronizations per step of each variant, and the differences the table reports."""
    distillation = Distillation(copy.deepcopy(pair.teacher), KLDivergence(temperature), 0.5, 0.5)
    counts = {
        'student_step': composer_step_counts(pair, []),
        'loss_term_algorithm_step': composer_step_counts(pair, [LossTermAlgorithm()]),
        'minimal_kd_algorithm_step': composer_step_counts(pair, [MinimalKDAlgorithm(pair, temperature)]),
        'kd_step': composer_step_counts(pair, [distillation]),
        'plain_student_step': plain_step_counts(pair, False, temperature),
        'plain_kd_step': plain_step_counts(pair, True, temperature),
    }
    teacher = copy.deepcopy(pair.teacher).eval().requires_grad_(False)
    with torch.no_grad():
        counts['teacher_forward'] = _counted(lambda: pair.teacher_forward(teacher, pair.batch))
    ops = {name: sum(c.values()) for name, c in counts.items()}
    syncs = {name: c[HOST_SYNC] for name, c in counts.items()}
    return {
        'pair': pair.name,
        'description': pair.description,
        'operators': ops,
        'host_syncs': syncs,
        'figures': figures(ops, syncs),
    }


def figures(ops: dict[str, int], syncs: dict[str, int]) -> dict[str, int]:
    """What distillation adds to a step, beside the plain loop's distillation and the least a Composer one does."""
    return {
        'operators added: kd step - student step': ops['kd_step'] - ops['student_step'],
        'operators added: plain kd - plain student': ops['plain_kd_step'] - ops['plain_student_step'],
        'operators added: minimal KD algorithm - student step': ops['minimal_kd_algorithm_step'] - ops['student_step'],
        'operators Composer adds for a loss term: loss-term algorithm - student': (
            ops['loss_term_algorithm_step'] - ops['student_step']
        ),
        'operators of ours: kd - minimal KD algorithm': ops['kd_step'] - ops['minimal_kd_algorithm_step'],
        'teacher forward operators': ops['teacher_forward'],
        'host syncs Composer adds for a loss term': syncs['loss_term_algorithm_step'] - syncs['student_step'],
        'host syncs of ours: kd - minimal KD algorithm': syncs['kd_step'] - syncs['minimal_kd_algorithm_step'],
    }
