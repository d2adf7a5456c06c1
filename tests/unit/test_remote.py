"""Teacher checkpoints at object-store URIs, read from a real S3-compatible server on loopback."""

from __future__ import annotations

import pytest
import torch
from conftest import S3_BUCKET as BUCKET
from conftest import make_teacher

from composer_kd import Distillation


def test_teacher_loads_from_an_s3_uri(s3, tmp_path):
    source = make_teacher(seed=21)
    local = tmp_path / 'teacher.pt'
    torch.save({'state': {'model': {'module.' + k: v for k, v in source.state_dict().items()}}}, local)
    s3.upload_file(str(local), BUCKET, 'runs/teacher.pt')

    target = make_teacher(seed=22)
    Distillation(teachers={f's3://{BUCKET}/runs/teacher.pt': target})
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_missing_s3_object_names_the_uri(s3):
    with pytest.raises(FileNotFoundError, match=f's3://{BUCKET}/runs/absent.pt'):
        Distillation(teachers={f's3://{BUCKET}/runs/absent.pt': make_teacher()})
