"""The fused-memory benchmarks run end to end in their tiny settings and report every ratio."""

from __future__ import annotations

import json
import math

from benchmarks import fused_memory, fused_memory_gpu


def test_cpu_benchmark_quick_reports_both_allocators(tmp_path):
    report = fused_memory.main(['--quick', '--threads', '1', '--output', str(tmp_path / 'fused.json')])
    assert json.loads((tmp_path / 'fused.json').read_text()) == report
    assert set(report['allocators']) == set(fused_memory.ALLOCATORS)
    for results in report['allocators'].values():
        unfused, fused = results['unfused'], results['fused']
        assert unfused['shape'] == fused['shape'] == {'tokens': 64, 'hidden': 16, 'vocab': 500}
        ratios = results['ratios']
        assert math.isclose(ratios['step time, fused / unfused'], fused['median_seconds'] / unfused['median_seconds'])
        assert ratios['loss relative difference'] < 1e-5
        assert math.isclose(fused['grad_weight_norm'], unfused['grad_weight_norm'], rel_tol=1e-4)


def test_gpu_script_tiny_cpu_path(tmp_path):
    report = fused_memory_gpu.main(['--device', 'cpu', '--quick', '--output', str(tmp_path / 'gpu.json')])
    results = report['allocators']['torch']
    assert results['ratios']['loss relative difference'] < 1e-5
    assert 'liger' not in report  # Liger's loss is compared on CUDA only
