"""The trainer: runs a FineTuneJob on Ray Train with DeepSpeed ZeRO or FSDP."""
