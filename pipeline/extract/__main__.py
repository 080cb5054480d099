"""``python -m pipeline.extract`` (also under ``torchrun``)."""

import sys

from pipeline.extract.cli import main

sys.exit(main())
