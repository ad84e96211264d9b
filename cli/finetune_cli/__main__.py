"""`python -m finetune_cli`: the same as the `finetune` console script."""

import sys

from finetune_cli.main import main

sys.exit(main())
