"""The FineTuneJob operator (kopf). Never imports torch, deepspeed or transformers."""
