"""`OuterStep`: the outer optimizer a sync can apply to the averaged round change (``qsr_outer_optimizer``).

DiLoCo (Douillard et al. 2023) and SlowMo (Wang et al. 2020) treat the ranks' average as a pseudo-gradient step
rather than the new parameters. With θ the last synced parameters (the anchor, equal on every rank) and avg the
plain average of the ranks' parameters at the end of a round:

    g = θ - avg                       (the averaged round change, sign as a gradient)
    m = μ m + g                       (momentum buffer; torch.optim.SGD's convention, m starts at 0)
    u = g + μ m  (nesterov)   or   m  (sgd, heavy ball)
    θ ← θ - η_out u                   (the new anchor; every rank takes it)

Computed as ``θ ← avg + (g - η_out u)`` so that ``sgd`` with η_out = 1 and μ = 0 adds an exact zero to the plain
average: bit for bit the paper's update. This is the update ``torch.optim.SGD(lr=η_out, momentum=μ,
nesterov=...)`` takes on θ with gradient g, which is what DiLoCo's reference implementations call. The outer step is
not in the QSR paper; QSR decides *when* a round ends, the outer step *what* a sync does with it.
"""

from dataclasses import dataclass

import torch

from qsr_hf.core.config import QSRConfig


@dataclass(frozen=True)
class OuterStep:
    """One outer optimizer's settings and its update of one chunk of values (pure tensor arithmetic).

    Args:
        nesterov (`bool`): Nesterov momentum (DiLoCo) rather than heavy ball (SlowMo).
        lr (`float`): outer learning rate η_out (DiLoCo: 0.7).
        momentum (`float`): outer momentum μ in [0, 1) (DiLoCo: 0.9); 0 keeps no momentum buffer.
    """

    nesterov: bool
    lr: float
    momentum: float

    @classmethod
    def from_config(cls, config: QSRConfig) -> "OuterStep | None":
        """The outer step ``config`` asks for, or `None` for ``qsr_outer_optimizer="none"``."""
        if config.qsr_outer_optimizer == "none":
            return None
        return cls(config.qsr_outer_optimizer == "nesterov", config.qsr_outer_lr, config.qsr_outer_momentum)

    @property
    def state_tensors(self) -> int:
        """fp32 tensors of the model's size this optimizer keeps besides the anchor (1 with momentum, else 0)."""
        return int(self.momentum > 0)

    @torch.no_grad()
    def apply(
        self,
        averaged: torch.Tensor,
        anchor: torch.Tensor,
        momentum: torch.Tensor | None,
        scratch: tuple[torch.Tensor, torch.Tensor],
        commit: bool,
    ) -> float:
        """Turn ``averaged`` (fp32, the plain average) into the outer-updated values, in place.

        Args:
            averaged (`torch.Tensor`): the ranks' average; overwritten with the new anchor.
            anchor (`torch.Tensor`): the last synced values (same shape, fp32).
            momentum (`torch.Tensor`, *optional*): the momentum buffer (same shape), `None` when μ = 0.
            scratch (`tuple[torch.Tensor, torch.Tensor]`): two work buffers of at least ``averaged.numel()`` values.
            commit (`bool`): update ``anchor`` and ``momentum`` (a sync); `False` only computes the values (an
                evaluation of the outer-updated model that training does not see).

        Returns:
            `float`: the squared L2 norm of the pseudo-gradient g of this chunk.
        """
        n = averaged.numel()
        g = torch.sub(anchor, averaged, out=scratch[0][:n].view_as(averaged))
        squared = float(torch.dot(g.view(-1), g.view(-1)))
        if momentum is None or self.momentum == 0:
            g.mul_(1 - self.lr)  # g - η g: exactly 0 for η = 1
        else:
            if commit:
                m = momentum.mul_(self.momentum).add_(g)
            else:
                m = torch.mul(momentum, self.momentum, out=scratch[1][:n].view_as(averaged)).add_(g)
            if self.nesterov:
                g.mul_(1 - self.lr).sub_(m, alpha=self.lr * self.momentum)  # g - η (g + μ m)
            else:
                g.sub_(m, alpha=self.lr)  # g - η m
        averaged.add_(g)
        if commit:
            anchor.copy_(averaged)
        return squared
