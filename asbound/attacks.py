"""Projected gradient ascent (PGD) with a pluggable objective and norm geometry.

Madry et al. (2018), "Towards Deep Learning Models Resistant to Adversarial Attacks", with the
semantics of foolbox's ``LinfPGD`` / ``L2PGD`` (Rauber et al. 2017, 2020):

* step ``alpha = rel_step * eps``; L-inf steps along ``sign(grad)``, L2 along ``grad / ||grad||_2``;
* random start uniform in the ball (L-inf: per coordinate; L2: uniform in the n-ball),
  clipped to ``[0, 1]``;
* after each step: project onto ``B_p(x0, eps)``, then clip to ``[0, 1]``.

Tensor shapes: ``x`` is ``[N, C, H, W]`` (any ``[N, ...]``) in ``[0, 1]``; an objective maps a
batch ``x'`` to per-example values ``[N]`` that the attack *maximises*.

Every iterate lies in the threat set, so each one gives a valid lower bound on the maximum of
the objective. ``select="best"`` (default) keeps the best iterate per example over all steps and
restarts; ``select="last"`` returns foolbox's last iterate. Only input gradients are taken
(``torch.autograd.grad``); the caller freezes parameters (:func:`asbound.models.frozen`).

The objective ``||g(x') - g(x)||_2`` has zero gradient at ``x' = x``: without a random start it
never moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from asbound.errors import ConfigError

Objective = Callable[[Tensor], Tensor]


class Geometry(Protocol):
    """The norm-specific parts of PGD (foolbox's override points)."""

    def random_start(self, x0: Tensor, eps: float, generator: torch.Generator) -> Tensor: ...

    def direction(self, grad: Tensor) -> Tensor: ...

    def project(self, delta: Tensor, eps: float) -> Tensor: ...

    def norm(self, delta: Tensor) -> Tensor: ...


def _rand(shape: "tuple[int, ...]", like: Tensor, generator: torch.Generator, normal: bool) -> Tensor:
    # drawn on the CPU generator so that results do not depend on the device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


class LinfGeometry:
    """``||x' - x||_inf <= eps``."""

    def random_start(self, x0: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        return (2.0 * _rand(tuple(x0.shape), x0, generator, normal=False) - 1.0) * eps

    def direction(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def project(self, delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)


class L2Geometry:
    """``||x' - x||_2 <= eps``."""

    def random_start(self, x0: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        n, d = x0.shape[0], x0[0].numel()
        # uniform in the d-ball: the first d coordinates of a uniform point on the (d+1)-sphere
        s = _rand((n, d + 2), x0, generator, normal=True)
        s = s / torch.linalg.vector_norm(s, dim=1, keepdim=True)
        return eps * s[:, :d].reshape(x0.shape)

    def direction(self, grad: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12)
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def project(self, delta: Tensor, eps: float) -> Tensor:
        norms = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
        factor = torch.clamp(eps / norms, max=1.0)
        return delta * factor.view(-1, *([1] * (delta.dim() - 1)))

    def norm(self, delta: Tensor) -> Tensor:
        return torch.linalg.vector_norm(delta.flatten(1), dim=1)


GEOMETRIES: "dict[str, Geometry]" = {"inf": LinfGeometry(), "2": L2Geometry()}


@dataclass(frozen=True)
class AttackResult:
    """The adversarial inputs ``[N, ...]`` and the objective's value there ``[N]``."""

    x_adv: Tensor
    value: Tensor


@dataclass(frozen=True)
class PGD:
    """PGD maximising an objective over ``B_norm(x, eps) ∩ [0, 1]^d``.

    Args:
        eps: radius in pixel units, in ``[0, 1]``.
        norm: ``"inf"`` or ``"2"``.
        steps: gradient steps (seed default 20; dSprites runs use 50).
        rel_step: step size relative to eps (seed default 0.7; foolbox's default is 0.01/0.3 for
            L-inf, which barely leaves the random start).
        random_start: start uniformly in the ball (needed for the representation objective).
        restarts: independent random starts; the best per example is kept.
        select: ``"best"`` iterate per example, or ``"last"`` (foolbox semantics).
    """

    eps: float
    norm: str = "inf"
    steps: int = 20
    rel_step: float = 0.7
    random_start: bool = True
    restarts: int = 1
    select: str = "best"

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0.0 <= self.eps <= 1.0):
            raise ConfigError(f"eps {self.eps!r} is outside [0, 1]; eps is in pixel units, e.g. 8/255")
        if self.norm not in GEOMETRIES:
            raise ConfigError(f"norm {self.norm!r} is not supported; valid: {', '.join(GEOMETRIES)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be a whole number >= 0, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ConfigError(f"restarts must be a whole number >= 1, got {self.restarts!r}")
        if not (math.isfinite(self.rel_step) and self.rel_step > 0):
            raise ConfigError(f"rel_step must be > 0, got {self.rel_step!r}")
        if self.select not in ("best", "last"):
            raise ConfigError(f"select must be 'best' or 'last', got {self.select!r}")

    @property
    def geometry(self) -> Geometry:
        return GEOMETRIES[self.norm]

    def __call__(
        self,
        objective: Objective,
        x: Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        start: Optional[Tensor] = None,
    ) -> AttackResult:
        """Run the attack on the batch ``x``.

        ``generator`` (a CPU ``torch.Generator``) makes the random starts reproducible;
        ``start`` gives the first restart's starting point explicitly (tests pin foolbox with it).
        """
        x0 = x.detach()
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if self.eps == 0.0:
            with torch.no_grad():
                return AttackResult(x0.clone(), objective(x0).detach())
        best_x, best_v = None, None
        for restart in range(self.restarts):
            first = start if (restart == 0 and start is not None) else None
            cand_x, cand_v = self._run_once(objective, x0, generator, first)
            if best_x is None:
                best_x, best_v = cand_x, cand_v
            else:
                better = cand_v > best_v
                best_x = torch.where(_expand(better, x0), cand_x, best_x)
                best_v = torch.where(better, cand_v, best_v)
        return AttackResult(best_x, best_v)

    def _run_once(
        self, objective: Objective, x0: Tensor, generator: torch.Generator, start: Optional[Tensor]
    ) -> "tuple[Tensor, Tensor]":
        geo, eps = self.geometry, float(self.eps)
        alpha = self.rel_step * eps
        if start is not None:
            x_adv = start.detach().clamp(0.0, 1.0)
        elif self.random_start:
            x_adv = (x0 + geo.random_start(x0, eps, generator)).clamp(0.0, 1.0)
        else:
            x_adv = x0.clone()
        best_x = best_v = None
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            value = objective(x_adv)
            (grad,) = torch.autograd.grad(value.sum(), x_adv)
            x_adv = x_adv.detach()
            value = value.detach()
            if self.select == "best":
                best_x, best_v = _keep_best(best_x, best_v, x_adv, value)
            grad = torch.nan_to_num(grad)
            x_adv = x_adv + alpha * geo.direction(grad)
            x_adv = (x0 + geo.project(x_adv - x0, eps)).clamp(0.0, 1.0)
        with torch.no_grad():
            value = objective(x_adv).detach()
        if self.select == "best":
            return _keep_best(best_x, best_v, x_adv, value)
        return x_adv, value


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _keep_best(
    best_x: Optional[Tensor], best_v: Optional[Tensor], x: Tensor, v: Tensor
) -> "tuple[Tensor, Tensor]":
    if best_x is None:
        return x, v
    better = v > best_v
    return torch.where(_expand(better, x), x, best_x), torch.where(better, v, best_v)


# --- objectives -------------------------------------------------------------------------------


def representation_shift(
    features: Callable[[Tensor], Tensor], x0: Tensor, g0: Optional[Tensor] = None
) -> Objective:
    """The AS objective ``||g(x') - g(x0)||_2`` per example (SPEC section 2).

    ``g0`` passes ``g(x0)`` when the caller has it already.
    """
    if g0 is None:
        with torch.no_grad():
            g0 = features(x0)
    g0 = g0.detach().flatten(1)

    def objective(x_adv: Tensor) -> Tensor:
        return torch.linalg.vector_norm(features(x_adv).flatten(1) - g0, dim=1)

    return objective


def loss_objective(
    model: Callable[[Tensor], Tensor], loss: Callable[[Tensor, Tensor], Tensor], targets: Tensor
) -> Objective:
    """The loss ``l(f(x'), y)`` per example (cross-entropy or the Euclidean error)."""

    def objective(x_adv: Tensor) -> Tensor:
        return loss(model(x_adv), targets)

    return objective


# --- foolbox, the reference for PGD semantics --------------------------------------------------


def foolbox_pgd(
    attack: PGD,
    objective: Objective,
    x: Tensor,
    *,
    start: Optional[Tensor] = None,
) -> Tensor:
    """Run foolbox's ``LinfPGD`` / ``L2PGD`` on ``objective`` (last iterate, one restart).

    The objective replaces foolbox's cross-entropy through its ``get_loss_fn`` override point.
    ``start`` fixes the random-start *offset* so that foolbox and :class:`PGD` (whose ``start``
    is the starting point ``x + offset``) can be compared exactly.
    """
    import eagerpy as ep
    import foolbox as fb

    base = fb.attacks.LinfPGD if attack.norm == "inf" else fb.attacks.L2PGD

    class _ObjectivePGD(base):  # type: ignore[misc, valid-type]
        def get_loss_fn(self, model, labels):  # noqa: ANN001, ANN202 - foolbox's signature
            def loss_fn(inputs: "ep.Tensor") -> "ep.Tensor":
                return ep.astensor(objective(inputs.raw).sum())

            return loss_fn

        def get_random_start(self, x0, epsilon):  # noqa: ANN001, ANN202
            if start is not None:  # foolbox's random start is a point, x0 + offset
                return x0 + ep.astensor(start.to(x0.raw.device, x0.raw.dtype))
            return super().get_random_start(x0, epsilon)

    fb_attack = _ObjectivePGD(
        rel_stepsize=attack.rel_step, steps=attack.steps, random_start=attack.random_start or start is not None
    )
    identity = torch.nn.Identity().eval()
    fmodel = fb.PyTorchModel(identity, bounds=(0.0, 1.0), device=x.device)
    dummy = fb.criteria.Misclassification(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
    return fb_attack.run(fmodel, x.detach(), dummy, epsilon=float(attack.eps)).detach()
