"""``python -m pipeline.train`` (also under ``torchrun`` and ``accelerate launch``)."""

import sys

from pipeline.train.cli import main

sys.exit(main())
