"""`python -m finetune_trainer`: the same as the `finetune-train` console script."""

from finetune_trainer.entrypoint import main

raise SystemExit(main())
