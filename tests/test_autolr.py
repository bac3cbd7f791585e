"""AutoLoRa's automated learning rate (``asbound.transfer.autolr``, METHODS.md 2.8.4 / P-A5).

The rule is checked three ways: against hand-computed learning-rate sequences, against a literal
transcription of the METHODS.md pseudo-code (``reference_code``) and an independent transcription
of the Auto-PGD condition 2 (``reference_apgd``) on many seeded random accuracy sequences, and
through ``state_dict`` round trips. No torch needed.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from asbound.errors import ConfigError, ResumeError
from asbound.transfer.autolr import CONDITIONS, AutoLR, Decision, default_checkpoints

W50 = [0, 16, 24, 28, 36, 40, 42, 44, 46, 48, 50]
W_SMALL = [0, 2, 4, 6]


# --------------------------------------------------------------------------------------------
# reference transcriptions


def reference_code(accs, W, eta0, rho=0.75, divide=2.0):
    """METHODS.md 2.8.4 line by line. Returns (eta after each epoch, epochs with load("best_val"),
    epochs with save("best_val"), {load epoch: condition})."""
    E = len(accs)
    eta = eta0
    acc = [0.0] * (E + 1)  # acc[e-1] = validation robust accuracy after epoch e
    eta_hist = [0.0] * len(W)
    eta_hist[0] = eta
    best_hist = [0.0] * len(W)
    best = -1
    j = 1
    etas, loads, saves, conds = [], [], [], {}
    for e in range(1, E + 1):
        a_v = accs[e - 1]
        acc[e - 1] = a_v
        if a_v > best:
            best = a_v
            best_hist[j] = a_v
            saves.append(e)
        if e - 1 == W[j]:
            w0, w1 = W[j - 1], W[j]
            cnt = 0
            for t in range(w0, w1):
                if acc[t + 1] > acc[t]:
                    cnt += 1
            if cnt < rho * (w1 - w0):
                eta /= divide
                eta_hist[j] = eta
                loads.append(e)
                conds[e] = 1
            elif eta_hist[j] == eta_hist[j - 1] and best_hist[j] == best_hist[j - 1]:
                eta /= divide
                eta_hist[j] = eta
                loads.append(e)
                conds[e] = 2
            if j < len(W) - 1:
                j += 1
                best_hist[j] = best_hist[j - 1]
                eta_hist[j] = eta_hist[j - 1]
        etas.append(eta)
    return etas, loads, saves, conds


def reference_apgd(accs, W, eta0, rho=0.75, divide=2.0):
    """Auto-PGD's rule on the same checkpoints: eta_at[j] is the learning rate in force when
    checkpoint j is reached (eta_at[0] = eta0), fmax_at[j] the best accuracy up to acc[W[j]]
    (fmax_at[0] = acc[0]); condition 2: eta_at[j-1] == eta_at[j] and fmax_at[j] == fmax_at[j-1]."""
    eta = eta0
    best = -math.inf
    eta_at = {0: eta0}
    fmax_at = {}
    j = 1
    etas, loads, conds = [], [], {}
    for e, a in enumerate(accs, start=1):
        best = max(best, a)
        if e - 1 == W[0]:
            fmax_at[0] = best
        if j < len(W) and e - 1 == W[j]:
            eta_at[j] = eta
            fmax_at[j] = best
            w0, w1 = W[j - 1], W[j]
            cnt = sum(accs[t + 1] > accs[t] for t in range(w0, w1))
            cond = None
            if cnt < rho * (w1 - w0):
                cond = 1
            elif eta_at[j - 1] == eta_at[j] and fmax_at[j] == fmax_at[j - 1]:
                cond = 2
            if cond is not None:
                eta /= divide
                loads.append(e)
                conds[e] = cond
            j += 1
        etas.append(eta)
    return etas, loads, conds


def run(accs, W, eta0=1.0, **kw):
    sched = AutoLR(eta0, W, **kw)
    return [sched.step(a) for a in accs]


def summary(decisions):
    etas = [d.lr for d in decisions]
    loads = [e for e, d in enumerate(decisions, start=1) if d.restore]
    saves = [e for e, d in enumerate(decisions, start=1) if d.new_best]
    conds = {e: d.condition for e, d in enumerate(decisions, start=1) if d.halved}
    return etas, loads, saves, conds


# --------------------------------------------------------------------------------------------
# random accuracy sequences


def _uniform(rng, n):
    return [rng.random() for _ in range(n)]


def _ties(rng, n):  # few distinct values: many equal consecutive accuracies and repeated bests
    return [rng.randint(0, 4) / 4 for _ in range(n)]


def _walk(rng, n):  # noisy upward drift, quantised like an accuracy on 200 examples
    x, out = rng.uniform(0.1, 0.4), []
    for _ in range(n):
        x = min(1.0, max(0.0, x + rng.gauss(0.004, 0.02)))
        out.append(round(x * 200) / 200)
    return out


def _plateau(rng, n):  # rises, then flat/noisy below the peak: conditions 1 and 2 both fire
    peak = rng.randint(1, max(1, n // 2))
    out = [0.3 + 0.4 * i / peak for i in range(peak)]
    out += [round(0.6 + rng.choice([0.0, 0.01, -0.02, 0.05]) * rng.random(), 2) for _ in range(n - peak)]
    return out


GENERATORS = [_uniform, _ties, _walk, _plateau]


def _random_W(rng):
    W = [0]
    for _ in range(rng.randint(1, 8)):
        W.append(W[-1] + rng.randint(1, 6))
    return W


def _cases(n_seeds=300):
    """(W, accs, rho) triples: the reference's 50-epoch W, the small W, and random W/E/rho."""
    for seed in range(n_seeds):
        rng = random.Random(seed)
        gen = GENERATORS[seed % len(GENERATORS)]
        yield W50, gen(rng, 50), 0.75
        yield W_SMALL, gen(rng, 8), 0.75
        yield W_SMALL, gen(rng, 8), 0.5
        W = _random_W(rng)
        E = rng.randint(1, W[-1] + 3)  # shorter or longer than the checkpoints
        yield W, gen(rng, E), rng.choice([0.25, 0.5, 0.75, 1.0])


