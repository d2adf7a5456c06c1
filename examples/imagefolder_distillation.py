"""Distillation from images on disk, all from one YAML recipe: a ResNet-18 teacher into a small CNN.

The digits of scikit-learn (1,797 8x8 images, shipped inside the package: nothing is downloaded) are written out
as PNG files into an ImageFolder tree, ``images/{train,val,test}/<digit>/<n>.png``, the layout torchvision's
``ImageFolder`` reads and most image datasets on disk already have. The recipe ``examples/digits_imagefolder.yaml``
then reads that tree (as RGB, resized to 16x16, with small random shifts and rotations for training), trains a
torchvision ResNet-18 teacher on it, distils it into a CNN of a few thousand parameters, trains the same CNN
alone for comparison, and prints the summary (validation and test accuracy, distillation ratio, speed-up).

Usage::

    python examples/imagefolder_distillation.py --output-dir outputs/imagefolder   # a few minutes on a CPU
    python examples/imagefolder_distillation.py --output-dir outputs/imagefolder --tiny   # seconds: a few steps
    python examples/imagefolder_distillation.py max_duration=20ep distillation.temperature=2   # recipe overrides

Point the recipe at your own images with ``composer-kd train examples/digits_imagefolder.yaml
data.image_folder.folder=/path/to/tree``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from composer_kd.recipes import build_run, load_recipe
from composer_kd.recipes.files import write_digits_images
from composer_kd.run.reporting import RunSummary, format_summary

RECIPE = Path(__file__).resolve().with_name('digits_imagefolder.yaml')
#: A few steps of each model: enough to run every stage.
TINY = ['teachers.0.train.max_duration=4ba', 'max_duration=4ba', 'eval_interval=4ba', 'progress_bar=false']


def main(argv: Optional[list[str]] = None) -> RunSummary:
    """Write the images, run the recipe on them, print and save the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output-dir', default='outputs/imagefolder', help='where images/ and summary.json go')
    parser.add_argument('--tiny', action='store_true', help='a few steps per model, to check that it all runs')
    parser.add_argument('overrides', nargs='*', metavar='key=value', help='overrides of the recipe')
    args = parser.parse_args(argv)

    images = os.path.join(args.output_dir, 'images')
    counts = write_digits_images(images)
    print(f'wrote {", ".join(f"{n} {split}" for split, n in counts.items())} images into {images}')
    overrides = [f'data.image_folder.folder={os.path.abspath(images)}', *(TINY if args.tiny else []), *args.overrides]
    summary = build_run(load_recipe(RECIPE, overrides), source=str(RECIPE)).fit()
    print(format_summary(summary))
    path = os.path.join(args.output_dir, 'summary.json')
    with open(path, 'w') as f:
        json.dump(asdict(summary), f, indent=2)
    print(f'summary written to {path}')
    return summary


if __name__ == '__main__':
    main(sys.argv[1:])
    sys.exit(0)
