"""What every training stage shares: resumable state, a time budget, logging, the LR schedule."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.checkpoint import read_metadata, save_checkpoint
from ..models.edgetalk import EdgeTalkModel


class Run:
    """A training run in a folder: `model.safetensors`, `optim.pt` (tensors only), `log.jsonl`.

    Resuming loads both files; the optimizer file is read with weights_only=True.
    """

    def __init__(self, folder: str | Path, model: EdgeTalkModel, params, lr: float, steps: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        self.base_lr, self.total = lr, steps
        self.step = 0
        self.started = time.time()
        ck, opt = self.folder / "model.safetensors", self.folder / "optim.pt"
        if ck.exists() and opt.exists():
            read_metadata(ck)  # refuses anything that is not an EdgeTalk checkpoint
            missing, _ = model.load_state_dict(load_file(str(ck)), strict=False)
            if missing:  # a layer added since this run began starts from the init checkpoint
                print(f"resume: {len(missing)} tensors not in {ck.name}, kept from init")
            state = torch.load(opt, weights_only=True)
            try:
                self.opt.load_state_dict(state["optim"])
            except ValueError:
                print("resume: optimizer state does not fit the parameters; starting it fresh")
            self.step = int(state["step"])
            print(f"resumed {self.folder} at step {self.step}")

    def lr(self) -> float:
        warm = min(1.0, (self.step + 1) / 200)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, self.step / max(1, self.total))))
        return self.base_lr * warm * (0.05 + 0.95 * cos)

    def update(self, loss: torch.Tensor, clip: float = 1.0) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in self.opt.param_groups for p in g["params"]], clip
        )
        self.opt.step()
        self.step += 1

    def log(self, **values) -> None:
        rec = {"step": self.step, "time_s": round(time.time() - self.started, 1), "lr": self.lr()}
        rec.update({k: round(float(v), 6) for k, v in values.items()})
        with open(self.folder / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)

    def save(self, **info) -> None:
        tmp = self.folder / "model.tmp.safetensors"
        save_checkpoint(self.model, tmp, **info)
        torch.save(
            {"optim": self.opt.state_dict(), "step": self.step}, self.folder / "optim.tmp.pt"
        )
        tmp.replace(self.folder / "model.safetensors")
        (self.folder / "optim.tmp.pt").replace(self.folder / "optim.pt")
