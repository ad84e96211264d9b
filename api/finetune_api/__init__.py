"""The FineTuneJob API: its schema (the single source of truth), validation and typed model.

Light on purpose: the operator and the trainer both import it, so it must not pull in
torch, ray or kopf.
"""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
API_VERSION = f"{GROUP}/{VERSION}"
