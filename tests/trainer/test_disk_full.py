"""A checkpoint saved onto a full disk (a real 1 MiB tmpfs as the temp directory) fails in one
line naming the path and the cause, and leaves no staging directory behind."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from finetune_trainer import checkpointing
from finetune_trainer.errors import StorageError


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        # lazily: torch may still hold the file it failed to write until garbage collection
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


class TorchSave:
    """What both strategies' save_checkpoint() comes down to: torch.save of state into the directory."""

    def save_checkpoint(self, directory: str, tag: str) -> None:
        import torch

        os.makedirs(os.path.join(directory, tag))
        torch.save({"weights": torch.zeros(1 << 20)}, os.path.join(directory, tag, "model_states.pt"))  # 4 MiB


def test_checkpoint_on_a_full_disk_names_the_path_and_cleans_up(tiny_disk, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_disk))
    with pytest.raises(StorageError) as info:
        checkpointing.save(TorchSave(), checkpointing.TrainerState(step=3), rank=0, world=1, metrics={},
                           dir_name="checkpoint_step00000003_x", upload_mode=None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write the checkpoint at step 3 to {tiny_disk}/finetune-ckpt-rank0-"
                              f"{os.getpid()}-"), message
    assert "no space left on device" in message.lower(), message
    assert os.listdir(tiny_disk) == []  # the staging directory went with the failure
