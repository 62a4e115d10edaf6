"""Hand-computed checks of pipeline/rl/group_math.py (GRPO, Dr. GRPO, DAPO, GSPO, RLOO
arithmetic)."""

import math

import pytest
import torch

from pipeline.rl.group_math import (
    VARIANTS,
    aggregate,
    clipped_policy_loss,
    group_advantages,
    kl_penalty,
    zero_variance_groups,
)

# two groups of 3: group 0 mean 1/3, unbiased std sqrt(1/3); group 1 mean 4, unbiased std 2
# (population std 1.633)
REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
SQRT3 = math.sqrt(3)


def close(actual, expected, tol=1e-5):
    assert torch.allclose(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=0,
    ), (actual, expected)


def test_group_advantages_std_is_unbiased():
    # (r - mean) / std: group 0 (2/3, -1/3, -1/3) / (1/sqrt 3); group 1 (-2, 0, 2) / 2
    close(
        group_advantages(REWARDS, 3, eps=0.0), [2 / SQRT3, -1 / SQRT3, -1 / SQRT3, -1.0, 0.0, 1.0]
    )
    # the default eps 1e-4 is added to the std: -2 / 2.0001
    close(group_advantages(REWARDS, 3)[3:], [-0.99995, 0.0, 0.99995], tol=1e-6)


def test_group_advantages_none_and_leave_one_out():
    close(group_advantages(REWARDS, 3, scale="none"), [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])
    # r_i - mean of the other two: 1 - 0, 0 - 0.5, 0 - 0.5 | 2 - 5, 4 - 4, 6 - 3
    close(
        group_advantages(REWARDS, 3, scale="none", leave_one_out=True),
        [1.0, -0.5, -0.5, -3.0, 0.0, 3.0],
    )
    # the same divided by the group's std (sqrt(1/3), 2)
    close(
        group_advantages(REWARDS, 3, scale="std", leave_one_out=True, eps=0.0),
        [SQRT3, -0.5 * SQRT3, -0.5 * SQRT3, -1.5, 0.0, 1.5],
    )


def test_group_advantages_groups_are_consecutive_rows():
    # groups of 2 over the same rewards: (1, 0), (0, 2), (4, 6): mean-centred +-0.5, -+1, -+1
    close(group_advantages(REWARDS, 2, scale="none"), [0.5, -0.5, -1.0, 1.0, -1.0, 1.0])
    # one answer per prompt: no signal, and no NaN from the std of one number
    close(group_advantages(torch.tensor([3.0, 5.0]), 1), [0.0, 0.0])


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(REWARDS, 3, scale="batch")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(REWARDS, 1, leave_one_out=True)
    with pytest.raises(ValueError, match="at least 1"):
        group_advantages(REWARDS, 0)


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.4])
    assert (
        zero_variance_groups(rewards, 3).tolist()
        == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    )
    assert zero_variance_groups(rewards, 6).tolist() == [False] * 12
    with pytest.raises(ValueError):
        zero_variance_groups(rewards, 5)


def _token_batch():
    # row 0, A = +1: ratios 1.5, 1.25, 0.5; row 1, A = -1: ratios 0.5, 1.0, then padding with a wild
    # ratio of 10
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(1.25), math.log(0.5)], [math.log(0.5), 0.0, math.log(10.0)]]
    )
    logp = (old + log_ratio).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_token_clipping_with_clip_higher():
    logp, old, adv, mask = _token_batch()
    loss, clipfrac, approx_kl = clipped_policy_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.28
    )
    # row 0: max(-1.5, -1.28) = -1.28 (clipped above),
    #        max(-1.25, -1.25) = -1.25 (1.25 < 1.28: not clipped),
    #        max(-0.5, -0.8) = -0.5 (A > 0 and r low: the pessimistic bound keeps r); mean -1.01
    # row 1: max(0.5, 0.8) = 0.8 (clipped below), max(1.0, 1.0) = 1.0; mean 0.9.
    # Answer mean (-1.01 + 0.9) / 2
    close(loss, -0.055)
    close(clipfrac, 2 / 5)
    close(approx_kl, 0.5 * (0.4054651**2 + 0.2231436**2 + 0.6931472**2 + 0.6931472**2 + 0.0) / 5)
    loss.backward()
    # d/dlogp of -A r / n_i / batch where unclipped (r * 1/3 * 1/2 in row 0, r * 1/2 * 1/2 in
    # row 1), 0 where clipped
    close(logp.grad, [[0.0, -1.25 / 6, -0.5 / 6], [0.0, 1.0 / 4, 0.0]])

    # symmetric clipping (eps_high = eps_low = 0.2) also clips the ratio 1.25:
    # row 0 mean (-1.2 - 1.2 - 0.5) / 3
    loss, clipfrac, _ = clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    close(loss, ((-1.2 - 1.2 - 0.5) / 3 + 0.9) / 2)
    close(clipfrac, 3 / 5)


