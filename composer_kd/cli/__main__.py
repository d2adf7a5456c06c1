"""``python -m composer_kd.cli``."""

import sys

from composer_kd.cli.main import main

if __name__ == '__main__':
    sys.exit(main())
