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

Two options fit the step to QSR's rounds, whose lengths and lrs vary by orders of magnitude (docs/outer-optimizer.md):

- ``qsr_outer_momentum_warmup`` W: a sync after optimizer step t uses μ_t = μ min(1, t / W) in place of μ.
- ``qsr_outer_scaling="round_lr"`` (SlowMo's normalisation by the inner lr): with S_r the sum of the lrs of the
  optimizer steps g covers (> 0), d = g / S_r; m = μ_t m + d; u = d + μ_t m (nesterov) or m (sgd);
  θ ← avg + (g - η_out S_r u). S_r = 0 (no lr work: g has no direction to average) takes the plain average and leaves m
  as it was. Without momentum (μ = 0) the scales cancel and the unscaled code path runs: bit for bit ``none``.
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
        round_lr (`bool`, defaults to `False`): ``qsr_outer_scaling="round_lr"`` (:meth:`apply`'s ``work``).
        momentum_warmup (`int`, defaults to 0): W of :meth:`momentum_at`, in optimizer steps.
    """

    nesterov: bool
    lr: float
    momentum: float
    round_lr: bool = False
    momentum_warmup: int = 0

    @classmethod
    def from_config(cls, config: QSRConfig) -> "OuterStep | None":
        """The outer step ``config`` asks for, or `None` for ``qsr_outer_optimizer="none"``."""
        if config.qsr_outer_optimizer == "none":
            return None
        nesterov, scaled = config.qsr_outer_optimizer == "nesterov", config.qsr_outer_scaling == "round_lr"
        return cls(nesterov, config.qsr_outer_lr, config.qsr_outer_momentum, scaled, config.qsr_outer_momentum_warmup)

    def momentum_at(self, step: int) -> float:
        """μ_t = μ min(1, t / W) of a sync after optimizer step ``step`` (μ itself when W = 0 or t >= W)."""
        if step >= self.momentum_warmup:
            return self.momentum
        return self.momentum * (max(0, step) / self.momentum_warmup)

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
        mu: float | None = None,
        work: float | None = None,
    ) -> float:
        """Turn ``averaged`` (fp32, the plain average) into the outer-updated values, in place.

        Args:
            averaged (`torch.Tensor`): the ranks' average; overwritten with the new anchor.
            anchor (`torch.Tensor`): the last synced values (same shape, fp32).
            momentum (`torch.Tensor`, *optional*): the momentum buffer (same shape), `None` when μ = 0.
            scratch (`tuple[torch.Tensor, torch.Tensor]`): two work buffers of at least ``averaged.numel()`` values.
            commit (`bool`): update ``anchor`` and ``momentum`` (a sync); `False` only computes the values (an
                evaluation of the outer-updated model that training does not see).
            mu (`float`, *optional*): the momentum of this sync (:meth:`momentum_at`); default μ.
            work (`float`, *optional*): S_r, the summed inner lrs ``g`` covers, with ``round_lr``; `None`: unscaled.

        Returns:
            `float`: the squared L2 norm of the pseudo-gradient g of this chunk.
        """
        n = averaged.numel()
        g = torch.sub(anchor, averaged, out=scratch[0][:n].view_as(averaged))
        squared = float(torch.dot(g.view(-1), g.view(-1)))
        mu = self.momentum if mu is None else mu
        if momentum is None or self.momentum == 0:
            g.mul_(1 - self.lr)  # g - η g: exactly 0 for η = 1
        elif work is not None and not work > 0:  # S_r = 0: nothing to normalise, the plain average; m as it was
            g.zero_()
        elif work is not None:
            g = self._scaled(averaged, anchor, momentum, scratch, commit, mu, work)
        else:
            if commit:
                m = momentum.mul_(mu).add_(g)
            else:
                m = torch.mul(momentum, mu, out=scratch[1][:n].view_as(averaged)).add_(g)
            if self.nesterov:
                g.mul_(1 - self.lr).sub_(m, alpha=self.lr * mu)  # g - η (g + μ m)
            else:
                g.sub_(m, alpha=self.lr)  # g - η m
        averaged.add_(g)
        if commit:
            anchor.copy_(averaged)
        return squared

    def _scaled(
        self,
        averaged: torch.Tensor,
        anchor: torch.Tensor,
        momentum: torch.Tensor,
        scratch: tuple[torch.Tensor, torch.Tensor],
        commit: bool,
        mu: float,
        work: float,
    ) -> torch.Tensor:
        # round_lr: returns g - η S u in a work buffer; g is computed again rather than kept, so two buffers suffice
        n = averaged.numel()
        d = scratch[0][:n].view_as(averaged).div_(work)  # d = g / S (scratch 0 holds g)
        if commit:
            m = momentum.mul_(mu).add_(d)
        else:
            m = torch.mul(momentum, mu, out=scratch[1][:n].view_as(averaged)).add_(d)
        if self.nesterov:
            u, free = d.add_(m, alpha=mu), scratch[1]  # u = d + μ m; m is no longer needed
        else:
            u, free = m, scratch[0]  # u = m; d is in m already
        step = torch.sub(anchor, averaged, out=free[:n].view_as(averaged))  # g again (same inputs, same bits)
        return step.sub_(u, alpha=self.lr * work)  # g - η S u