def _sequence_batch():
    # row 0: A = 2, 2 tokens, log ratios 0.1, 0.3 (mean 0.2) and a padding token with log ratio 5
    # row 1: A = 1, 3 tokens, log ratios 0.2, 0.4, 0.6 (mean 0.4, s = 1.4918 > 1.28: clipped)
    # row 2: A = -1, 2 tokens, log ratios -0.5, -0.5 (s = 0.6065 < 0.8: clipped)
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.4, -1.1, -2.2], [-0.9, -0.1, -0.1]])
    log_ratio = torch.tensor([[0.1, 0.3, 5.0], [0.2, 0.4, 0.6], [-0.5, -0.5, 0.0]])
    logp = (old + log_ratio).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, torch.tensor([2.0, 1.0, -1.0]), mask


def test_sequence_ratio_value_and_gradient():
    logp, old, adv, mask = _sequence_batch()
    loss, clipfrac, approx_kl = clipped_policy_loss(
        logp, old, adv, mask, 0.2, 0.28, ratio_level="sequence"
    )
    s0 = 1.2214028  # exp(0.2): the geometric mean of the token ratios, not their product exp(0.4)
    # per answer: -2 * s0 (unclipped), -1 * 1.28 (clipped above), +1 * 0.8 (clipped below); mean
    # over 3 answers
    close(loss, (-2 * s0 - 1.28 + 0.8) / 3)
    close(clipfrac, 2 / 3)  # answers, not tokens (that would be 5 / 7)
    close(approx_kl, 0.5 * (0.01 + 0.09 + 0.04 + 0.16 + 0.36 + 0.25 + 0.25) / 7)
    loss.backward()
    # unclipped answer: d loss / d logp_t = -(1/batch) * s_i * A * (1/n_i)
    # = -(1/3) * 1.2214028 * 2 * (1/2) on each real token, the same for both though their own
    # ratios differ; clipped answers and padding: 0
    g = -s0 * 2 / 2 / 3
    close(logp.grad, [[g, g, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_sequence_ratio_gradient_matches_the_sequence_objective():
    # the token form's gradient is that of the sequence objective -A * exp(mean_t log r_t), computed
    # directly
    logp, old, adv, mask = _sequence_batch()
    clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, ratio_level="sequence")[0].backward()
    direct = logp.detach().clone().requires_grad_()
    s0 = torch.exp(((direct - old)[0] * mask[0]).sum() / 2)
    (-2 * s0 / 3).backward()
    close(logp.grad[0], direct.grad[0].tolist())


def test_gspo_published_clip_range_clips_sequences():
    # with GSPO's eps 3e-4 / 4e-4 the answer with s = exp(0.2) is clipped too: no gradient anywhere
    logp, old, adv, mask = _sequence_batch()
    loss, clipfrac, _ = clipped_policy_loss(
        logp, old, adv, mask, 3e-4, 4e-4, ratio_level="sequence"
    )
    close(loss, (-2 * 1.0004 - 1.0004 + 0.9997) / 3)
    close(clipfrac, 1.0)
    loss.backward()
    close(logp.grad, torch.zeros(3, 3).tolist())


# answers of different lengths: 4 tokens each worth 1, and 1 token worth 3 (padding holds 100, never
# counted)
PER_TOKEN = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 100.0, 100.0, 100.0]])
LENGTH_MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregations_weight_answers_differently():
    close(
        aggregate(PER_TOKEN, LENGTH_MASK, "sequence_mean"), (1.0 + 3.0) / 2
    )  # each answer counts once: 2.0
    close(
        aggregate(PER_TOKEN, LENGTH_MASK, "token_mean"), (4 * 1.0 + 3.0) / 5
    )  # the long answer dominates: 1.4
    close(
        aggregate(PER_TOKEN, LENGTH_MASK, "constant", max_tokens=8), (4 * 1.0 + 3.0) / (2 * 8)
    )  # 0.4375


def test_aggregation_token_weights():
    # the weight each token gets in the loss (its gradient): sequence_mean 1/(batch n_i), token_mean
    # 1/sum n_i, constant 1/(batch max_tokens); padding 0
    expected = {
        "sequence_mean": ([1 / 8] * 4, 1 / 2),
        "token_mean": ([1 / 5] * 4, 1 / 5),
        "constant": ([1 / 16] * 4, 1 / 16),
    }
    for name, (long_row, short_token) in expected.items():
        x = PER_TOKEN.clone().requires_grad_()
        aggregate(x, LENGTH_MASK, name, max_tokens=8).backward()
        close(x.grad, [long_row, [short_token, 0.0, 0.0, 0.0]])