# --------------------------------------------------------------------------------------------
# hand-computed cases (W = [0,2,4,6], E = 8: checkpoints reached after epochs 3, 5 and 7)


def test_hand_computed_code_condition1_then_new_best():
    # e3: cnt 2 >= 1.5, j=1 -> kept; e5: .45>.5 no, .48>.45 yes -> cnt 1 < 1.5 -> cond 1;
    # e7: cnt 2 and a new best (.52) in segment 3 -> kept; e8: not a checkpoint.
    ds = run([0.30, 0.40, 0.50, 0.45, 0.48, 0.49, 0.52, 0.60], W_SMALL)
    assert [d.lr for d in ds] == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]
    assert [d.new_best for d in ds] == [True, True, True, False, False, False, True, True]
    assert [d.checkpoint for d in ds] == [False, False, True, False, True, False, True, False]
    assert [d.condition for d in ds] == [None, None, None, None, 1, None, None, None]
    assert [d.restore for d in ds] == [d.halved for d in ds]


def test_hand_computed_code_condition2_fires_twice_apgd_once():
    # rho = .5: one improvement per 2-epoch segment is enough, so condition 1 never fires.
    # Best .5 at epoch 2, never beaten. code: j=1 (e3) cannot fire; j=2 (e5) and j=3 (e7) fire
    # condition 2 although the lr was just halved at e5. apgd: e3 improved since acc[0] (.3 -> .5);
    # e5 no improvement -> halve; e7 the lr was halved at the previous checkpoint -> keep.
    accs = [0.3, 0.5, 0.4, 0.2, 0.3, 0.1, 0.2, 0.25]
    code = run(accs, W_SMALL, rho=0.5)
    assert [d.lr for d in code] == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    assert [d.condition for d in code] == [None, None, None, None, 2, None, 2, None]
    apgd = run(accs, W_SMALL, rho=0.5, condition2="apgd")
    assert [d.lr for d in apgd] == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]
    assert [d.condition for d in apgd] == [None, None, None, None, 2, None, None, None]


def test_hand_computed_apgd_fires_at_first_checkpoint_code_does_not():
    # The first epoch (.9) is never beaten. code: no condition 2 at j=1 (P-A5), then it fires at
    # e5 and e7. apgd: at j=1 the previous checkpoint is the start (lr0, best acc[0] = .9): no
    # improvement -> halve at e3; e5 was halved at the previous checkpoint -> keep; e7 -> halve.
    accs = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    code = run(accs, W_SMALL, rho=0.5)
    assert [d.lr for d in code] == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    assert [d.condition for d in code] == [None, None, None, None, 2, None, 2, None]
    apgd = run(accs, W_SMALL, rho=0.5, condition2="apgd")
    assert [d.lr for d in apgd] == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert [d.condition for d in apgd] == [None, None, 2, None, None, None, 2, None]
    assert [d.new_best for d in apgd] == [True] + [False] * 7


