"""Recipes on token sequences in MosaicML Streaming (MDS) shards: a tiny dataset written here with MDSWriter,
read from a folder and from a loopback S3 server, checked before anything trains, and the loss a run reports
recomputed apart from the run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import S3_BUCKET

from composer_kd.recipes import RecipeError, build_run, load_recipe
from composer_kd.run.reporting import format_summary

VOCAB = 16
RUN = ['progress_bar=false', 'device=cpu', 'max_duration=10ba', 'eval_interval=10ba', 'baseline=true']
STUDENT = '{kind: hf_config, name: gpt2, kwargs: {n_layer: 1, n_embd: 16, n_head: 2}}'
TEACHER = '{kind: hf_config, name: gpt2, kwargs: {n_layer: 1, n_embd: 32, n_head: 2}, train: {max_duration: 10ba}}'


def sequences(n: int, seed: int) -> list[np.ndarray]:
    """Counting sequences: from a random start, each token is the previous plus a fixed step (mod VOCAB), of
    random lengths 6 to 14 (some longer than the 12 positions a recipe keeps, some shorter)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, step, length = rng.integers(VOCAB), rng.choice([1, 3]), rng.integers(6, 15)
        out.append(((start + step * np.arange(length)) % VOCAB).astype(np.int64))
    return out


def write_mds(root: Path, column: str = 'tokens', splits=(('train', 48, 0), ('val', 10, 1))) -> dict:
    """MDS shards of each split under ``root/<split>``, as llm-foundry writes token sequences."""
    from streaming import MDSWriter

    written = {}
    for split, n, seed in splits:
        data = sequences(n, seed)
        encoding = 'bytes' if column == 'tokens' else 'ndarray:int64'
        with MDSWriter(out=str(root / split), columns={column: encoding}, size_limit=1 << 10) as writer:
            for ids in data:
                writer.write({column: ids.tobytes() if column == 'tokens' else ids})
        written[split] = data
    return written


def write_recipe(tmp_path, mds: str, student: str = STUDENT, teacher: str = TEACHER) -> str:
    path = tmp_path / 'recipe.yaml'
    path.write_text(
        f'student: {student}\nteachers: [{teacher}]\n'
        f'data: {{name: mds, batch_size: 8, eval_batch_size: 4, mds: {mds}}}\noptimizer: {{name: Adam, lr: 0.01}}\n'
    )
    return str(path)


def mean_next_token_loss(model, data: list[np.ndarray], max_seq_len: int) -> float:
    """Cross-entropy per predicted token (nats) of the Hugging Face model inside ``model``, over every sequence
    cut to ``max_seq_len``, written out here apart from the run's loaders and metrics."""
    hf = model.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in data:
            ids = torch.as_tensor(ids[:max_seq_len])[None]
            log_probs = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total -= log_probs.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return total / count


def test_a_recipe_on_local_mds_shards_reports_the_loss_computed_apart(tmp_path):
    written = write_mds(tmp_path / 'mds')
    run = build_run(
        load_recipe(write_recipe(tmp_path, f'{{path: {tmp_path / "mds"}, vocab_size: 16, max_seq_len: 12}}'), RUN)
    )
    assert run.data.task.modality == 'lm' and len(run.data.train) == 48 and len(run.data.splits['val']) == 10
    example = run.data.splits['val'][0]
    length = min(len(written['val'][0]), 12)
    assert example['input_ids'][:length].tolist() == written['val'][0][:length].tolist()
    assert example['attention_mask'].sum() == length and (example['labels'][length:] == -100).all()
    summary = run.fit()
    assert [m.role for m in summary.models] == ['teacher 0', 'student (distilled)', 'student alone']
    assert summary.split == 'val' and summary.metric == 'LanguageCrossEntropy'
    reported = summary.value('student (distilled)')
    assert reported == pytest.approx(mean_next_token_loss(run.student, written['val'], 12), rel=1e-4)
    perplexity = summary.value('student (distilled)', 'LanguagePerplexity')
    assert perplexity == pytest.approx(np.exp(reported), rel=1e-4)
    # Something was learned: the counting rule is far below the uniform guess's loss.
    assert reported < np.log(VOCAB)
    # Lower is better: the ratio is the share of the teacher's lead closed, and losses are shown as numbers.
    teacher, alone = summary.value('teacher 0'), summary.value('student alone')
    assert teacher < alone
    assert summary.ratios['LanguageCrossEntropy'] == pytest.approx((reported - alone) / (teacher - alone))
    assert f'{reported:.4f}' in format_summary(summary) and '%' not in format_summary(summary).split('\n')[3]


