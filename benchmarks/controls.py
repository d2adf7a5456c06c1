"""Control algorithms: the least a Composer algorithm can do, to price what Composer itself charges.

A distillation step is timed and counted against these as well as against a plain PyTorch loop, so that what is
Composer's (running an algorithm, logging each loss term) is told apart from what is ours.
"""

from __future__ import annotations

import copy

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from benchmarks.pairs import Pair, plain_kd_term
from composer_kd.models.outputs import extract_logits


class LossTermAlgorithm(Algorithm):
    """Logs one more loss term at ``AFTER_LOSS``, as distillation does, and computes nothing.

    The loss becomes ``{'original', 'kd', 'total'}``, with a constant ``kd`` made once and ``total`` the model's
    own loss, so no operator of its own runs: a step with it pays what Composer charges for running an algorithm
    and for each loss term it logs, and nothing else.
    """

    def __init__(self):
        self._term: torch.Tensor | None = None

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_LOSS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if self._term is None:
            self._term = state.device.tensor_to_device(torch.zeros(()))
        state.loss = {'original': state.loss, 'kd': self._term, 'total': state.loss}

    def __str__(self) -> str:
        return 'LossTermAlgorithm'


class MinimalKDAlgorithm(Algorithm):
    """Knowledge distillation in the fewest lines Composer allows: the floor for any distillation algorithm.

    At ``AFTER_LOSS`` the frozen teacher runs on the batch and the loss becomes ``0.5 * loss + 0.5 * KL`` (the
    plain loop's formula, :func:`~benchmarks.pairs.plain_kd_term`), logged as the same three terms as
    ``Distillation``'s. No checks, no options, nothing but the math, for this one pair and setting.
    """

    def __init__(self, pair: Pair, temperature: float):
        self.pair, self.temperature = pair, temperature
        self.teacher = copy.deepcopy(pair.teacher).eval().requires_grad_(False)
        self._placed = False

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_LOSS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if not self._placed:
            state.device.module_to_device(self.teacher)
            self._placed = True
        with torch.no_grad():
            teacher_logits = self.pair.teacher_forward(self.teacher, state.batch)
        kd = plain_kd_term(extract_logits(state.outputs), teacher_logits, self.temperature)
        state.loss = {'original': state.loss, 'kd': kd, 'total': 0.5 * state.loss + 0.5 * kd}

    def __str__(self) -> str:
        return 'MinimalKDAlgorithm'