def test_apgd_first_checkpoint_improvement_over_first_epoch_blocks_condition2():
    # Epoch 3 beats epoch 1: apgd keeps the lr at j=1 (e3). Nothing beats .6 in acc[2..4] and the
    # lr was not halved at e3, so it halves at j=2 (e5).
    ds = run([0.5, 0.1, 0.6, 0.2, 0.3], W_SMALL, rho=0.5, condition2="apgd")
    assert [d.lr for d in ds] == [1, 1, 1, 1, 0.5]
    assert [d.condition for d in ds] == [None, None, None, None, 2]


def test_ties_do_not_count_as_improvements_nor_as_new_bests():
    ds = run([0.1, 0.2, 0.2, 0.3, 0.4, 0.4, 0.4, 0.5], W_SMALL)
    # e3: .2>.1 yes, .2>.2 no -> cnt 1 < 1.5 -> cond 1; e5: .3>.2, .4>.3 -> cnt 2, new best .4 in
    # segment 2 -> kept; e7: .4>.4 no twice -> cond 1.
    assert [d.lr for d in ds] == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert [d.condition for d in ds] == [None, None, 1, None, None, None, 1, None]
    assert [d.new_best for d in ds] == [True, True, False, True, True, False, False, True]


def test_condition1_threshold_is_strict_less_than():
    # W = [0, 4]: rho*(4-0) = 3. cnt 3 is enough, cnt 2 is not.
    three = run([0.1, 0.2, 0.1, 0.3, 0.4], [0, 4])
    assert [d.lr for d in three] == [1.0] * 5
    two = run([0.1, 0.2, 0.1, 0.05, 0.4], [0, 4])
    assert [d.lr for d in two] == [1, 1, 1, 1, 0.5] and two[-1].condition == 1


def test_monotone_increase_never_halves_w50():
    ds = run([0.01 * e for e in range(1, 51)], W50, eta0=0.1)
    assert all(d.lr == 0.1 and not d.halved and d.new_best for d in ds)
    assert [e for e, d in enumerate(ds, start=1) if d.checkpoint] == [17, 25, 29, 37, 41, 43, 45, 47, 49]


def test_constant_halves_at_every_reached_checkpoint_w50():
    ds = run([0.42] * 50, W50, eta0=0.1)
    halved = [e for e, d in enumerate(ds, start=1) if d.halved]
    assert halved == [17, 25, 29, 37, 41, 43, 45, 47, 49]  # W[-1] = 50 is never reached in 50 epochs
    assert all(ds[e - 1].condition == 1 for e in halved)
    assert ds[15].lr == 0.1 and ds[16].lr == 0.05 and ds[24].lr == 0.025
    assert ds[-1].lr == 0.1 / 2**9
    assert [d.new_best for d in ds] == [True] + [False] * 49


def test_constant_halves_at_every_checkpoint_small_w():
    ds = run([0.5] * 8, W_SMALL, divide=4.0)
    assert [d.lr for d in ds] == [1, 1, 0.25, 0.25, 1 / 16, 1 / 16, 1 / 64, 1 / 64]


def test_new_best_in_one_segment_not_the_next_code():
    # W = [0,4,8,12], rho = .5. Segment 1 (acc[0..4]) and segment 2 (acc[4..8]) have new bests; segment
    # 3 (acc[8..12]) has enough improvements (2 of 4) but no new best -> condition 2 at j=3 (epoch 13).
    accs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.4, 0.6, 0.5, 0.7, 0.1, 0.2, 0.1, 0.3]
    ds = run(accs, [0, 4, 8, 12], rho=0.5)
    assert [e for e, d in enumerate(ds, start=1) if d.halved] == [13]
    assert ds[-1].condition == 2 and ds[-1].lr == 0.5


def test_first_epoch_is_always_a_new_best_even_at_zero_or_negative():
    assert AutoLR(1.0, W_SMALL).step(0.0).new_best
    sched = AutoLR(1.0, W_SMALL)
    assert not sched.step(-1.0).new_best  # strict > against the initial best of -1
    assert sched.best == -1


def test_last_checkpoint_freezes_the_lr():
    ds = run([0.5] * 20, W_SMALL)
    assert [e for e, d in enumerate(ds, start=1) if d.checkpoint] == [3, 5, 7]
    assert all(d.lr == 0.125 for d in ds[6:])


