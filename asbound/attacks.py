"""Projected gradient ascent (PGD) with a pluggable objective and norm geometry.

Madry et al. (2018), "Towards Deep Learning Models Resistant to Adversarial Attacks", with the
semantics of foolbox's ``LinfPGD`` / ``L2PGD`` (Rauber et al. 2017, 2020):

* step ``alpha = rel_step * eps``; L-inf steps along ``sign(grad)``, L2 along ``grad / ||grad||_2``;
* random start uniform in the ball (L-inf: per coordinate; L2: uniform in the n-ball),
  clipped to ``[0, 1]``;
* after each step: project onto ``B_p(x0, eps)``, then clip to ``[0, 1]``.

Tensor shapes: ``x`` is ``[N, C, H, W]`` (any ``[N, ...]``) in ``[0, 1]``; an objective maps a
batch ``x'`` to per-example values ``[N]`` that the attack *maximises*.

:class:`Nystrom` is built for the representation objective: it models ``J^T J`` from every
step's gradient and steps to the model's best box vertex.

Every point evaluated lies in the threat set (an explicit ``start`` is projected onto it), so
each one gives a valid lower bound on the maximum of the objective. ``select="best"`` (default)
keeps the best point per example over every step, every restart and the clean input itself
(which lies in the set too); ``select="last"`` returns foolbox's last iterate. Only input
gradients are taken (``torch.autograd.grad``); the caller freezes parameters
(:func:`asbound.models.frozen`).

A :class:`Watch` sees every point an objective is evaluated at: the largest representation
shift, the largest loss and whether any evaluated point is misclassified, per example. ``score``
judges robustness and the sensitivity estimate by it, whatever point the attack keeps.

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
    """The adversarial inputs ``[N, ...]`` and the objective's value there ``[N]`` (``None`` when the
    caller asked for the point only)."""

    x_adv: Tensor
    value: Optional[Tensor]


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
        if self.norm not in GEOMETRIES:
            raise ConfigError(f"norm {self.norm!r} is not supported; valid: {', '.join(GEOMETRIES)}")
        top = 1.0 if self.norm == "inf" else math.inf  # an L2 radius may exceed 1
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0.0 <= self.eps <= top):
            raise ConfigError(f"eps {self.eps!r} is outside [0, {top:g}] for L{self.norm}; eps is in pixel units, e.g. 8/255")
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
        clean_value: Optional[Tensor] = None,
        value: bool = True,
        fast: Optional["FastObjective"] = None,
    ) -> AttackResult:
        """Run the attack on the batch ``x``.

        ``generator`` (a CPU ``torch.Generator``) makes the random starts reproducible;
        ``start`` gives the first restart's starting point explicitly (tests pin foolbox with it);
        it is projected onto the threat set like every iterate. With ``select="best"`` the clean
        input is a candidate too; ``clean_value`` passes the objective there when the caller has
        it (else it is evaluated once). ``value=False``: the caller needs only the point (a training
        attack): with ``select="last"`` and one restart the objective is not evaluated again at the
        last iterate, which saves a forward pass, and the result's value is ``None``.

        ``fast`` (a :class:`FastObjective`: the same objective in low precision and/or compiled)
        takes every gradient step; each restart's kept iterate is then re-evaluated by
        ``objective`` in float32, so the returned value is a float32 evaluation at a point of the
        threat set (a valid lower bound) and a watch on ``objective`` sees only those points.
        """
        x0 = x.detach()
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        best_x = best_v = None
        if self.select == "best" or self.eps == 0.0:
            if clean_value is None:
                with torch.no_grad():
                    clean_value = objective(x0)
            best_x, best_v = x0.clone(), clean_value.detach()
        if self.eps == 0.0:
            return AttackResult(best_x, best_v)
        for restart in range(self.restarts):
            first = start if (restart == 0 and start is not None) else None
            final = value or self.select == "best" or self.restarts > 1
            cand_x, cand_v = self._run_once(objective, x0, generator, first, final, fast)
            if cand_v is None:
                return AttackResult(cand_x, None)
            best_x, best_v = (cand_x, cand_v) if best_x is None else _keep_best(best_x, best_v, cand_x, cand_v)
        return AttackResult(best_x, best_v)

    def start_point(self, x0: Tensor, generator: torch.Generator, start: Optional[Tensor] = None) -> Tensor:
        """The first point of one restart: ``start`` or a random start, in ``B(x0, eps) ∩ [0, 1]^d``."""
        eps = float(self.eps)
        if start is not None:
            return self.clip(x0, start.detach().to(x0.device, x0.dtype))
        if self.random_start:
            return (x0 + self.geometry.random_start(x0, eps, generator)).clamp(0.0, 1.0)
        return x0.clone()

    def clip(self, x0: Tensor, x: Tensor) -> Tensor:
        """Project ``x`` onto the ball around ``x0``, then clip to ``[0, 1]`` (foolbox's order)."""
        return (x0 + self.geometry.project(x - x0, float(self.eps))).clamp(0.0, 1.0)

    def _run_once(
        self, objective: Objective, x0: Tensor, generator: torch.Generator, start: Optional[Tensor],
        final: bool = True, fast: Optional["FastObjective"] = None,
    ) -> "tuple[Tensor, Optional[Tensor]]":
        geo = self.geometry
        alpha = self.rel_step * float(self.eps)
        step_fn = fast if fast is not None else objective
        x_adv = self.start_point(x0, generator, start)
        best_x = best_v = None
        for _ in range(self.steps):
            value, grad = _value_and_grad(step_fn, x_adv)
            if self.select == "best":
                best_x, best_v = _keep_best(best_x, best_v, x_adv, value)
            x_adv = self.clip(x0, x_adv + alpha * geo.direction(grad))
        if not final:
            return x_adv, None
        return _finish(objective, fast, x_adv, best_x if self.select == "best" else None, best_v)


@dataclass(frozen=True)
class APGD(PGD):
    """Auto-PGD (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", Algorithm 1) on any objective.

    The step size starts at ``rel_step * eps`` (the paper's ``2 eps``) and is halved, per example,
    at the checkpoints ``w_j = ceil(p_j * steps)`` (``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when since the last checkpoint fewer than
    ``rho`` of the steps increased the objective, or when neither the step size nor the best value
    changed; a halving restarts that example from its best point. Each step moves with momentum
    ``x_{k+1} = P(x_k + momentum (z_{k+1} - x_k) + (1 - momentum)(x_k - x_{k-1}))``,
    ``z_{k+1} = P(x_k + eta_k direction(grad))``. The best point over every step is kept
    (``select="best"`` only). The cost is that of PGD with the same steps: one forward+backward
    pass per step and one forward pass at the last point.
    """

    rel_step: float = 2.0
    momentum: float = 0.75
    rho: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select != "best":
            raise ConfigError("APGD keeps the best point (select='best')")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"momentum must lie in [0, 1], got {self.momentum!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must lie in [0, 1], got {self.rho!r}")

    def checkpoints(self) -> "list[int]":
        """The iterations at which the step size may be halved (Croce and Hein's ``w_j``), in
        whole hundredths so that ``0.22 * 100`` is 22, not 23."""
        p = [0, 22]  # p_j in hundredths
        while p[-1] < 100:
            p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
        ws = {-(-q * self.steps // 100) for q in p[1:]}
        return sorted(w for w in ws if 0 < w < self.steps)

    def _run_once(
        self, objective: Objective, x0: Tensor, generator: torch.Generator, start: Optional[Tensor],
        final: bool = True, fast: Optional["FastObjective"] = None,
    ) -> "tuple[Tensor, Optional[Tensor]]":
        geo = self.geometry
        step_fn = fast if fast is not None else objective
        x = self.start_point(x0, generator, start)
        if self.steps == 0:
            return _finish(objective, fast, x, None, None)
        eta = torch.full((x0.shape[0],), self.rel_step * float(self.eps), device=x0.device, dtype=x0.dtype)
        value, grad = _value_and_grad(step_fn, x)
        best_x, best_v, best_g = x, value, grad
        x_prev = x
        x_next = self.clip(x0, x + _expand(eta, x) * geo.direction(grad))
        checkpoints = set(self.checkpoints())
        last_check, increases = 0, torch.zeros_like(eta)
        eta_at_check, best_at_check = eta.clone(), best_v.clone()
        for k in range(1, self.steps):
            v_next, g_next = _value_and_grad(step_fn, x_next)
            increases += (v_next > value).to(eta.dtype)
            better = v_next > best_v
            best_x = torch.where(_expand(better, x), x_next, best_x)
            best_g = torch.where(_expand(better, x), g_next, best_g)
            best_v = torch.where(better, v_next, best_v)
            x_prev, x, value, grad = x, x_next, v_next, g_next
            if k in checkpoints:
                few = increases < self.rho * (k - last_check)
                stuck = (eta == eta_at_check) & (best_v == best_at_check)
                halve = few | stuck
                eta = torch.where(halve, eta / 2, eta)
                h = _expand(halve, x)
                x, grad = torch.where(h, best_x, x), torch.where(h, best_g, grad)
                x_prev = torch.where(h, best_x, x_prev)  # no momentum out of a restart
                last_check, increases = k, torch.zeros_like(eta)
                eta_at_check, best_at_check = eta.clone(), best_v.clone()
            z = self.clip(x0, x + _expand(eta, x) * geo.direction(grad))
            x_next = self.clip(x0, x + self.momentum * (z - x) + (1 - self.momentum) * (x - x_prev))
        if not final:
            return x_next, None
        return _finish(objective, fast, x_next, best_x, best_v)


@dataclass(frozen=True)
class Nystrom(PGD):
    """A search built for the representation objective ``F(x') = ||g(x') - g(x)||_2``.

    ``F`` and its gradient vanish at ``x``, and to second order
    ``F(x + d)^2 = d^T J^T J d`` with ``J = dg/dx`` at ``x``: the best direction to first order is
    the top right singular vector of ``J`` (L2), or the box vertex maximising ``||J d||`` (L-inf).
    Each gradient pass at a point ``x + d_k`` gives ``y_k = F grad F = J_k^T (g(x + d_k) - g(x))``,
    which is ``J^T J d_k`` where ``g`` is linear on the ball, at the cost of one forward+backward
    pass. The attack keeps every pair ``(d_k, y_k)`` and models ``J^T J`` by their Nystrom
    approximation ``Y M^+ Y^T`` (``M`` the positive part of ``sym(D^T Y)``; exact on ``span D``
    for a linear ``g``, so the model is a block power iteration on ``J^T J`` that never forgets).
    Each step moves to the candidate with the largest model value that has not been visited
    (candidates: for L-inf vertices of the box ``B_inf(x, eps) ∩ [0, 1]^d``, one along every
    visited point's gradient and ``candidates`` random ones, each also after ``model_iters``
    rounds of the sign iteration ``d <- vertex(model J^T J d)``; for L2 the same on the sphere,
    with power iteration, plus the model's top eigenvector; all projected onto the threat set).
    The last ``tail`` steps climb locally from the best point as PGD does (step
    ``rel_step * eps``, then half of it, a third, ...).

    The first point is a random vertex: a coordinate with room on one side only (a pixel at 0
    or 1) moves there with probability ``one_sided``, every other coordinate goes to its upper
    bound with probability ``upper`` and to its lower bound otherwise (chosen on the six models of
    ``benchmarks/attack_strength.py``; the uniform vertex, 0.5 and 0.5, is 0.07% weaker there on
    average and 0.5% on the worst of them).

    Cost: ``steps`` forward+backward passes per restart and one forward pass at the last point,
    as PGD. Every evaluated point lies in the threat set and the best one is kept
    (``select="best"`` only). The model needs ``F(x) = 0``: on any other objective (one that
    :func:`representation_shift` did not build, e.g. the loss of ``score``'s second attack) the
    attack runs :class:`APGD` with the same steps and restarts.
    """

    rel_step: float = 0.7
    tail: int = 2
    candidates: int = 4
    model_iters: int = 3
    one_sided: float = 0.25
    upper: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select != "best":
            raise ConfigError("the Nystrom attack keeps the best point (select='best')")
        for name in ("tail", "candidates", "model_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
        for name in ("one_sided", "upper"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")

    def __call__(
        self,
        objective: Objective,
        x: Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        start: Optional[Tensor] = None,
        clean_value: Optional[Tensor] = None,
        value: bool = True,
        fast: Optional["FastObjective"] = None,
    ) -> AttackResult:
        if not getattr(objective, "vanishes_at_x", False):
            fallback = APGD(eps=self.eps, norm=self.norm, steps=self.steps, random_start=self.random_start,
                            restarts=self.restarts)
            return fallback(objective, x, generator=generator, start=start, clean_value=clean_value, value=value,
                            fast=fast)
        return super().__call__(objective, x, generator=generator, start=start, clean_value=clean_value,
                                value=value, fast=fast)

    def _bounds(self, x0: Tensor) -> "tuple[Tensor, Tensor]":
        """The lowest and highest offset ``d`` per coordinate, ``[N, n]``: the L-inf box around
        ``x0`` within ``[0, 1]``, or ``[0, 1]`` alone for L2 (the ball is projected separately)."""
        lo, hi = -x0.flatten(1), 1.0 - x0.flatten(1)
        if self.norm == "inf":
            eps = float(self.eps)
            lo, hi = lo.clamp(min=-eps), hi.clamp(max=eps)
        return lo, hi

    def random_vertex(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        """The first offset ``[N, n]`` (see the class): a random vertex of the box, or for L2
        the same pattern scaled onto the sphere of radius eps."""
        lo, hi = self._bounds(x0)
        if self.norm == "2":
            eps = float(self.eps)
            lo, hi = lo.clamp(min=-eps), hi.clamp(max=eps)
        u = _rand(tuple(lo.shape), lo, generator, normal=False)
        one = (lo == 0) | (hi == 0)
        d = torch.where(one, torch.where(u < self.one_sided, lo + hi, torch.zeros_like(lo)),
                        torch.where(u < self.upper, hi, lo))
        return self._project(d, lo, hi)

    def _project(self, d: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Offsets ``[..., n]`` onto the threat set: the ball (L2), then the box."""
        if self.norm == "2":
            norms = torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min(1e-12)
            d = d * torch.clamp(float(self.eps) / norms, max=1.0)
        return torch.maximum(torch.minimum(d, hi), lo)

    def _ascend(self, s: Tensor, base: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """The point of the threat set that maximises ``s . d`` (L-inf: the vertex along ``s``;
        L2: ``eps s / ||s||``, projected, or ``base`` where ``s`` is zero)."""
        if self.norm == "inf":
            return torch.where(s > 0, hi, lo)
        norms = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
        return torch.where(norms > 0, self._project(float(self.eps) * s / norms.clamp_min(1e-30), lo, hi), base)

    def _model_step(self, D: Tensor, Y: Tensor, lo: Tensor, hi: Tensor, generator: torch.Generator) -> Tensor:
        """The model's best unvisited point ``[N, n]`` given the visited offsets ``D`` and their
        ``y = F grad F`` (``Y``), both ``[N, n, k]``; the last visited point where the model is
        empty (every gradient so far zero, as at ``x`` itself)."""
        M = D.transpose(1, 2) @ Y
        w, U = torch.linalg.eigh(((M + M.transpose(1, 2)) / 2).double())
        keep = w > w.abs().amax(1, keepdim=True).clamp_min(1e-300) * (10 * torch.finfo(Y.dtype).eps)
        inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
        Mp = ((U * inv[:, None, :]) @ U.transpose(1, 2)).to(Y.dtype)  # M^+ on its positive part
        starts = [Y.transpose(1, 2)]  # [N, k, n]: the ascent direction at every visited point
        if self.norm == "2":  # the model's top eigenvector: Y Mp^(1/2) u for the top u of Mp^(1/2) Y^T Y Mp^(1/2)
            half = ((U * inv.clamp_min(0).sqrt()[:, None, :]) @ U.transpose(1, 2)).to(Y.dtype)
            _, V = torch.linalg.eigh((half @ (Y.transpose(1, 2) @ Y) @ half).double())
            top = (Y @ (half @ V[:, :, -1:].to(Y.dtype))).transpose(1, 2)
            starts += [top, -top]
        n, chunk = lo.shape[1], None
        if self.candidates:
            starts.append(_rand((lo.shape[0], self.candidates, n), lo, generator, normal=True))
        s = torch.cat(starts, 1)  # [N, c, n]
        chunk = max(1, (1 << 25) // max(1, s.shape[1] * n))
        best = []
        for i in range(0, s.shape[0], chunk):
            sl = slice(i, i + chunk)
            l, h, Yi, Mi, Di = lo[sl, None], hi[sl, None], Y[sl], Mp[sl], D[sl]
            c = c0 = self._ascend(s[sl], torch.zeros_like(s[sl]), l, h)
            for _ in range(self.model_iters):
                c = self._ascend(((c @ Yi) @ Mi) @ Yi.transpose(1, 2), c, l, h)
            c = torch.cat([c, c0], 1)  # the refined candidates, and where they started should all be visited
            z = c @ Yi  # [n, c, k]: a candidate's coordinates in the model
            val = ((z @ Mi) * z).sum(-1)  # the model's F^2 at each candidate
            # a candidate with a visited point's coordinates (to rounding) is that point, or new to the model in no way
            seen = (Di.transpose(1, 2) @ Yi)[:, None, :, :]  # [n, 1, k, k]
            tol = 1e-5 * seen.abs().amax((2, 3), keepdim=True).clamp_min(1e-30)
            visited = ((z[:, :, None, :] - seen).abs() <= tol).all(-1).any(-1)
            val = torch.where(visited, torch.full_like(val, -math.inf), val)
            best.append(c[torch.arange(c.shape[0], device=c.device), val.argmax(1)])
        return torch.where(keep.any(1)[:, None], torch.cat(best), D[:, :, -1])

    def _run_once(
        self, objective: Objective, x0: Tensor, generator: torch.Generator, start: Optional[Tensor],
        final: bool = True, fast: Optional["FastObjective"] = None,
    ) -> "tuple[Tensor, Optional[Tensor]]":
        step_fn = fast if fast is not None else objective
        lo, hi = self._bounds(x0)
        if start is not None:
            d = (self.clip(x0, start.detach().to(x0.device, x0.dtype)) - x0).flatten(1)
        elif self.random_start:
            d = self.random_vertex(x0, generator)
        else:
            d = torch.zeros_like(lo)  # zero gradient: the attack stays at x0
        point = lambda offset: self.clip(x0, x0 + offset.view_as(x0))  # noqa: E731 - every point goes through the projection
        if self.steps == 0:
            return _finish(objective, fast, point(d), None, None)
        tail = min(self.tail, self.steps)
        D: "list[Tensor]" = []
        Y: "list[Tensor]" = []
        best_x = best_v = best_g = best_d = None
        climb = 0
        for k in range(1, self.steps + 1):
            x_k = point(d)
            value, grad = _value_and_grad(step_fn, x_k)
            grad = grad.flatten(1)
            if best_x is None:
                best_x, best_v, best_g, best_d = x_k, value, grad, d
            else:
                better = value > best_v
                best_x = torch.where(_expand(better, x_k), x_k, best_x)
                best_g = torch.where(better[:, None], grad, best_g)
                best_d = torch.where(better[:, None], d, best_d)
                best_v = torch.where(better, value, best_v)
            if k <= self.steps - tail:
                D.append(d)
                Y.append(grad * value[:, None])
                d = self._model_step(torch.stack(D, 2), torch.stack(Y, 2), lo, hi, generator)
            else:  # climb: from the best point along its gradient, then along each new point's
                base, g = (best_d, best_g) if climb == 0 else (d, grad)
                direction = self.geometry.direction(g.view_as(x0)).flatten(1)
                d = self._project(base + self.rel_step * float(self.eps) / (climb + 1) * direction, lo, hi)
                climb += 1
        if not final:
            return point(d), None
        return _finish(objective, fast, point(d), best_x, best_v)


ATTACKS = {"pgd": PGD, "apgd": APGD, "nystrom": Nystrom}


class FastObjective:
    """The gradient side of an attack: the objective (without a watch) in low precision
    (``dtype`` bf16 / fp16 under ``torch.autocast``) and/or compiled. Its values choose the kept
    iterate only; :class:`PGD` re-evaluates that iterate with the float32 objective."""

    def __init__(self, objective: Objective, dtype: Optional[torch.dtype] = None, device_type: str = "cpu") -> None:
        self.objective, self.dtype, self.device_type = objective, dtype, device_type

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self.objective(x).float()


def _value_and_grad(fn: Objective, x: Tensor) -> "tuple[Tensor, Tensor]":
    x = x.detach().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach().to(x.dtype), torch.nan_to_num(grad.to(x.dtype))


def _finish(objective: Objective, fast: Optional[FastObjective], last: Tensor, best_x: Optional[Tensor],
            best_v: Optional[Tensor]) -> "tuple[Tensor, Tensor]":
    """Evaluate one restart's last point and return the kept one (``best_x`` given: the better of
    it and the last point) with the float32 objective's value there."""
    with torch.no_grad():
        if fast is None:
            value = objective(last).detach()
            return (last, value) if best_x is None else _keep_best(best_x, best_v, last, value)
        if best_x is not None:
            last, _ = _keep_best(best_x, best_v, last, fast(last).detach().to(best_v.dtype))
        return last, objective(last).detach()


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _keep_best(
    best_x: Optional[Tensor], best_v: Optional[Tensor], x: Tensor, v: Tensor
) -> "tuple[Tensor, Tensor]":
    if best_x is None:
        return x, v
    better = v > best_v
    return torch.where(_expand(better, x), x, best_x), torch.where(better, v, best_v)


# --- objectives and the watch over every evaluated point ----------------------------------------


class Watch:
    """Sees every point an attack evaluates and keeps, per example, what each one proves.

    Every evaluated ``x'`` lies in the threat set, so ``||g(x') - g(x)||_2`` is a lower bound on
    the sensitivity ``s_i`` and ``l(f(x'), y)`` one on the worst-case loss; and if the head
    classifies any evaluated ``x'`` other than ``y``, the point is not robust, whichever iterate
    the attack keeps in the end. Shapes: ``g0`` ``[N, m]``, ``labels`` / ``targets`` ``[N]``.

    Shifts are computed in float64 and the judgments use ``head`` on the representation: pass
    the exact float64 head (:meth:`asbound.models.SplitModel.exact_head`) so that predictions,
    losses and Theorem 2's margins come from the same arithmetic (a float32 head can pick another
    class at a near-tie than the float64 margin implies).

    Attributes (``[N]``): ``shift`` (largest shift seen), ``loss`` (largest loss seen, with a
    ``loss``), ``fooled`` (some evaluated point misclassified, with ``labels``) and ``witness``
    (the class predicted at the first such point; the label where there is none).
    """

    def __init__(
        self,
        head: Callable[[Tensor], Tensor],
        g0: Tensor,
        *,
        labels: Optional[Tensor] = None,
        loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        targets: Optional[Tensor] = None,
    ) -> None:
        self.head, self.g0 = head, g0.detach().flatten(1).double()
        self.labels, self.loss_fn = labels, loss
        self.targets = targets if targets is not None else labels
        n = self.g0.shape[0]
        self.shift = torch.zeros(n, device=self.g0.device, dtype=torch.float64)
        self.loss: Optional[Tensor] = None
        self.fooled = torch.zeros(n, dtype=torch.bool, device=self.g0.device)
        self.witness = labels.clone() if labels is not None else None
        self.evaluations = 0

    @torch.no_grad()
    def observe(self, g: Tensor) -> None:
        """Record the representation ``g(x')`` ``[N, m]`` of one batch of evaluated points."""
        g = g.detach().flatten(1)
        self.evaluations += 1
        self.shift = torch.maximum(self.shift, torch.linalg.vector_norm(g.double() - self.g0, dim=1))
        if self.labels is None and self.loss_fn is None:
            return
        out = self.head(g)
        if self.loss_fn is not None:
            targets = self.targets if not self.targets.is_floating_point() else self.targets.to(out.dtype)
            value = self.loss_fn(out, targets).detach()
            self.loss = value if self.loss is None else torch.maximum(self.loss, value)
        if self.labels is not None:
            pred = out.argmax(1)
            wrong = pred != self.labels
            self.witness = torch.where(wrong & ~self.fooled, pred, self.witness)
            self.fooled |= wrong


def representation_shift(
    features: Callable[[Tensor], Tensor],
    x0: Tensor,
    g0: Optional[Tensor] = None,
    *,
    watch: Optional[Watch] = None,
) -> Objective:
    """The AS objective ``||g(x') - g(x0)||_2`` per example (SPEC section 2).

    ``g0`` passes ``g(x0)`` when the caller has it already; ``watch`` sees every ``g(x')``.
    """
    if g0 is None:
        with torch.no_grad():
            g0 = features(x0)
    g0 = g0.detach().flatten(1)

    def objective(x_adv: Tensor) -> Tensor:
        g = features(x_adv).flatten(1)
        if watch is not None:
            watch.observe(g)
        return torch.linalg.vector_norm(g - g0, dim=1)

    objective.vanishes_at_x = True  # type: ignore[attr-defined] - zero with its gradient at x0 (Nystrom's model)
    return objective


def loss_objective(
    model: Callable[[Tensor], Tensor],
    loss: Callable[[Tensor, Tensor], Tensor],
    targets: Tensor,
    *,
    watch: Optional[Watch] = None,
) -> Objective:
    """The loss ``l(f(x'), y)`` per example (cross-entropy or the Euclidean error).

    With a ``watch``, ``model`` must expose ``features`` and ``head`` (a split model): the watch
    sees every ``g(x')``.
    """
    if watch is None:
        return lambda x_adv: loss(model(x_adv), targets)
    features, head = model.features, model.head  # type: ignore[attr-defined]

    def objective(x_adv: Tensor) -> Tensor:
        g = features(x_adv)
        watch.observe(g)
        return loss(head(g), targets)

    return objective


# --- foolbox, the reference for PGD semantics --------------------------------------------------


def foolbox_pgd(
    attack: PGD,
    objective: Objective,
    x: Tensor,
    *,
    start: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> AttackResult:
    """Run foolbox's ``LinfPGD`` / ``L2PGD`` on ``objective``, once per restart.

    The objective replaces foolbox's cross-entropy through its ``get_loss_fn`` override point.
    Each restart runs foolbox's loop and returns its last iterate; the objective is evaluated
    there and the best restart per example is kept (foolbox itself has no restarts). Random
    starts are drawn from ``generator`` through foolbox's ``get_random_start`` override point,
    with the distribution foolbox uses (uniform in the ball), so runs are reproducible.
    ``start`` fixes the first restart's random-start *offset* so that foolbox and :class:`PGD`
    (whose ``start`` is the starting point ``x + offset``) can be compared exactly.
    """
    import eagerpy as ep
    import foolbox as fb

    base = fb.attacks.LinfPGD if attack.norm == "inf" else fb.attacks.L2PGD
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x0 = x.detach()
    offset: "list[Optional[Tensor]]" = [None]

    class _ObjectivePGD(base):  # type: ignore[misc, valid-type]
        def get_loss_fn(self, model, labels):  # noqa: ANN001, ANN202 - foolbox's signature
            def loss_fn(inputs: "ep.Tensor") -> "ep.Tensor":
                return ep.astensor(objective(inputs.raw).sum())

            return loss_fn

        def get_random_start(self, x0, epsilon):  # noqa: ANN001, ANN202
            # foolbox's random start is a point, x0 + offset (it clips it to the bounds itself)
            return x0 + ep.astensor(offset[0].to(x0.raw.device, x0.raw.dtype))

    fb_attack = _ObjectivePGD(
        rel_stepsize=attack.rel_step, steps=attack.steps, random_start=attack.random_start or start is not None
    )
    fmodel = fb.PyTorchModel(torch.nn.Identity().eval(), bounds=(0.0, 1.0), device=x0.device)
    dummy = fb.criteria.Misclassification(torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device))
    best_x = best_v = None
    for restart in range(attack.restarts):
        if restart == 0 and start is not None:
            offset[0] = attack.geometry.project(start.detach().to(x0.device, x0.dtype), float(attack.eps))
        elif attack.random_start:
            offset[0] = attack.geometry.random_start(x0, float(attack.eps), generator)
        last = fb_attack.run(fmodel, x0, dummy, epsilon=float(attack.eps)).detach()
        with torch.no_grad():
            value = objective(last).detach()
        best_x, best_v = _keep_best(best_x, best_v, last, value)
    return AttackResult(best_x, best_v)
