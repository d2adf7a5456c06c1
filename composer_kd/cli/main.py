"""The ``composer-kd`` command: ``demo``, ``train``, ``recipes`` and ``teacher-signal``.

Heavy imports (torch, Composer, transformers) happen inside the subcommands, so ``--help`` answers at once.
Nothing here downloads: the Hugging Face libraries are put in offline mode before they are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Optional

__all__ = ['build_parser', 'main']

_OVERRIDES_HELP = (
    'key=value overrides of the recipe, as OmegaConf dot-lists write them: distillation.temperature=2, '
    'max_duration=5ep, teachers.0.checkpoint=teacher.pt, data.eval_splits=[val,test]'
)


def _offline() -> None:
    """Make every Hugging Face library refuse the network; recipes read local files only."""
    for name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE'):
        os.environ.setdefault(name, '1')


def _quiet() -> None:
    """Keep library chatter out of the way of the progress bar and the summary; errors still show."""
    import logging

    warnings.filterwarnings('ignore', category=UserWarning)
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    for name in ('composer', 'transformers', 'torch'):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from composer_kd.recipes.loader import RecipeError, builtin_recipes, resolve_recipe_source

    if args.name:
        try:
            path = resolve_recipe_source(args.name)
        except RecipeError as e:
            print(e, file=sys.stderr)
            return 2
        with open(path) as f:
            print(f.read(), end='')
        return 0
    from omegaconf import OmegaConf

    recipes = builtin_recipes()
    width = max(len(name) for name in recipes)
    folder = os.path.dirname(next(iter(recipes.values())))
    for name, path in recipes.items():
        description = OmegaConf.load(path).get('description', '')
        print(f'{name.ljust(width)}  {description}')
    print(f'\nRun one with `composer-kd train NAME`, print one with `composer-kd recipes NAME`; files in {folder}.')
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    _offline()
    _quiet()
    from composer_kd.recipes import RecipeError, build_run, load_recipe
    from composer_kd.run.reporting import format_summary

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run = build_run(recipe, source=args.recipe)
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('Interrupted while the recipe was being built: nothing was trained or saved.', file=sys.stderr)
        return 130
    teachers = ', '.join(
        f'teacher {i} ' + ('trained first' if t is not None else 'given') for i, t in enumerate(run.teacher_trainers)
    )
    print(
        f'Recipe {recipe.name}: {teachers}; student {"distilled" if recipe.distillation.enabled else "alone"}'
        + (', then the student alone for comparison' if recipe.baseline and recipe.distillation.enabled else '')
        + f'; {recipe.max_duration}, seed {recipe.seed}.'
    )
    if args.dry_run:
        print('Dry run: the recipe is valid and every trainer is built; nothing was trained.')
        return 0
    from composer_kd.recipes.run_folder import resume_command

    run.resume_command = resume_command(args.recipe, args.overrides, recipe.overwrite)
    try:
        summary = run.fit()
    except KeyboardInterrupt:
        return 130  # the run has said where its checkpoints are and how to resume it
    print()
    print(format_summary(summary))
    print(
        f'command wall time: {time.perf_counter() - started:.1f} s (reading, checking and building the recipe included)'
    )
    if args.summary_json:
        with open(args.summary_json, 'w') as f:
            json.dump(asdict(summary), f, indent=2)
        print(f'summary written to {args.summary_json}')
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _offline()
    _quiet()
    from composer_kd.cli.demo import DEFAULT_SEEDS, run_demo, run_sweep
    from composer_kd.recipes import RecipeError

    seeds = list(range(args.seeds)) if args.seeds is not None else list(DEFAULT_SEEDS)
    if not seeds:
        print('--seeds must be at least 1.', file=sys.stderr)
        return 2
    try:
        if args.sweep:
            run_sweep(args.output_dir, seeds=seeds if args.seeds is not None else (0, 1, 2), overrides=args.overrides)
        else:
            run_demo(args.output_dir, seeds=seeds, overrides=args.overrides)
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


_SIGNAL_OPTIONS = {
    'teacher': None,
    'tokens': None,
    'out': None,
    'k': 32,
    'dtype': 'float16',
    'batch_size': 8,
    'sequences_per_part': 1024,
    'local_dir': None,
    'student': None,
    'student_vocab_size': None,
    'tokenizer': None,
    'device': 'cpu',
    'trust_remote_code': False,
}


def _signal_options(args: argparse.Namespace) -> dict:
    """The options of ``teacher-signal``: a YAML file's keys (if given), overridden by the command line's."""
    options = dict(_SIGNAL_OPTIONS)
    if args.recipe:
        from omegaconf import OmegaConf

        if not os.path.isfile(args.recipe):
            raise FileNotFoundError(f'teacher-signal: no such options file: {args.recipe}')
        loaded = OmegaConf.to_container(OmegaConf.load(args.recipe), resolve=True)
        unknown = sorted(set(loaded) - set(options)) if isinstance(loaded, dict) else ['<not a mapping>']
        if unknown:
            raise ValueError(f'teacher-signal: unknown keys in {args.recipe}: {unknown}; known: {sorted(options)}')
        options.update(loaded)
    options.update({key: value for key, value in vars(args).items() if key in options and value is not None})
    missing = [f'--{key.replace("_", "-")}' for key in ('teacher', 'tokens', 'out') if not options[key]]
    if missing:
        raise ValueError(f'teacher-signal: {", ".join(missing)} must be given (on the command line or in the file).')
    return options


def _cmd_teacher_signal(args: argparse.Namespace) -> int:
    _offline()
    _quiet()
    try:
        options = _signal_options(args)
        from composer_kd.cli.teacher_signal import run_teacher_signal

        summary = run_teacher_signal(**options, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(e, file=sys.stderr)
        return 2
    print(
        f'Teacher signal written to {summary.out}: {summary.sequences} sequences, {summary.positions} positions, '
        f'top {summary.k} of {summary.vocab_size} in {summary.value_dtype} ({summary.parts_written} parts written, '
        f'{summary.parts_skipped} already complete).'
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``composer-kd`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog='composer-kd',
        description='Knowledge distillation with MosaicML Composer: a demo, and recipes run by a Composer Trainer.',
    )
    commands = parser.add_subparsers(dest='command', required=True, metavar='{demo,train,recipes,teacher-signal}')

    demo = commands.add_parser(
        'demo',
        help='teacher vs student alone vs distilled student on scikit-learn digits (offline, CPU, minutes)',
        description=(
            'Train a CNN teacher, then a small MLP student on 10 labels per class, alone and distilled, with '
            "identical data, budget and seeds, on scikit-learn's bundled digits (no download). Prints a table "
            '(accuracy mean ± std over seeds on a held-out test split, distillation ratio, inference speed-up, '
            'wall time) and writes report.json and accuracy.png into the output folder.'
        ),
    )
    demo.add_argument('--output-dir', help='where report.json and accuracy.png go (default: ./outputs/demo-<time>)')
    demo.add_argument('--seeds', type=int, help='number of seeds, 0..N-1 (default: 5; 3 for --sweep)')
    demo.add_argument(
        '--sweep',
        action='store_true',
        help='instead, repeat the validation search behind the recipe settings (about 5 minutes; writes sweep.json)',
    )
    demo.add_argument(
        'overrides',
        nargs='*',
        metavar='key=value',
        help='overrides of the digits recipe (see `composer-kd recipes digits`), as OmegaConf dot-lists write them: '
        'max_duration=100ba, distillation.temperature=2, data.digits.per_class=5',
    )
    demo.set_defaults(func=_cmd_demo)

    train = commands.add_parser(
        'train',
        help='run a recipe (a YAML file or a built-in name) with an ordinary Composer Trainer',
        description=(
            'Check the recipe (unknown keys, types, names, files; every problem is listed and nothing is trained '
            'if there is one), train the teachers it trains first, then distill the student with a Composer '
            'Trainer (progress bar on), and print a summary. A save_folder that is not empty is refused '
            '(overwrite=true replaces the run it holds, resume=true continues it); on Ctrl-C the run says where its '
            'checkpoints are and prints the command that resumes it.'
        ),
    )
    train.add_argument(
        'recipe', help='a recipe YAML file, or the name of a built-in recipe (see `composer-kd recipes`)'
    )
    train.add_argument('overrides', nargs='*', metavar='key=value', help=_OVERRIDES_HELP)
    train.add_argument('--dry-run', action='store_true', help='check the recipe and build every trainer, train nothing')
    train.add_argument('--summary-json', metavar='PATH', help='also write the summary as JSON to PATH')
    train.set_defaults(func=_cmd_train)

    recipes = commands.add_parser(
        'recipes',
        help='list the built-in recipes, one line each (or print one)',
        description='List the recipes shipped with composer-kd, or print the YAML of one to copy and edit.',
    )
    recipes.add_argument('name', nargs='?', help='print this recipe instead of listing them')
    recipes.set_defaults(func=_cmd_recipes)

    signal = commands.add_parser(
        'teacher-signal',
        help='run a teacher once over token sequences and write its top-k logits as MosaicML Streaming shards',
        description=(
            "Run a causal LM teacher once over token sequences (an MDS folder with a 'tokens' column, as llm-foundry "
            "writes them, or a .pt/.npy [N, L] array) and write, next to the token ids, each position's top-k "
            'logits, their packed indices and the log of the remaining mass as MDS shards, to a folder or an '
            'object-store URI. Rerun with the same options to resume an interrupted run.'
        ),
    )
    signal.add_argument('recipe', nargs='?', help='a YAML file of these options (the command line overrides it)')
    signal.add_argument('--teacher', help='a local Hugging Face causal LM folder (config.json and weights)')
    signal.add_argument('--tokens', help="token sequences: an MDS folder with a 'tokens' column, or a .pt/.npy file")
    signal.add_argument('--out', help='output folder or object-store URI (s3://bucket/path)')
    signal.add_argument('--k', type=int, help='logits kept per position (default: 32)')
    signal.add_argument('--dtype', choices=['float16', 'bfloat16'], help='precision of the kept logits')
    signal.add_argument('--batch-size', type=int, help='sequences per teacher forward pass (default: 8)')
    signal.add_argument('--sequences-per-part', type=int, help='sequences per resumable part (default: 1024)')
    signal.add_argument('--local-dir', help='with a URI --out, the local staging folder (keep it to resume)')
    signal.add_argument('--student', help="the student's Hugging Face folder or config.json: vocabularies must match")
    signal.add_argument('--student-vocab-size', type=int, help="the student's vocabulary size, instead of --student")
    signal.add_argument('--tokenizer', help='the tokenizer folder that made the tokens: checked against the teacher')
    signal.add_argument('--device', help='where the teacher runs (default: cpu)')
    signal.add_argument(
        '--trust-remote-code',
        action='store_true',
        default=None,
        help='load a teacher folder that ships its own model code (config.json auto_map) with that code; it runs '
        "the folder's Python files",
    )
    signal.add_argument('--no-progress', action='store_true', help='no progress bar')
    signal.set_defaults(func=_cmd_teacher_signal)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``composer-kd`` with ``argv`` (default: the command line); returns the exit status.

    Exit status: 0 on success, 2 for a recipe or usage error (the message says what to fix), 130 when a run is
    interrupted (Ctrl-C; the message says where its checkpoints are and the command that resumes it).
    """
    parser = build_parser()
    # Overrides may come after flags too (`train r.yaml --dry-run a=1`), which argparse's positional `nargs='*'`
    # does not take: collect the leftover key=value items here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith('-') or '=' not in a or not hasattr(args, 'overrides')]
    if stray:
        parser.error(f'unrecognized arguments: {" ".join(stray)}')
    if extra:
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args))


if __name__ == '__main__':
    sys.exit(main())
