"""Teacher checkpoints at object-store URIs, read from a real S3-compatible server on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from conftest import free_port, make_teacher

from composer_kd import Distillation

BUCKET = 'teachers'


@pytest.fixture(scope='module')
def s3_endpoint():
    """moto's S3 server in its own process, on 127.0.0.1 only, stopped after the module's tests."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name('moto_server')), '-H', '127.0.0.1', '-p', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(('127.0.0.1', port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError('moto_server did not start') from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    # Composer's S3ObjectStore reads these; the credentials are moto's dummies.
    for key, value in {
        'S3_ENDPOINT_URL': s3_endpoint,
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client('s3', endpoint_url=s3_endpoint)
    if BUCKET not in [b['Name'] for b in client.list_buckets().get('Buckets', [])]:
        client.create_bucket(Bucket=BUCKET)
    return client


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