def test_mds_problems_are_named_before_anything_trains(tmp_path):
    write_mds(tmp_path / 'mds', column='input_ids', splits=(('train', 8, 0),))
    recipe = write_recipe(tmp_path, f'{{path: {tmp_path / "mds"}, column: tokens, max_seq_len: 1}}')
    message = str(pytest.raises(RecipeError, build_run, load_recipe(recipe, RUN)).value)
    assert 'data.mds.max_seq_len: expected an integer >= 2' in message
    assert (
        f"data.mds.path: split 'val' is not an MDS dataset: no index at {tmp_path / 'mds' / 'val' / 'index.json'}"
        in message
    )
    assert "data.mds.column: split 'train' has no column 'tokens' of token ids; its columns: input_ids" in message
    assert 'data.mds.vocab_size: required for a student built from a config' in message
    recipe = write_recipe(tmp_path, f'{{path: {tmp_path / "mds"}, vocab_size: 16}}', student='{kind: mlp}')
    message = str(pytest.raises(RecipeError, build_run, load_recipe(recipe, RUN)).value)
    assert 'student.kind: a mlp model cannot learn token sequences' in message


def test_token_ids_beyond_a_models_vocabulary_and_too_long_sequences_are_refused(tmp_path):
    write_mds(tmp_path / 'mds', column='input_ids', splits=(('train', 8, 0), ('val', 4, 1)))
    small = '{kind: hf_config, name: gpt2, kwargs: {n_layer: 1, n_embd: 16, n_head: 2, vocab_size: 8}}'
    recipe = write_recipe(tmp_path, f'{{path: {tmp_path / "mds"}, vocab_size: 16, max_seq_len: 12}}', student=small)
    message = str(pytest.raises(RecipeError, build_run, load_recipe(recipe, RUN)).value)
    assert 'student: its vocabulary has 8 ids but the data hold token id 15' in message
    short = '{kind: hf_config, name: gpt2, kwargs: {n_layer: 1, n_embd: 16, n_head: 2, n_positions: 8}}'
    recipe = write_recipe(tmp_path, f'{{path: {tmp_path / "mds"}, vocab_size: 12, max_seq_len: 12}}', student=short)
    message = str(pytest.raises(RecipeError, build_run, load_recipe(recipe, RUN)).value)
    assert 'data.mds.vocab_size: the data hold token id 15' in message
    assert 'data.mds.max_seq_len: 12 tokens, but student has 8 positions' in message


def test_a_recipe_reads_mds_shards_from_an_s3_uri(s3, tmp_path):
    written = write_mds(tmp_path / 'mds', splits=(('train', 16, 0), ('val', 4, 1)))
    for folder, _, files in os.walk(tmp_path / 'mds'):
        for name in files:
            local = Path(folder) / name
            s3.upload_file(str(local), S3_BUCKET, f'tokens/{local.relative_to(tmp_path / "mds")}')
    cache = tmp_path / 'cache'
    mds = f'{{path: "s3://{S3_BUCKET}/tokens", cache: {cache}, vocab_size: 16, max_seq_len: 12}}'
    run = build_run(load_recipe(write_recipe(tmp_path, mds), [*RUN, 'baseline=false']))
    assert len(run.data.train) == 16
    assert run.data.splits['val'][3]['input_ids'][:6].tolist() == written['val'][3][:6].tolist()
    assert (cache / 'val' / 'index.json').is_file()  # downloaded from the store to the cache
    missing = f'{{path: "s3://{S3_BUCKET}/absent", cache: {cache}, vocab_size: 16}}'
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, missing), RUN)).value)
    assert (
        f"data.mds.path: split 'train' is not an MDS dataset: no index at s3://{S3_BUCKET}/absent/train/index.json"
        in message
    )