def test_lr_property_and_counters_follow_the_decisions():
    sched = AutoLR(0.1, W50, epochs=50)
    rng = random.Random(7)
    for e in range(1, 51):
        d = sched.step(rng.random())
        assert isinstance(d, Decision)
        assert sched.lr == d.lr and sched.epoch == e
        assert d.restore == d.halved and (d.condition is not None) == d.halved
        assert d.condition in (None, 1, 2)


# --------------------------------------------------------------------------------------------
# against the references


def test_code_variant_matches_the_pseudo_code_on_random_sequences():
    n = 0
    for W, accs, rho in _cases():
        want = reference_code(accs, W, 0.1, rho=rho)
        got = summary(run(accs, W, eta0=0.1, rho=rho))
        assert got == want, (W, accs, rho)
        n += 1
    assert n == 1200


def test_code_variant_matches_the_pseudo_code_with_other_divide():
    for seed in range(100):
        rng = random.Random(1000 + seed)
        accs = GENERATORS[seed % 4](rng, 50)
        assert summary(run(accs, W50, eta0=0.3, divide=3.0)) == reference_code(accs, W50, 0.3, divide=3.0)


def test_random_cases_exercise_both_conditions():
    conds = {1: 0, 2: 0}
    for W, accs, rho in _cases(100):
        for c in reference_code(accs, W, 0.1, rho=rho)[3].values():
            conds[c] += 1
    assert conds[1] > 50 and conds[2] > 50


def test_apgd_variant_matches_the_auto_pgd_rule_on_random_sequences():
    differs = 0
    for W, accs, rho in _cases():
        etas, loads, conds = reference_apgd(accs, W, 0.1, rho=rho)
        got = summary(run(accs, W, eta0=0.1, rho=rho, condition2="apgd"))
        assert (got[0], got[1], got[3]) == (etas, loads, conds), (W, accs, rho)
        differs += got[0] != reference_code(accs, W, 0.1, rho=rho)[0]
    assert differs > 100  # the two variants do differ on these sequences


def test_code_condition2_is_j_at_least_2_and_no_new_best_since_previous_checkpoint():
    """P-A5: the reduced form of condition 2 in the reference code."""
    for W, accs, rho in _cases(150):
        ds = run(accs, W, rho=rho)
        reached = [e for e, d in enumerate(ds, start=1) if d.checkpoint]
        for j, e in enumerate(reached, start=1):
            d = ds[e - 1]
            if d.condition == 1:
                continue
            w_prev = W[j - 1]
            no_new_best = max(accs[: W[j] + 1]) == max(accs[: w_prev + 1])
            assert (d.condition == 2) == (j >= 2 and no_new_best), (W, accs, j)


# --------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("condition2", CONDITIONS)
def test_state_dict_resumes_to_identical_decisions(condition2):
    for seed in range(40):
        rng = random.Random(seed)
        W, E = (W50, 50) if seed % 2 else (W_SMALL, 8)
        accs = GENERATORS[seed % 4](rng, E)
        full = run(accs, W, eta0=0.1, rho=0.5 if seed % 3 == 0 else 0.75, condition2=condition2)
        kw = dict(rho=0.5 if seed % 3 == 0 else 0.75, condition2=condition2, epochs=E)
        for k in range(E + 1):
            first = AutoLR(0.1, W, **kw)
            head = [first.step(a) for a in accs[:k]]
            state = json.loads(json.dumps(first.state_dict()))
            second = AutoLR(0.1, W, **kw)
            second.load_state_dict(state)
            assert second.lr == first.lr and second.epoch == k and second.best == first.best
            tail = [second.step(a) for a in accs[k:]]
            assert head + tail == full, (seed, k)


def test_state_dict_is_plain_json():
    sched = AutoLR(0.1, W50)
    for a in [0.1, 0.3, 0.2]:
        sched.step(a)
    state = sched.state_dict()
    assert json.loads(json.dumps(state)) == state
    sched.step(0.5)
    assert state["epoch"] == 3  # a copy, not a view of the live state


def test_load_state_dict_rejects_another_configuration():
    state = AutoLR(0.1, W50).state_dict()
    with pytest.raises(ResumeError, match="rho"):
        AutoLR(0.1, W50, rho=0.5).load_state_dict(state)
    with pytest.raises(ResumeError, match="checkpoints"):
        AutoLR(0.1, W_SMALL).load_state_dict(state)
    with pytest.raises(ResumeError, match="condition2"):
        AutoLR(0.1, W50, condition2="apgd").load_state_dict(state)
    with pytest.raises(ResumeError, match="lr0"):
        AutoLR(0.2, W50).load_state_dict(state)