def test_aggregation_in_the_policy_loss():
    # ratio 1 everywhere: the loss is the aggregate of -A; A = -1 on the long answer, +3 on the
    # short one
    logp = torch.zeros(2, 4)
    adv = torch.tensor([-1.0, 3.0])
    for name, expected in (
        ("sequence_mean", (1.0 - 3.0) / 2),
        ("token_mean", (4 * 1.0 - 3.0) / 5),
        ("constant", (4 * 1.0 - 3.0) / 16),
    ):
        loss, clipfrac, approx_kl = clipped_policy_loss(
            logp, logp, adv, LENGTH_MASK, 0.2, 0.2, aggregation=name, max_tokens=8
        )
        close(loss, expected)
        close(clipfrac, 0.0)
        close(approx_kl, 0.0)


def test_kl_penalty_k3():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), -1.3]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -1.3]])
    # ref - logp = log 0.5: 0.5 + 0.6931472 - 1; log 2: 2 - 0.6931472 - 1; equal: 0
    close(kl_penalty(logp, ref), [[0.1931472, 0.3068528, 0.0]])
    assert (kl_penalty(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_bad_loss_arguments():
    logp, old, adv, mask = _token_batch()
    with pytest.raises(ValueError, match="max_tokens"):
        clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2, aggregation="constant")
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(PER_TOKEN, LENGTH_MASK, "constant")
    with pytest.raises(ValueError, match="aggregation"):
        clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2, aggregation="sum")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(PER_TOKEN, LENGTH_MASK, "mean")
    with pytest.raises(ValueError, match="ratio_level"):
        clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2, ratio_level="answer")


def test_variants_table():
    keys = {
        "scale",
        "leave_one_out",
        "ratio_level",
        "aggregation",
        "dynamic_sampling",
        "eps_low",
        "eps_high",
    }
    assert set(VARIANTS) == {"grpo", "dapo", "dr_grpo", "gspo", "rloo"}
    for settings in VARIANTS.values():
        assert set(settings) == keys
    assert VARIANTS["dapo"]["eps_high"] == 0.28 and VARIANTS["dapo"]["dynamic_sampling"]
    gspo = VARIANTS["gspo"]
    assert (gspo["eps_low"], gspo["eps_high"], gspo["ratio_level"]) == (3e-4, 4e-4, "sequence")
    assert (
        VARIANTS["dr_grpo"]["scale"] == "none" and VARIANTS["dr_grpo"]["aggregation"] == "constant"
    )
    assert VARIANTS["rloo"]["leave_one_out"] and VARIANTS["rloo"]["scale"] == "none"
    # every variant's settings are accepted by the functions
    logp, old, _, mask = _token_batch()
    for settings in VARIANTS.values():
        adv = group_advantages(
            torch.tensor([1.0, 0.0]),
            2,
            scale=settings["scale"],
            leave_one_out=settings["leave_one_out"],
        )
        eps_low = settings["eps_low"] if settings["eps_low"] is not None else 0.2
        eps_high = settings["eps_high"] if settings["eps_high"] is not None else eps_low
        loss, _, _ = clipped_policy_loss(
            logp,
            old,
            adv,
            mask,
            eps_low,
            eps_high,
            ratio_level=settings["ratio_level"],
            aggregation=settings["aggregation"],
            max_tokens=3,
        )
        assert torch.isfinite(loss)


@pytest.mark.parametrize("loss_of", ["ppo", "dapo token_mean"])
def test_token_means_do_not_depend_on_the_accumulation_steps(loss_of):
    """A mini-batch of answers of 40, 5, 12 and 3 tokens: in one micro-batch, or in four with
    gradient accumulation (each micro-batch's loss divided by the steps, as the updaters do), the
    gradient is the same once each micro-batch's token mean is weighed by its token share
    (loop.token_share); without it a 3-token answer weighs like a 40-token one."""
    from pipeline.rl import ppo_math
    from pipeline.rl.loop import token_share

    torch.manual_seed(0)
    lengths = torch.tensor([40, 5, 12, 3])
    mask = (torch.arange(40)[None] < lengths[:, None]).float()
    old, adv = -torch.rand(4, 40) * 3, torch.randn(4, 40)

    def loss(logp, i):
        if loss_of == "ppo":
            return ppo_math.policy_loss(logp[i], old[i], adv[i], mask[i], 0.2)[0]
        return clipped_policy_loss(
            logp[i], old[i], adv[i, 0], mask[i], 0.2, 0.28, "token", "token_mean", 40
        )[0]

    def gradient(accumulation, weighed):
        logp = old + 0.05 * torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
        logp.requires_grad_()
        micro, mini = 4 // accumulation, float(lengths.sum())
        for start in range(0, 4, micro):
            i = slice(start, start + micro)
            share = token_share(lengths[i], mini, accumulation) if weighed else 1.0
            (loss(logp, i) * share / accumulation).backward()
        return logp.grad

    whole = gradient(1, True)
    assert torch.equal(whole, gradient(1, False))  # one micro-batch: the share is 1
    assert torch.allclose(gradient(4, True), whole, atol=1e-7)
    assert (gradient(4, False) - whole).norm() > 0.5 * whole.norm()
