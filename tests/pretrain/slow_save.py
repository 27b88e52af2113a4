"""Test wrapper: runs `pretrain.train` with DeepSpeed's checkpoint writes of one rank made slow, so a
test can kill the job in the middle of a save. SLOW_SAVE_RANK's torch.save of any file whose path
contains SLOW_SAVE_MATCH sleeps SLOW_SAVE_S seconds first (the other ranks write at full speed)."""

import os
import runpy
import time

from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

_save = torch_checkpoint_engine.TorchCheckpointEngine.save


def slow_save(self, state_dict, path: str):
    if os.environ.get("RANK") == os.environ.get("SLOW_SAVE_RANK", "1") and os.environ["SLOW_SAVE_MATCH"] in path:
        time.sleep(float(os.environ.get("SLOW_SAVE_S", "120")))
    return _save(self, state_dict, path)


torch_checkpoint_engine.TorchCheckpointEngine.save = slow_save
runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)
