"""Print how far asbound's PGD estimate of the AS score is from the closed-form value.

For a linear representation ``g(x) = A x`` with the threat set inside the box:

* L2: ``s = eps * sigma_max(A)`` (the top singular value);
* L-inf: ``s = max over the cube's vertices of ||A (eps * v)||_2`` (a convex function peaks at a
  vertex), enumerated exactly for a small input dimension.

    python analyses/oracles.py [--trials 20] [--steps 50] [--restarts 4]

The tests (tests/test_attacks.py, tests/test_bounds.py) assert the same with fixed seeds; this
script reports the errors over many random matrices.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from asbound.attacks import PGD, representation_shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8, help="input dimension (2^dim vertices for L-inf)")
    args = parser.parse_args()
    eps = 0.05
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=args.dim)), dtype=torch.float64)
    print(f"{'norm':>5} {'trials':>6} {'max rel. error':>15} {'mean rel. error':>16} {'exceeds exact':>14}")
    for norm in ("2", "inf"):
        errors, exceed = [], 0
        for trial in range(args.trials):
            g = torch.Generator().manual_seed(trial)
            A = torch.randn(5, args.dim, generator=g, dtype=torch.float64)
            x = torch.rand(16, args.dim, generator=g, dtype=torch.float64) * 0.8 + 0.1
            if norm == "2":
                exact = eps * torch.linalg.matrix_norm(A, ord=2)
            else:
                exact = (eps * vertices @ A.T).norm(dim=1).max()
            attack = PGD(eps=eps, norm=norm, steps=args.steps, rel_step=0.5 if norm == "2" else 0.7, restarts=args.restarts)
            value = attack(representation_shift(lambda t: t @ A.T, x), x, generator=g).value
            errors.append(((exact - value) / exact).abs())
            exceed += int((value > exact * (1 + 1e-12)).sum())
        err = torch.cat(errors)
        print(f"{'L' + norm:>5} {args.trials:>6} {float(err.max()):>15.2e} {float(err.mean()):>16.2e} {exceed:>14}")


if __name__ == "__main__":
    main()
