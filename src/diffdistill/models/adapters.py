"""Which DiT parameters train (and their EMA): `full`, or DiffFit (Xie et al. 2023) — biases, norm affines, the class
embeddings and a learnable scale γ (init 1) on the attention and feed-forward branch of the first blocks.

γ is applied by forward hooks, so the diffusers model class is not forked. For saving, each γ is folded
into its branch's output projection (γ(Wa + b) = (γW)a + γb), which leaves a plain DiT state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diffdistill.errors import StageError

GAMMA = "difffit_gamma"  # name of the scale factor registered on each adapted branch (folded away on save)


@dataclass
class Trainable:
    names: list[list[str]]  # each trainable model parameter's state-dict names (tied ones have several)
    params: list[nn.Parameter]  # what the optimizer updates: those parameters, then the γs
    # (output weight name, output bias name or None) for each γ, in the order of params[len(names):]
    folds: list[tuple[str, str | None]] = field(default_factory=list)

    def folded_state_dict(self, model: nn.Module, values: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The model's state dict with `values` (default: the live params) for the trainable ones and
        every γ folded in. The live model is not modified."""
        values = [p.detach() for p in self.params] if values is None else values
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(GAMMA)}
        n = len(self.names)
        for aliases, v in zip(self.names, values[:n]):
            for name in aliases:
                state[name] = v.detach().clone()
        for (w_name, b_name), gamma in zip(self.folds, values[n:]):
            state[w_name] = state[w_name] * gamma
            if b_name is not None:
                state[b_name] = state[b_name] * gamma
        return state


class EMA:
    """Exponential moving average of the trainable parameters (frozen ones never change)."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)


def _is_difffit_param(name: str, module: nn.Module) -> bool:
    return name.endswith(".bias") or "class_embedder" in name or isinstance(module, (nn.LayerNorm, nn.GroupNorm))


def make_trainable(model: nn.Module, mode: str, difffit_blocks: int | None = None) -> Trainable:
    """Set requires_grad on `model` for `mode` ("full" | "difffit") and return what to optimize."""
    if mode not in ("full", "difffit"):
        raise StageError(f"finetune.trainable {mode!r}: expected 'full' or 'difffit'")
    modules = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    names, params = [], []
    for name, p in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        p.requires_grad_(mode == "full" or _is_difffit_param(name, owner))
        if p.requires_grad:
            names.append(aliases[id(p)])
            params.append(p)
    out = Trainable(names=names, params=params)
    if mode == "full":
        return out
    blocks = model.transformer_blocks
    n = len(blocks) // 2 if difffit_blocks is None else difffit_blocks
    if not 0 <= n <= len(blocks):
        raise StageError(f"finetune.difffit_blocks {n}: the model has {len(blocks)} blocks")
    linear_names = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    device = next(model.parameters()).device
    for block in blocks[:n]:
        for branch in (block.attn1, block.ff):
            gamma = nn.Parameter(torch.ones((), device=device))
            # a registered parameter, so DistributedDataParallel averages its gradient like any other
            branch.register_parameter(GAMMA, gamma)
            last = [m for m in branch.modules() if isinstance(m, nn.Linear)][-1]  # output projection
            out.folds.append((f"{linear_names[last]}.weight",
                              f"{linear_names[last]}.bias" if last.bias is not None else None))
            branch.register_forward_hook(lambda _m, _i, y, g=gamma: y * g)
            out.params.append(gamma)
    return out
