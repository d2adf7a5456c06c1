"""The teacher-signal benchmark runs end to end in its quick setting and writes every figure the docs quote."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.teacher_signal import main


@pytest.mark.usefixtures('one_thread')
def test_quick_teacher_signal_benchmark_writes_every_figure(tmp_path):
    main(['--quick', '--output-dir', str(tmp_path)])
    report = json.loads((tmp_path / 'teacher_signal.json').read_text())
    assert set(report['per_k']) == {'8', '32', '128'}
    for k, row in report['per_k'].items():
        # The shards hold the signal, the int32 token and MDS's per-sample overhead on top.
        assert row['shard_bytes_per_token_measured'] > row['signal_bytes_per_token'] + 4
        assert row['signal_bytes_per_token'] == int(k) * 2 + int(k) * 15 / 8 + 4
        assert row['kl_rebuilt_t1'] >= 0 and row['kl_rebuilt_t2'] >= 0
    assert report['step_time_ratio'] > 0
    assert set(report['student_perplexity']) == {'shards', 'live', 'alone'}
    assert all(math.isfinite(v['mean']) for v in report['student_perplexity'].values())
    assert '| k | signal bytes/token' in (tmp_path / 'teacher_signal.md').read_text()
