"""The signal-through-the-fused-layer benchmark runs in its tiny setting and reports what it says it measures."""

from __future__ import annotations

import json
import math

from benchmarks import signal_fused


def test_quick_benchmark_times_every_variant_and_checks_fused_against_unfused(tmp_path):
    output = tmp_path / 'signal_fused.json'
    report = signal_fused.main(['--quick', '--threads', '1', '--output', str(output)])
    assert json.loads(output.read_text()) == report
    assert output.with_suffix('.md').read_text() == signal_fused.markdown(report)
    medians, ratios = report['median_seconds'], report['ratios']
    assert set(medians) == set(signal_fused.VARIANTS) and all(value > 0 for value in medians.values())
    assert math.isclose(ratios['signal fused / alone fused'], medians['signal, fused'] / medians['alone'])
    assert ratios['loss relative difference, fused vs unfused'] < 1e-5
    assert report['shape'] == {'tokens': 64, 'hidden': 16, 'vocab': 500, 'k': 8}
