"""Child process for the SIGKILL tests in test_robustness.py (not a test module).

Usage: python kill_helper.py DATA_DIR OUTPUT_DIR MODE CONFIG_JSON
MODE "slow_epoch": every item takes 20 ms, so the parent can kill the process mid-epoch.
MODE "slow_save": from epoch 2 on, writing last_checkpoint.pth stops halfway (a marker file says
when), so the parent can kill the process in the middle of the write.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import kidneyseg_utils as ku

data_dir, out, mode, config_json = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
config = ku.Config.from_dict(json.loads(config_json))
data = ku.prepare_data(config, data_dir)

if mode == "slow_epoch":
    original_getitem = ku.KidneyDataset.__getitem__

    def slow_getitem(self, index):
        time.sleep(0.02)
        return original_getitem(self, index)

    ku.KidneyDataset.__getitem__ = slow_getitem
elif mode == "slow_save":
    original_save = torch.save

    def slow_save(obj, handle, *args, **kwargs):
        if obj.get("kind") == "last" and obj.get("epoch", 0) >= 2:
            handle.write(b"PK\x03\x04 half-written checkpoint")
            handle.flush()
            (out / "SAVING").write_text(str(obj["epoch"]))
            time.sleep(60)
        return original_save(obj, handle, *args, **kwargs)

    ku.torch.save = slow_save

model = ku.build_model(config)
ku.train_model(model, data.train_dataset, data.val_dataset, config, out, torch.device("cpu"), progress=False)