def test_load_state_dict_rejects_malformed_state():
    sched = AutoLR(0.1, W_SMALL)
    sched.step(0.5)
    state = sched.state_dict()
    with pytest.raises(ResumeError, match="malformed"):
        AutoLR(0.1, W_SMALL).load_state_dict({k: v for k, v in state.items() if k != "acc"})
    with pytest.raises(ResumeError, match="inconsistent"):
        AutoLR(0.1, W_SMALL).load_state_dict({**state, "acc": []})
    with pytest.raises(ResumeError, match="past"):
        AutoLR(0.1, W_SMALL, epochs=8).load_state_dict({**state, "epoch": 9, "acc": [0.5] * 9})


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(lr0=0.0), "lr0"),
        (dict(lr0=-0.1), "lr0"),
        (dict(lr0=float("nan")), "lr0"),
        (dict(lr0=float("inf")), "lr0"),
        (dict(lr0="fast"), "lr0"),
        (dict(rho=0.0), "rho"),
        (dict(rho=1.5), "rho"),
        (dict(rho=-0.5), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(divide=1.0), "divide"),
        (dict(divide=0.5), "divide"),
        (dict(divide=float("inf")), "divide"),
        (dict(condition2="paper"), "condition2"),
        (dict(condition2=None), "condition2"),
        (dict(checkpoints=[0]), "checkpoints"),
        (dict(checkpoints=[]), "checkpoints"),
        (dict(checkpoints=[1, 4, 8]), "checkpoints"),
        (dict(checkpoints=[0, 4, 4, 8]), "checkpoints"),
        (dict(checkpoints=[0, 8, 4]), "checkpoints"),
        (dict(checkpoints=[0, 2.5, 4]), "checkpoints"),
        (dict(checkpoints=[0, True]), "checkpoints"),
        (dict(checkpoints="0,4,8"), "checkpoints"),
        (dict(checkpoints=4), "checkpoints"),
        (dict(epochs=0), "epochs"),
        (dict(epochs=2.5), "epochs"),
    ],
)
def test_invalid_options_raise_one_line_config_error(kwargs, option):
    args = {"lr0": 0.1, "checkpoints": W50, **kwargs}
    lr0, checkpoints = args.pop("lr0"), args.pop("checkpoints")
    with pytest.raises(ConfigError) as info:
        AutoLR(lr0, checkpoints, **args)
    message = str(info.value)
    assert message.startswith(f"{option}=") and "\n" not in message


def test_valid_edge_options_are_accepted():
    AutoLR(1e-6, (0, 1), rho=1.0, divide=1.0001, condition2="apgd", epochs=1)
    AutoLR(1, range(0, 60, 4))


def test_step_rejects_non_finite_accuracy_and_steps_past_the_run():
    sched = AutoLR(0.1, W_SMALL, epochs=2)
    with pytest.raises(ValueError, match="val_accuracy"):
        sched.step(float("nan"))
    assert sched.epoch == 0
    sched.step(0.1)
    sched.step(0.2)
    with pytest.raises(RuntimeError, match="2-epoch"):
        sched.step(0.3)


# --------------------------------------------------------------------------------------------
# default checkpoints


def test_default_checkpoints_50_is_the_reference_list():
    assert default_checkpoints(50) == tuple(W50)
    assert default_checkpoints(100) == tuple(2 * w for w in W50)
    assert default_checkpoints(25) == (0, 8, 12, 14, 18, 20, 21, 22, 23, 24, 25)
    assert default_checkpoints(1) == (0, 1)


def test_default_checkpoints_are_strictly_increasing_from_zero():
    for n in range(1, 201):
        W = default_checkpoints(n)
        assert W[0] == 0 and W[-1] == n and len(W) >= 2
        assert all(b > a for a, b in zip(W, W[1:])), n
        assert all(isinstance(w, int) for w in W)
        assert set(W) == {round(w * n / 50) for w in W50}  # no ties, so round() agrees
        AutoLR(0.1, W, epochs=n)  # valid checkpoints


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, None])
def test_default_checkpoints_rejects_bad_epochs(bad):
    with pytest.raises(ConfigError, match="epochs"):
        default_checkpoints(bad)


def test_module_does_not_import_torch():
    path = Path(__file__).resolve().parents[1] / "asbound" / "transfer" / "autolr.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('autolr', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['autolr'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "mod.AutoLR(0.1, mod.default_checkpoints(50)).step(0.5)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=path.parents[2], timeout=60)
