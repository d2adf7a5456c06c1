"""The benchmark suite runs end to end in its quick setting and writes every figure."""

from __future__ import annotations

import json
import math

from benchmarks.run import main


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    main(['--quick', '--device', 'cpu', '--output-dir', str(tmp_path)])
    report = json.loads((tmp_path / 'results.json').read_text())
    assert set(report['overhead']) == {'glibc default', 'glibc thresholds raised'}
    for pairs in report['overhead'].values():
        assert [p['pair'] for p in pairs] == ['vision', 'text', 'dispatch']
        for pair in pairs:
            expected = {'student_step', 'kd_step', 'teacher_forward', 'plain_student_step', 'plain_kd_step'}
            expected |= {
                'loss_term_algorithm_step',
                'minimal_kd_algorithm_step',
                'student_step_loader',
                'cached_kd_step',
            }
            if pair['pair'] != 'dispatch':
                expected.add('kd_step_bf16_teacher')
            if pair['pair'] == 'vision':
                expected.add('kd_step_channels_last_teacher')
            assert set(pair['median_seconds']) == expected
            assert all(len(v) == 4 and all(t > 0 for t in v) for v in pair['samples'].values())
            m = pair['median_seconds']
            assert math.isclose(pair['ratios']['kd / student'], m['kd_step'] / m['student_step'])
            cached_ratio = pair['ratios']['cached kd (cache hit) / student, same loader']
            assert math.isclose(cached_ratio, m['cached_kd_step'] / m['student_step_loader'])
            assert pair['cached_teacher_calls_timed'] == 0  # every timed cached step read the cache
            floor_ratio = pair['ratios']['kd / minimal KD algorithm']
            assert math.isclose(floor_ratio, m['kd_step'] / m['minimal_kd_algorithm_step'])
    assert [p['pair'] for p in report['host_work']] == ['vision', 'text', 'dispatch']
    for pair in report['host_work']:
        ops, figures = pair['operators'], pair['figures']
        assert figures['operators added: kd step - student step'] == ops['kd_step'] - ops['student_step'] > 0
        assert ops['teacher_forward'] > 0
    for figures in report['memory'].values():
        extra = [figures[f'{name} (MiB)'] for name in ('kd run extra peak', 'student run extra peak')]
        activations = figures['teacher activations, one batch (MiB)']
        assert all(v >= 0 for v in [*extra, activations]) and figures['teacher weights (MiB)'] > 0
        ratio = figures['kd run extra peak / (student run extra peak + teacher activations)']
        assert math.isclose(ratio, extra[0] / (extra[1] + activations), rel_tol=1e-6)
    assert set(report['memory']) == {'vision', 'text'}
    kl = report['kl_memory']
    assert kl['value_relative_difference'] < 1e-5
    assert kl['naive']['shape'] == kl['chunked']['shape'] == [2, 16, 500]
    markdown = (tmp_path / 'results.md').read_text()
    assert 'kd / (student + teacher)' in markdown and 'extra peak memory, chunked / naive' in markdown
    assert '## Peak memory of a run' in markdown and '## Work per step on the host' in markdown
