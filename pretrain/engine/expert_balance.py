"""The mixture of experts' balance at each optimizer step (model.moe): the tokens each expert received
over the step, summed over the micro-batches and all-reduced over the ranks, move the expert bias
(pretrain/model/moe.py's update_expert_bias, outside autograd, the same on every rank, so the biases
stay equal without a broadcast) and feed the per-layer load metrics of the log window:

  moe_load/<layer>  tokens per expert, max / mean, over the window (1 is perfect balance)
  moe_idle/<layer>  share of the layer's experts that received no token in the window
  moe_bias/<layer>  the expert bias's range (max - min) at the end of the window
  moe_loss          the routers' auxiliary + z-loss, mean over the window's micro-batches (when on)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.model.moe import routers, take_load, update_expert_bias


class ExpertBalance:
    def __init__(self, model: torch.nn.Module, device):
        blocks = model.transformer.blocks
        self.layers = [i for i, b in enumerate(blocks) if b.moe is not None]
        self.routers = routers(model)
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.load = None
        self.loss_sum, self.loss_n = 0.0, 0

    def add_loss(self, loss) -> None:
        if isinstance(loss, torch.Tensor):
            self.loss_sum += loss.detach().float().item()
            self.loss_n += 1

    def end_step(self) -> None:
        if not self.routers:
            return
        load = take_load(self.routers, self.device)
        dist.all_reduce(load)
        update_expert_bias(self.routers, load)
        self.load = load if self.load is None else self.load + load

    def summary(self) -> dict:
        """The window's metrics, and the window reset (every rank holds the same all-reduced numbers)."""
        out = {}
        if self.load is not None:
            for layer, n, r in zip(self.layers, self.load, self.routers, strict=True):
                out[f"moe_load/{layer}"] = float(n.max() / n.mean().clamp(min=1e-9))
                out[f"moe_idle/{layer}"] = float((n == 0).float().mean())
                out[f"moe_bias/{layer}"] = float(r.expert_bias.max() - r.expert_bias.min())
        if self.loss_n:
            out["moe_loss"] = self.loss_sum / self.loss_n
        self.reset()
        return out


def keep_bias_fp32(model: torch.nn.Module) -> None:
    """The expert bias moves by ~1e-3 a step: bf16 (which the engine may cast buffers to) would round it away."""
    for r in routers(model):
        r.expert_bias.data = r.expert_bias.data.float()
