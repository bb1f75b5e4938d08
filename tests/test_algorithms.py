"""Algorithms as values: `make`, user-written stages, and the compiled `step` against references.

Every step here trains on one fixed, hand-designed batch: `FixedRollout` (a user-written rollout
stage) returns the same completions a sampler with a fixed key would, and delegates the group
selection to the algorithm's own rollout stage (so DAPO's dynamic sampling still runs). The
policy optimizer is plain SGD with learning rate 1 (`SGD`, a user-written `Optimizer`), so one
update's parameter change is exactly minus the gradient the step used (AdamW's first update is
about `lr * sign(grad)`, which would hide most gradient differences); the numbers are compared
with gradients of objectives written here from `docs/algorithms.md`, and advantages and
rewards computed in numpy.

One tiny model configuration is reused throughout, and the algorithm values are built the same
way wherever possible, so that compiled steps are shared between tests (jit cache hits).
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradflow.algorithms import (
    NAMES,
    Algorithm,
    TaskReward,
    hyperparameter_table,
    hyperparameter_types,
    hyperparameters,
    make,
)
from gradflow.batch import Prompts
from gradflow.logprobs import completion_logprobs
from gradflow.losses import AGG_MODES
from gradflow.models import ModelConfig, init_from_config
from gradflow.optim import Optimizer
from gradflow.rollout import Completions
from gradflow.stages import (
    GAE,
    GRPO,
    RLOO,
    AbstractAdvantage,
    AbstractLoss,
    AbstractRollout,
    DynamicSampling,
    HostReward,
    Mean,
    OverlongPenalty,
    PolicyLoss,
    Reinforce,
    ReinforcePP,
    ReinforcePPBaseline,
    RewardOutput,
    Sampling,
    Share,
    UpdateBatch,
)
from gradflow.state import init_state
from gradflow.step import step

P, G, T, PROMPT_LEN = 4, 4, 6, 3  # prompts per step, group size, max_new_tokens, prompt slots
B = P * G
EOS, PAD, NAN_TOKEN = 1, 0, 7
LR = 1.0  # SGD: new = old - LR * grad
SIX = ("reinforce", "ppo", "grpo", "dapo", "rloo", "reinforce_pp")

CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=64,
)
MODEL = init_from_config(CONFIG, key=jax.random.key(0))
# A reference far from the policy (sharper logits), so that KL terms are clearly visible.
_other = init_from_config(CONFIG, key=jax.random.key(1))
REFERENCE = eqx.tree_at(lambda m: m.embed, _other, _other.embed * 8.0)
STEP_KEY = jax.random.key(2)


# ---------------------------------------------------------------------------------------------
# The reward: a host scorer over tokens. It returns NaN for completions holding NAN_TOKEN (which
# HostReward must score 0).


def scorer(tokens, mask, index):
    valid = np.maximum(mask.sum(1), 1)
    even = ((tokens % 2 == 0) & mask).sum(1) / valid
    score = np.where(((tokens == NAN_TOKEN) & mask).any(1), np.nan, even)
    return np.stack([score, (even > 0.5).astype(np.float32)]).astype(np.float32)


REWARD = HostReward(scorer=scorer, parts=("score", "correct"), weights=(1.0, 0.5))


def reward_ref(tokens, mask):
    """Total reward per row, from the scorer's definition, with NaN scored 0 (float64)."""
    out = []
    for row, m in zip(tokens, mask, strict=True):
        valid = [int(t) for t, v in zip(row, m, strict=True) if v]
        if NAN_TOKEN in valid:
            out.append(0.0)  # both parts of a NaN sample are scored 0
            continue
        even = sum(t % 2 == 0 for t in valid) / max(len(valid), 1)
        out.append(even + 0.5 * float(even > 0.5))
    return np.array(out)


def overlong_ref(lengths, max_new, buffer, factor=1.0):
    return np.array(
        [-min(max((n - (max_new - buffer)) / buffer, 0.0), 1.0) * factor for n in lengths]
    )


# ---------------------------------------------------------------------------------------------
# The fixed batch.


def _completions(rows, seed):
    """Random completions with varied lengths; some end with EOS, some are truncated."""
    rng = np.random.RandomState(seed)
    allowed = np.array([t for t in range(2, 32) if t != NAN_TOKEN])
    tokens = np.full((rows, T), PAD, np.int32)
    mask = np.zeros((rows, T), bool)
    for b in range(rows):
        n = rng.randint(2, T + 1)
        body = rng.choice(allowed, n)
        if n < T or rng.rand() < 0.5:
            body[-1] = EOS
        tokens[b, :n], mask[b, :n] = body, True
    return tokens, mask


def _as_completions(tokens, mask):
    lengths = mask.sum(1)
    finished = np.array(
        [m.any() and row[m.sum() - 1] == EOS for row, m in zip(tokens, mask, strict=True)]
    )
    return Completions(
        tokens=jnp.asarray(tokens, jnp.int32),
        mask=jnp.asarray(mask),
        logprobs=jnp.zeros(tokens.shape, jnp.float32),
        sampling_logprobs=jnp.zeros(tokens.shape, jnp.float32),
        lengths=jnp.asarray(lengths, jnp.int32),
        finished=jnp.asarray(finished),
    )


TOKENS, MASK = _completions(B, seed=3)
TOKENS[5, 0] = NAN_TOKEN  # one sample whose score is NaN
COMPLETIONS = _as_completions(TOKENS, MASK)
LENGTHS = MASK.sum(1)
FINISHED = np.asarray(COMPLETIONS.finished)
REWARDS = reward_ref(TOKENS, MASK)

_prompt_ids = np.random.RandomState(4).randint(2, 32, (3 * P, PROMPT_LEN)).astype(np.int32)
_prompt_mask = np.ones((3 * P, PROMPT_LEN), bool)
_prompt_ids[0, 0], _prompt_mask[0, 0] = PAD, False  # a left-padded prompt
PROMPTS = Prompts(
    ids=jnp.asarray(_prompt_ids[:P]), mask=jnp.asarray(_prompt_mask[:P]), index=jnp.arange(P)
)
# DAPO samples 3P prompts: the first P groups are the batch above, the other 2P groups are
# uniform (each holds one completion G times), so its dynamic sampling keeps exactly the batch.
DAPO_PROMPTS = Prompts(
    ids=jnp.asarray(_prompt_ids), mask=jnp.asarray(_prompt_mask), index=jnp.arange(3 * P)
)
_extra_tokens, _extra_mask = _completions(2 * P, seed=5)
DAPO_COMPLETIONS = _as_completions(
    np.concatenate([TOKENS, np.repeat(_extra_tokens, G, 0)]),
    np.concatenate([MASK, np.repeat(_extra_mask, G, 0)]),
)

# What the step trains on: prompt + completion ids (rows g*G ... share prompt g).
IDS = jnp.asarray(np.concatenate([np.repeat(_prompt_ids[:P], G, 0), TOKENS], 1))
FULL_MASK = jnp.asarray(np.concatenate([np.repeat(_prompt_mask[:P], G, 0), MASK], 1))


def test_fixed_batch_is_as_designed():
    """The properties the other tests rely on (varied rewards, groups, lengths)."""
    grouped = REWARDS.reshape(P, G)
    assert np.all(grouped.max(1) > grouped.min(1))  # every group informative...
    assert len({round(s, 6) for s in grouped.std(1)}) == P  # ...with different spreads
    assert len(set(LENGTHS)) > 2 and (~FINISHED).any() and FINISHED.any()
    assert (LENGTHS == T).any()  # overlong under DAPO's shaping (buffer T // 4)
    assert np.isnan(scorer(TOKENS, MASK, np.zeros(B))[0, 5])


# ---------------------------------------------------------------------------------------------
# User-written stages used by the tests.


class FixedRollout(AbstractRollout):
    """Returns fixed completions; `prompts_to_sample` and `select` are the inner stage's;
    `filtered` says whether they count as drawn with top-k/top-p."""

    completions: Completions
    inner: AbstractRollout
    filtered: bool = False

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    @property
    def max_new_tokens(self) -> int:
        return self.inner.max_new_tokens

    @property
    def temperature(self) -> float:
        return self.inner.temperature

    def prompts_to_sample(self, prompts_per_step):
        return self.inner.prompts_to_sample(prompts_per_step)

    def __call__(self, policy, prompts, key):
        return self.completions

    def select(self, rewards, prompts_per_step):
        return self.inner.select(rewards, prompts_per_step)


class SGD(Optimizer):
    """Plain SGD (`new = old - learning_rate * grad`; no clipping, no schedule)."""

    def transform(self):
        return optax.sgd(self.learning_rate)


def prepared(algorithm, completions=COMPLETIONS):
    """`algorithm` on the fixed batch, with SGD for the policy (and critic)."""
    algorithm = eqx.tree_at(
        lambda a: a.rollout, algorithm, FixedRollout(completions, algorithm.rollout)
    )
    algorithm = eqx.tree_at(lambda a: a.optimizer, algorithm, SGD(learning_rate=LR))
    if algorithm.critic_optimizer is not None:
        algorithm = eqx.tree_at(lambda a: a.critic_optimizer, algorithm, SGD(learning_rate=LR))
    return algorithm


def make_fixed(name, **overrides):
    completions = DAPO_COMPLETIONS if name == "dapo" else COMPLETIONS
    if name == "dapo":
        # Groups 1 and 2 of the fixed batch are all wrong (its `correct` part is uniform there):
        # judged by the varied `score` part, DAPO keeps the fixed batch whole.
        overrides.setdefault("dynamic_sampling_metric", "score")
    algorithm = make(
        name, reward=REWARD, eos_token_ids=(EOS,), group_size=G, max_new_tokens=T, **overrides
    )
    return prepared(algorithm, completions)


def flat(model):
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def run(algorithm, *, model=MODEL, reference=None, prompts=PROMPTS):
    """One step from a copy of `model` (the step donates its state); returns the new state, the
    metrics and the policy's parameter change divided by -LR (the gradient, under SGD)."""
    state = init_state(algorithm, jax.tree.map(jnp.copy, model), key=jax.random.key(9))
    if reference is not None:
        state = eqx.tree_at(lambda s: s.reference, state, jax.tree.map(jnp.copy, reference))
    state, metrics = step(algorithm, state, prompts, STEP_KEY)
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    return state, metrics, (flat(model) - flat(state.policy)) / LR


@functools.cache
def named_run(name):
    """Gradient and metrics of one step of a named algorithm on the fixed batch."""
    prompts = DAPO_PROMPTS if name == "dapo" else PROMPTS
    _, metrics, grad = run(make_fixed(name), prompts=prompts)
    return grad, metrics


# ---------------------------------------------------------------------------------------------
# Independent references.


def masked_whiten_ref(x, m):
    vals = x[m.astype(bool)]
    mean, var = vals.mean(), vals.var(ddof=1)
    return (x - mean) / np.sqrt(var + 1e-8) * m


def gae_ref(r, v, m, gamma=1.0, lam=1.0):
    """GAE with a 0 bootstrap after the last valid token, then whitened over valid tokens."""
    adv = np.zeros(r.shape)
    for b in range(r.shape[0]):
        running = 0.0
        for t in reversed(range(r.shape[1])):
            if not m[b, t]:
                running = 0.0
                continue
            next_v = v[b, t + 1] if t + 1 < r.shape[1] and m[b, t + 1] else 0.0
            running = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * running
            adv[b, t] = running
    return masked_whiten_ref(adv, m)


def token_rewards_ref(seq_rewards):
    r = np.zeros((B, T))
    r[np.arange(B), LENGTHS - 1] = seq_rewards
    return r


@eqx.filter_jit
def _logprobs(model):
    return completion_logprobs(model, IDS, FULL_MASK, PROMPT_LEN)[0]


def logprobs_of(model):
    return np.asarray(_logprobs(model), np.float64)


def k3_ref(logp, ref_logp):
    d = np.clip(logp - ref_logp, -20, 20)
    return np.clip(np.exp(-d) - 1 + d, -10, 10)


def agg_ref(x, m, mode):
    """The aggregation modes from their definitions (numpy)."""
    rows = [x[b][m[b]] for b in range(m.shape[0])]
    valid = [row for row in rows if len(row)]
    if mode == "token-mean":
        return np.concatenate(rows).mean()
    if mode == "seq-mean-token-mean":
        return np.mean([row.mean() for row in valid])
    if mode == "seq-mean-token-sum":
        return np.mean([row.sum() for row in valid])
    if mode == "seq-mean-token-sum-norm":
        return np.concatenate(rows).sum() / m.size
    raise AssertionError(mode)


REF_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@eqx.filter_jit
def reference_grad(model, mask, advantages, ref_logp, beta, agg_onehot):
    """Gradient of `agg(-A * logp + beta * k3(logp - ref_logp))` (the PPO-clip loss at ratio 1
    has the gradient of `-A * logp`); the aggregation is picked by `agg_onehot` over REF_AGGS."""

    def objective(model):
        logp = completion_logprobs(model, IDS, FULL_MASK, PROMPT_LEN)[0]
        m = mask.astype(jnp.float32)
        d = jnp.clip(logp - ref_logp, -20.0, 20.0)
        k3 = jnp.clip(jnp.exp(-d) - 1.0 + d, -10.0, 10.0)
        x = (-advantages * logp + beta * k3) * m
        row_tokens = jnp.sum(m, axis=1)
        rows = jnp.sum((row_tokens > 0).astype(jnp.float32))
        aggs = jnp.stack(
            [
                jnp.sum(x) / jnp.sum(m),
                jnp.sum(jnp.sum(x, axis=1) / jnp.maximum(row_tokens, 1.0)) / rows,
                jnp.sum(x) / rows,
                jnp.sum(x) / (m.shape[0] * m.shape[1]),
            ]
        )
        return jnp.sum(aggs * agg_onehot)

    return eqx.filter_grad(objective)(model)


def expected_grad(advantages, *, ref_logp=None, beta=0.0, agg="token-mean"):
    ref_logp = np.zeros((B, T)) if ref_logp is None else ref_logp
    grads = reference_grad(
        MODEL,
        jnp.asarray(MASK),
        jnp.asarray(advantages, jnp.float32),
        jnp.asarray(ref_logp, jnp.float32),
        jnp.asarray(beta, jnp.float32),
        jnp.asarray(np.eye(len(REF_AGGS))[REF_AGGS.index(agg)], jnp.float32),
    )
    return flat(grads)


def relative_gap(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b))


def assert_grad_close(actual, expected):
    scale = np.max(np.abs(expected))
    assert scale > 1e-3
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=2e-5 * scale)


def grpo_advantages_ref(rewards=REWARDS):
    grouped = rewards.reshape(P, G)
    adv = (grouped - grouped.mean(1, keepdims=True)) / (
        grouped.std(1, ddof=1, keepdims=True) + 1e-6
    )
    return adv.reshape(-1)[:, None] * MASK


def reinforce_pp_advantages_ref(token_rewards):
    """gamma = 1: reward-to-go over valid tokens, whitened over the batch's valid tokens."""
    returns = np.flip(np.cumsum(np.flip(token_rewards * MASK, 1), 1), 1) * MASK
    return masked_whiten_ref(returns, MASK)


# ---------------------------------------------------------------------------------------------
# 1. `make`, `hyperparameters`.

# The presets as `docs/algorithms.md` and the table in `gradflow.algorithms` define them.
PRESETS = {
    "reinforce": (Reinforce(), PolicyLoss()),
    "ppo": (GAE(), PolicyLoss(minibatches=4)),
    "grpo": (GRPO(), PolicyLoss(kl_coef=0.001)),
    "dapo": (GRPO(), PolicyLoss(clip_high=0.28, agg="token-mean", mask_truncated=True)),
    "rloo": (RLOO(), PolicyLoss()),
    "reinforce_pp": (ReinforcePP(), PolicyLoss(kl_coef=0.001, kl_placement="reward")),
    "reinforce_pp_baseline": (ReinforcePPBaseline(), PolicyLoss(kl_coef=0.001)),
    "dr_grpo": (GRPO(scale_by_std=False), PolicyLoss(agg="seq-mean-token-sum-norm")),
    "gspo": (
        GRPO(),
        PolicyLoss(
            ratio_level="sequence",
            clip_low=3e-4,
            clip_high=4e-4,
            dual_clip=None,
            agg="seq-mean-token-mean",
            minibatches=2,
        ),
    ),
}


def test_every_name_builds_its_preset():
    assert set(NAMES) == set(PRESETS)
    for name in NAMES:
        algorithm = make(name, reward=REWARD, eos_token_ids=(EOS,), pad_token_id=PAD)
        assert isinstance(algorithm, Algorithm)
        advantage, loss = PRESETS[name]
        assert algorithm.advantage == advantage, name
        assert algorithm.loss == loss, name
        assert algorithm.optimizer == Optimizer(learning_rate=1e-6, grad_clip=1.0)
        sampling = algorithm.rollout.sampling if name == "dapo" else algorithm.rollout
        assert sampling == Sampling(eos_token_ids=(EOS,), pad_token_id=PAD)
        if name == "ppo":
            assert algorithm.critic_optimizer == Optimizer(learning_rate=1e-5)
        else:
            assert algorithm.critic_optimizer is None
        if name == "dapo":
            assert algorithm.rollout == DynamicSampling(sampling=sampling, oversample=3)
            assert algorithm.reward == OverlongPenalty(inner=REWARD, buffer=None, factor=1.0)
        else:
            assert isinstance(algorithm.rollout, Sampling) and algorithm.reward is REWARD
    # GRPO's normaliser is std + 1e-6 (the docs), not AdamW's eps.
    assert make("grpo", reward=REWARD).advantage.std_eps == 1e-6


@pytest.mark.parametrize(
    ("bad", "suggestion"), [("grpoo", "grpo"), ("reinforcepp", "reinforce_pp")]
)
def test_unknown_name_suggests_and_lists(bad, suggestion):
    for call in (lambda: make(bad, reward=REWARD), lambda: hyperparameters(bad)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert f"unknown algorithm {bad!r} (did you mean {suggestion!r}?)" in message
        assert message.split("valid: ")[1].split(", ") == list(NAMES)
    with pytest.raises(ValueError, match="valid: reinforce, ppo") as info:
        make("zzzzzz", reward=REWARD)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "bad", "suggestion"),
    [
        ("ppo", "clip_hihg", "clip_high"),
        ("grpo", "learning_rte", "learning_rate"),
        ("ppo", "critic_learning_rat", "critic_learning_rate"),
        ("dapo", "oversampel", "oversample"),
        ("grpo", "critic_learning_rate", None),  # no critic outside PPO
        ("grpo", "oversample", None),  # dynamic sampling is DAPO's
    ],
)
def test_unknown_hyperparameter_suggests_and_lists(name, bad, suggestion):
    with pytest.raises(ValueError) as info:
        make(name, reward=REWARD, **{bad: 1})
    message = str(info.value)
    assert f"unknown hyperparameter {bad!r}" in message
    if suggestion is not None:
        assert f"did you mean {suggestion!r}" in message
    valid = message.split("valid: ")[1].split(", ")
    assert sorted(valid) == sorted(hyperparameters(name))


def _fields(module, prefix=()):
    """(path, value) of every dataclass field, recursively through modules (not the scorer)."""
    out = {}
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        path = (*prefix, field.name)
        if isinstance(value, eqx.Module) and not isinstance(value, HostReward):
            out.update(_fields(value, path))
        elif not isinstance(value, HostReward):
            out[path] = value
    return out


def _other_value(key, value):
    special = {
        "agg": "seq-mean-token-sum",
        "ratio_level": "token" if value == "sequence" else "sequence",
        "kl_placement": "reward" if value == "loss" else "loss",
        "kl_estimator": "k2",
        "schedule": "cosine",
        "overlong_buffer": 3,
        "dual_clip": 5.0,
        "dynamic_sampling_metric": "score",
        "rollout_correction": "token_tis",
        "norm_constant": "time",
        "rollout_correction_threshold": 3.0,
        "pack_tokens": 64,
    }
    if key.removeprefix("critic_") in special:
        return special[key.removeprefix("critic_")]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value >= 0.5 else value + 0.25
    raise AssertionError((key, value))


# Hyperparameters whose stage field has another name.
FIELD_NAMES = {
    "overlong_buffer": {"buffer"},
    "overlong_factor": {"factor"},
    "dynamic_sampling_metric": {"metric"},
}


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_what_make_accepts_and_land_in_their_field(name):
    defaults = hyperparameters(name)
    base = make(name, reward=REWARD)
    base_fields = _fields(base)
    optimizer_fields = {f.name for f in dataclasses.fields(Optimizer)}
    for key, default in defaults.items():
        # Passing the default changes nothing.
        assert eqx.tree_equal(make(name, reward=REWARD, **{key: default}), base), key
        # Another value changes exactly the field(s) named by the key, in the right stage.
        value = _other_value(key, default)
        changed = _fields(make(name, reward=REWARD, **{key: value}))
        diff = [path for path in base_fields if changed[path] != base_fields[path]]
        assert diff, f"{name}: {key} changed nothing"
        for path in diff:
            if key.startswith("critic_"):
                assert path == ("critic_optimizer", key.removeprefix("critic_")), (key, path)
            elif key in optimizer_fields:
                assert path == ("optimizer", key), (key, path)
            else:
                assert path[0] not in ("optimizer", "critic_optimizer"), (key, path)
                assert path[-1] in FIELD_NAMES.get(key, {key}), (key, path)
        if key in FIELD_NAMES.get(key, {key}) and len(diff) == 1:
            assert changed[diff[0]] == value


class EpsGRPO(AbstractAdvantage):
    """GRPO with its normaliser named `eps`, as AdamW's is."""

    eps: float = 1e-6

    def __call__(self, token_rewards, mask, values, group_size):
        return GRPO(std_eps=self.eps)(token_rewards, mask, values, group_size)


def test_a_name_two_stages_share_fails_when_the_preset_is_defined():
    preset = Algorithm(Sampling(), TaskReward(), EpsGRPO(), PolicyLoss(), Optimizer())
    with pytest.raises(
        ValueError, match="'eps' is a field of both advantage.eps and optimizer.eps"
    ):
        hyperparameter_table(preset)


def test_hyperparameter_types_are_the_stage_field_types():
    types = hyperparameter_types("dapo")
    assert types["overlong_buffer"] == int | None and types["dual_clip"] == float | None
    assert types["kl_estimator"] == str | None and types["oversample"] is int
    assert types["clip_high"] is float and types["mask_truncated"] is bool
    assert hyperparameter_types("ppo")["critic_learning_rate"] is float
    for name in NAMES:
        assert set(hyperparameter_types(name)) == set(hyperparameters(name))


def test_overrides_land_in_the_right_stage():
    ppo = make("ppo", reward=REWARD, clip_high=0.3, group_size=5, critic_learning_rate=3e-4)
    assert ppo.loss.clip_high == 0.3 and ppo.loss.clip_low == 0.2
    assert ppo.rollout.group_size == 5
    assert ppo.critic_optimizer.learning_rate == 3e-4 and ppo.optimizer.learning_rate == 1e-6
    ppo = make("ppo", reward=REWARD, learning_rate=2e-6, gamma=0.9, lam=0.95)
    assert ppo.optimizer.learning_rate == 2e-6 and ppo.critic_optimizer.learning_rate == 1e-5
    assert ppo.advantage == GAE(gamma=0.9, lam=0.95)
    dapo = make("dapo", reward=REWARD, oversample=4, max_new_tokens=40, overlong_buffer=8)
    assert dapo.rollout.oversample == 4 and dapo.rollout.prompts_to_sample(3) == 12
    assert dapo.rollout.max_new_tokens == 40 and dapo.reward.buffer == 8
    grpo = make("grpo", reward=REWARD, eps=1e-5, std_eps=1e-3)
    assert grpo.optimizer.eps == 1e-5 and grpo.advantage.std_eps == 1e-3


# ---------------------------------------------------------------------------------------------
# 2. A user-written stage drops in with no registry edit.


class SignOfCentredReward(AbstractAdvantage):
    """`A_b = sign(s_b - mean_B s)` on every valid token."""

    def __call__(self, token_rewards, mask, values, group_size):
        scores = jnp.sum(token_rewards, axis=1)
        sign = jnp.sign(scores - jnp.mean(scores))
        return sign[:, None] * mask.astype(jnp.float32), None


def test_user_written_advantage_is_used_by_step():
    algorithm = Algorithm(
        rollout=FixedRollout(
            COMPLETIONS, Sampling(group_size=G, max_new_tokens=T, eos_token_ids=(EOS,))
        ),
        reward=REWARD,
        advantage=SignOfCentredReward(),
        loss=PolicyLoss(),
        optimizer=SGD(learning_rate=LR),
    )
    _, metrics, grad = run(algorithm)
    advantages = np.sign(REWARDS - REWARDS.mean())[:, None] * MASK
    np.testing.assert_allclose(metrics["advantage/mean"], advantages[MASK].mean(), rtol=1e-5)
    # One epoch, one minibatch: the PPO-clip loss is REINFORCE's, with these advantages.
    assert_grad_close(grad, expected_grad(advantages))


class CISPO(AbstractLoss):
    """CISPO (MiniMax-M1) written as a user stage: `-sg(min(r_t, 1 + eps_high)) · A_t · logp_t`
    over all tokens, with `r_t = π_θ(y_t) / μ(y_t)` against the distribution the tokens were
    drawn from (the batch's `sampling_logp`), so every token keeps its gradient."""

    eps_high: float = 0.28
    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 2
    logprob_chunk: int = 32
    packing: bool = True
    pack_tokens: int | None = None
    share_prompts: bool = True
    mask_truncated: bool = False
    needs_reference: bool = False
    needs_old_logprobs: bool = False

    def shape_rewards(self, token_rewards, mask, old_logp, ref_logp):
        return token_rewards

    def denominator(self, minibatch):
        return jnp.sum(minibatch.mask.astype(jnp.float32))

    def __call__(self, logp, entropy, values, batch, denominator):
        m = batch.mask.astype(jnp.float32)
        ratio = jnp.exp(jnp.where(batch.mask, logp - batch.sampling_logp, 0.0))
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + self.eps_high))
        objective = -jnp.sum(weight * batch.advantages * logp * m) / denominator
        clipped = jnp.sum((ratio > 1.0 + self.eps_high).astype(jnp.float32) * m)
        return objective, {
            "cispo/objective": Share(jax.lax.stop_gradient(objective)),
            "cispo/clipped": Mean(jax.lax.stop_gradient(clipped), jnp.sum(m)),
        }


def test_user_written_loss_is_used_by_step():
    """CISPO, written above with no edit to gradflow, trains in `Algorithm(loss=...)`: its step
    has the gradient of `-mean(min(r, 1.28) · A · logp)` with numpy GRPO advantages, and its own
    metrics reduce over its two micro-batches as they say (a token mean, a summed share)."""
    ratio = np.random.RandomState(12).uniform(0.5, 2.0, (B, T))
    logp = logprobs_of(MODEL)
    completions = dataclasses.replace(
        COMPLETIONS, sampling_logprobs=jnp.asarray(logp - np.log(ratio), jnp.float32)
    )
    rollout = Sampling(group_size=G, max_new_tokens=T, eos_token_ids=(EOS,))
    algorithm = Algorithm(
        rollout=FixedRollout(completions, rollout, filtered=True),
        reward=REWARD,
        advantage=GRPO(),
        loss=CISPO(),
        optimizer=SGD(learning_rate=LR),
    )
    _, metrics, grad = run(algorithm)
    advantages = grpo_advantages_ref()
    weight = np.minimum(ratio, 1.28)
    assert_grad_close(grad, expected_grad(advantages * weight))
    assert relative_gap(expected_grad(advantages * weight), expected_grad(advantages)) > 0.05
    np.testing.assert_allclose(metrics["cispo/clipped"], (ratio > 1.28)[MASK].mean(), rtol=1e-6)
    objective = -(weight * advantages * logp)[MASK].sum() / MASK.sum()
    np.testing.assert_allclose(metrics["cispo/objective"], objective, rtol=1e-4, atol=1e-6)
    assert "loss/policy" not in metrics  # nothing of PolicyLoss runs


# ---------------------------------------------------------------------------------------------
# 3. The named algorithms really differ.


def test_reward_metrics_and_dynamic_sampling_in_step():
    _, metrics = named_run("reinforce")
    np.testing.assert_allclose(metrics["reward/mean"], REWARDS.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward/min"], REWARDS.min(), rtol=1e-6)  # the NaN row: 0
    assert metrics["reward/min"] == 0.0
    _, metrics = named_run("dapo")
    assert metrics["dynamic_sampling/informative_groups"] == P
    assert metrics["dynamic_sampling/dropped_groups"] == 2 * P
    assert metrics["dynamic_sampling/uninformative_groups"] == 2 * P
    assert metrics["dynamic_sampling/refill_groups"] == 0
    lengths = np.asarray(DAPO_COMPLETIONS.lengths)
    penalty = overlong_ref(lengths, T, T // 4)
    np.testing.assert_allclose(metrics["reward/overlong_penalty"], penalty.mean(), rtol=1e-6)
    shaped = reward_ref(np.asarray(DAPO_COMPLETIONS.tokens), np.asarray(DAPO_COMPLETIONS.mask))
    np.testing.assert_allclose(metrics["reward/mean"], (shaped + penalty).mean(), rtol=1e-6)


def test_named_algorithms_update_differently():
    """From the same model, prompts and key, every pair of the six takes a different step.

    Pairs that coincide under special conditions, all excluded by the fixed batch (or the
    preset), and what separates them here:
    - reinforce / grpo: identical with a single group (P = 1); here P = 4.
    - grpo / rloo: proportional when every group has the same std; the spreads differ.
    - reinforce / reinforce_pp: with gamma = 1 REINFORCE++'s token returns are `s_b` on every
      valid token, whitened with token-weighted statistics; they equal reinforce's sequence
      statistics only when all lengths are equal. (Its reward KL is 0 on the first step, since
      the policy is the reference.)
    - ppo / reinforce_pp: with the zero-initialised critic and gamma = lambda = 1, GAE's
      advantages are exactly REINFORCE++'s; PPO differs through its 4 minibatches (4 sequential
      updates). With one minibatch they coincide: `test_ppo_one_minibatch_is_reinforce`.
    - dapo / grpo: DAPO keeps exactly this batch (the extra groups are uniform), and clip-higher
      is inactive at ratio 1, GRPO's k3 KL has zero gradient at policy = reference; they differ
      by DAPO's overlong shaping and overlong filtering (the batch has truncated completions).
    """
    grads = {name: named_run(name)[0] for name in SIX}
    for name, grad in grads.items():
        assert np.all(np.isfinite(grad)) and np.linalg.norm(grad) > 1e-3, name
    for i, a in enumerate(SIX):
        for b in SIX[i + 1 :]:
            gap = np.linalg.norm(grads[a] - grads[b])
            scale = max(np.linalg.norm(grads[a]), np.linalg.norm(grads[b]))
            assert gap > 1e-2 * scale, (a, b, gap / scale)


def test_grpo_gradient_with_kl_in_the_loss():
    """GRPO's step against `-mean(A logp) + beta * mean(k3)` with numpy group advantages."""
    _, metrics, grad = run(make_fixed("grpo"), reference=REFERENCE)
    ref_logp = logprobs_of(REFERENCE)
    k3 = k3_ref(logprobs_of(MODEL), ref_logp)
    assert k3[MASK].mean() > 0.1
    np.testing.assert_allclose(metrics["loss/kl_ref"], k3[MASK].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["loss/total"] - metrics["loss/policy"], 0.001 * k3[MASK].mean(), rtol=1e-3
    )
    advantages = grpo_advantages_ref()
    expected = expected_grad(advantages, ref_logp=ref_logp, beta=0.001)
    assert_grad_close(grad, expected)
    assert relative_gap(expected, expected_grad(advantages)) > 3e-4  # the KL term is visible


@pytest.mark.parametrize("highest", [1.0, 1.5])
def test_top_k_top_p_samples_are_weighed_by_the_kept_mass(highest):
    """Tokens drawn from a truncated distribution μ (top-k/top-p) enter the policy loss weighed
    by the kept mass Z = π_sampler(y)/μ(y) (the mismatch ρ = π_old/π_sampler is the
    `rollout_correction`'s, counted once there): here the sampler's log-prob is the policy's and
    its sampling log-prob that minus log(kept mass), and the gradient must be that of
    `-mean(min(kept, 1) * A * logp)` (a kept mass above 1 is capped at 1)."""
    kept = np.random.RandomState(11).uniform(0.3, highest, (B, T))
    sampling_logp = logprobs_of(MODEL) - np.log(kept)
    completions = dataclasses.replace(
        COMPLETIONS,
        logprobs=jnp.asarray(logprobs_of(MODEL), jnp.float32),
        sampling_logprobs=jnp.asarray(sampling_logp, jnp.float32),
    )
    algorithm = make("grpo", reward=REWARD, eos_token_ids=(EOS,), group_size=G, max_new_tokens=T)
    algorithm = prepared(algorithm, completions)
    algorithm = eqx.tree_at(lambda a: a.rollout.filtered, algorithm, True)
    _, metrics, grad = run(algorithm)
    weights = np.minimum(kept, 1.0)
    np.testing.assert_allclose(metrics["loss/kept_mass"], weights[MASK].mean(), rtol=1e-5)
    advantages = grpo_advantages_ref()
    expected = expected_grad(advantages * weights)
    assert_grad_close(grad, expected)
    assert relative_gap(expected, expected_grad(advantages)) > 0.05  # the weights are visible
    # Unfiltered sampling: no weights, and no kept-mass metric.
    assert "loss/kept_mass" not in named_run("grpo")[1]


# ---------------------------------------------------------------------------------------------
# 4. PPO.


def test_ppo_clips_with_several_updates():
    """The PPO preset makes 4 minibatch updates: after the first, the ratios of the later
    minibatches have left [0.8, 1.2] (SGD with learning rate 1 moves the policy far), and the
    clipping acts. (Its own compiled step is the one of `test_named_algorithms_update_differently`;
    with one epoch and one minibatch nothing is clipped: `test_ppo_one_minibatch_is_reinforce`.)
    """
    _, metrics = named_run("ppo")
    assert metrics["update/skipped"] == 0
    assert metrics["loss/clipfrac"] > 0.05
    assert metrics["loss/approx_kl"] > 0.01


def test_ppo_one_minibatch_is_reinforce():
    """epochs = minibatches = 1: the policy gradient is `-mean_t(A_t grad logp_t)` with numpy GAE
    advantages from the rewards and the critic's (zero-initialised) values; no clipping."""
    algorithm = make_fixed("ppo", minibatches=1)
    state = init_state(algorithm, jax.tree.map(jnp.copy, MODEL), key=jax.random.key(9))
    values = np.asarray(state.critic.values(IDS, FULL_MASK, PROMPT_LEN), np.float64)
    assert np.all(values == 0)
    state, metrics = step(algorithm, state, PROMPTS, STEP_KEY)
    grad = (flat(MODEL) - flat(state.policy)) / LR
    advantages = gae_ref(token_rewards_ref(REWARDS), values, MASK)
    assert_grad_close(grad, expected_grad(advantages))
    assert metrics["loss/clipfrac"] == 0 and metrics["loss/approx_kl"] == 0
    np.testing.assert_allclose(metrics["advantage/mean"], 0.0, atol=1e-6)
    # REINFORCE++ (the same advantages here, and no KL on the first step) takes the same step.
    np.testing.assert_allclose(grad, named_run("reinforce_pp")[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Gradient accumulation is exact.


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_are_exact(agg):
    """GRPO (k3 KL in the loss, to a reference far from the policy) in 4 micro-batches takes the
    full-batch step: its gradient is the full-batch objective's and its loss metrics are the
    full-batch values, for every aggregation mode; with token-mean it is also compared with the
    1-micro-batch step directly. (Each mode × micro-batch count is its own compilation: the
    1-micro-batch step of the other modes is replaced by the independent full-batch reference.)
    """
    state, metrics, grad = run(make_fixed("grpo", agg=agg, micro_batches=4), reference=REFERENCE)
    advantages = grpo_advantages_ref()
    ref_logp = logprobs_of(REFERENCE)
    k3 = k3_ref(logprobs_of(MODEL), ref_logp)
    assert_grad_close(grad, expected_grad(advantages, ref_logp=ref_logp, beta=0.001, agg=agg))
    # At ratio 1 the policy loss is -A on every valid token.
    np.testing.assert_allclose(metrics["loss/policy"], agg_ref(-advantages, MASK, agg), atol=1e-6)
    total = agg_ref(-advantages + 0.001 * k3, MASK, agg)
    np.testing.assert_allclose(metrics["loss/total"], total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss/kl_ref"], k3[MASK].mean(), rtol=1e-5)
    if agg == "token-mean":
        one, metrics_one, _ = run(make_fixed("grpo"), reference=REFERENCE)
        np.testing.assert_allclose(flat(state.policy), flat(one.policy), rtol=0, atol=1e-6)
        for name, value in metrics_one.items():
            if name.startswith("loss/"):
                np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# 6. Dynamic sampling.


def _select_ref(rewards, group_size, prompts):
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    informative = [g for g, r in enumerate(groups) if max(r) != min(r)]
    uniform = [g for g, r in enumerate(groups) if max(r) == min(r)]
    kept = (informative + uniform)[:prompts]
    rows = [g * group_size + j for g in kept for j in range(group_size)]
    trained = [g in informative for g in kept for _ in range(group_size)]
    counts = {
        "informative_groups": len(informative),
        "uninformative_groups": len(uniform),
        "dropped_groups": len(groups) - min(len(informative), prompts),
        "refill_groups": max(prompts - len(informative), 0),
    }
    return rows, trained, counts


def _accuracy(correct, total=None):
    correct = jnp.asarray(correct, jnp.float32)
    total = correct if total is None else jnp.asarray(total, jnp.float32)
    return RewardOutput(total=total, parts={"correct": correct})


@pytest.mark.parametrize(
    ("rewards", "prompts"),
    [
        # groups of 3: uniform, informative, uniform, informative, informative, uniform
        ([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.5, 0, 1e-3, 0, 3, 3, 3], 3),
        ([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.5, 0, 1e-3, 0, 3, 3, 3], 2),
        # too few informative groups: refilled with uniform groups, in order
        ([1, 1, 1, 0, 0, 0, 0.5, 0.5, 0.5, 2, 2, 2, 0, 1, 0, 3, 3, 3], 3),
        ([0] * 18, 2),
    ],
)
def test_dynamic_sampling_select(rewards, prompts):
    sampling = DynamicSampling(sampling=Sampling(group_size=3), oversample=2)
    rows, trained, metrics = sampling.select(_accuracy(rewards), prompts)
    ref_rows, ref_trained, counts = _select_ref(list(np.float32(rewards)), 3, prompts)
    assert rows.shape == (prompts * 3,)
    assert list(np.asarray(rows)) == ref_rows
    assert list(np.asarray(trained)) == ref_trained
    assert {k: int(metrics[f"dynamic_sampling/{k}"]) for k in counts} == counts


def test_dynamic_sampling_rows_are_informative_groups_in_order():
    sampling = DynamicSampling(sampling=Sampling(group_size=3), oversample=2)
    rewards = [1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.5, 0, 1e-3, 0, 3, 3, 3]
    rows, trained, metrics = sampling.select(_accuracy(rewards), 3)
    assert list(np.asarray(rows)) == [3, 4, 5, 9, 10, 11, 12, 13, 14]
    assert bool(np.all(trained)) and int(metrics["dynamic_sampling/refill_groups"]) == 0
    assert int(metrics["dynamic_sampling/dropped_groups"]) == 3


def test_dynamic_sampling_judges_groups_by_accuracy():
    """An all-correct group with one answer a token into the overlong buffer is uninformative:
    its total rewards differ by 1/128, its accuracy does not (DAPO; verl's `metric = acc`)."""
    sampling = DynamicSampling(sampling=Sampling(group_size=4), oversample=2)
    correct = [1, 1, 1, 1, 1, 0, 1, 0]
    total = [1, 1, 1, 1 - 1 / 128, 1, 0, 1, 0]
    rows, trained, metrics = sampling.select(_accuracy(correct, total), 1)
    assert list(np.asarray(rows)) == [4, 5, 6, 7] and bool(np.all(trained))
    assert int(metrics["dynamic_sampling/uninformative_groups"]) == 1
    by_total = DynamicSampling(sampling=Sampling(group_size=4), metric="total_reward")
    rewards = RewardOutput(total=jnp.asarray(total), parts={"total_reward": jnp.asarray(total)})
    assert list(np.asarray(by_total.select(rewards, 1)[0])) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="'format' is not a part of the reward; its parts: c"):
        DynamicSampling(sampling=Sampling(group_size=4), metric="format").select(
            _accuracy(correct), 1
        )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_refill_groups_contribute_nothing(agg):
    """By accuracy only groups 0 and 3 of the fixed batch are informative: DAPO training on 4
    prompts refills the batch with groups 1 and 2 (whose varied total rewards give them GRPO
    advantages). With a KL and an entropy term switched on, the step's gradient is the one of a
    step on groups 0 and 3 alone (no loss term of the refill groups, no tokens or rows of
    theirs in the denominators)."""
    overrides = dict(dynamic_sampling_metric="correct", kl_coef=0.01, entropy_coef=0.01, agg=agg)
    _, metrics, grad = run(
        make_fixed("dapo", **overrides), reference=REFERENCE, prompts=DAPO_PROMPTS
    )
    assert metrics["dynamic_sampling/informative_groups"] == 2
    assert metrics["dynamic_sampling/refill_groups"] == 2
    assert metrics["dynamic_sampling/dropped_groups"] == 3 * P - 2
    groups = [0, 3, 4, 5, 6, 7]  # the two informative groups, then 4 uniform ones
    rows = np.concatenate([np.arange(g * G, (g + 1) * G) for g in groups])
    completions = jax.tree.map(lambda x: x[rows], DAPO_COMPLETIONS)
    prompts = Prompts(
        ids=DAPO_PROMPTS.ids[np.array(groups)],
        mask=DAPO_PROMPTS.mask[np.array(groups)],
        index=jnp.arange(len(groups)),
    )
    algorithm = make(
        "dapo", reward=REWARD, eos_token_ids=(EOS,), group_size=G, max_new_tokens=T, **overrides
    )
    _, alone_metrics, alone = run(
        prepared(algorithm, completions), reference=REFERENCE, prompts=prompts
    )
    assert alone_metrics["dynamic_sampling/refill_groups"] == 0
    assert_grad_close(grad, alone)
    for name in ("loss/policy", "loss/total", "loss/kl_ref", "loss/entropy"):
        np.testing.assert_allclose(metrics[name], alone_metrics[name], rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# 7. KL to the reference.


def test_reference_only_when_beta_positive():
    without = init_state(make("grpo", reward=REWARD, kl_coef=0.0), MODEL, key=jax.random.key(0))
    assert without.reference is None
    for name in ("grpo", "reinforce_pp"):
        state = init_state(
            make(name, reward=REWARD), jax.tree.map(jnp.copy, MODEL), key=jax.random.key(0)
        )
        assert state.reference is not None
        assert eqx.tree_equal(state.reference, state.policy)
        assert state.reference.embed is not state.policy.embed  # its own buffers (donation)


def test_no_kl_metric_without_reference():
    for name in ("reinforce", "rloo", "dapo"):  # beta = 0
        assert "loss/kl_ref" not in named_run(name)[1]
    for name in ("grpo", "reinforce_pp"):  # beta > 0 (the reference is the policy: KL ~ 0)
        assert abs(named_run(name)[1]["loss/kl_ref"]) < 1e-6


def test_kl_in_the_reward():
    """REINFORCE++ (beta = 0.001, k1 in the reward): the token rewards are `r_t - beta * k1_t`,
    which changes the advantages (and so the step) from beta = 0's; the KL is not in the loss."""
    _, metrics, grad = run(make_fixed("reinforce_pp"), reference=REFERENCE)
    k1 = logprobs_of(MODEL) - logprobs_of(REFERENCE)
    np.testing.assert_allclose(metrics["loss/kl_ref"], k1[MASK].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/total"], metrics["loss/policy"], rtol=1e-6)
    plain = token_rewards_ref(REWARDS)
    advantages = reinforce_pp_advantages_ref(plain - 0.001 * k1 * MASK)
    without_kl = reinforce_pp_advantages_ref(plain)
    assert np.max(np.abs(advantages - without_kl)) > 1e-3
    expected = expected_grad(advantages)
    assert_grad_close(grad, expected)
    assert relative_gap(expected, expected_grad(without_kl)) > 1e-3
    # With beta = 0 (here: the reference equal to the policy) the step is the plain one.
    assert_grad_close(named_run("reinforce_pp")[0], expected_grad(without_kl))


# ---------------------------------------------------------------------------------------------
# 8. Non-finite values.


def test_nan_reward_is_scored_zero():
    completions = _as_completions(TOKENS, MASK)
    out = REWARD(PROMPTS.repeat(G), completions)
    assert np.all(np.isfinite(np.asarray(out.total)))
    np.testing.assert_allclose(np.asarray(out.total), REWARDS, rtol=1e-6)
    assert float(out.parts["score"][5]) == 0.0 and float(out.total[5]) == 0.0


def test_nonfinite_gradient_skips_the_update():
    poisoned = eqx.tree_at(lambda m: m.final_norm, MODEL, MODEL.final_norm.at[0].set(jnp.nan))
    state, metrics, _ = run(make_fixed("reinforce"), model=poisoned)
    assert metrics["update/skipped"] == 1
    np.testing.assert_array_equal(flat(state.policy), flat(poisoned))  # NaN == NaN here
    assert int(state.step) == 1


def test_logged_learning_rate_follows_the_optimizer_past_skipped_updates():
    """With a 4-update warm-up from 0, two skipped updates leave AdamW's count at 0: the second
    step's first update still uses (and logs) rate 0, not the 0.25 its step number suggests."""
    poisoned = eqx.tree_at(lambda m: m.final_norm, MODEL, MODEL.final_norm.at[0].set(jnp.nan))
    algorithm = make(
        "reinforce",
        reward=REWARD,
        eos_token_ids=(EOS,),
        group_size=G,
        max_new_tokens=T,
        learning_rate=1.0,
        warmup_steps=4,
    )
    algorithm = eqx.tree_at(
        lambda a: a.rollout, algorithm, FixedRollout(COMPLETIONS, algorithm.rollout)
    )
    state = init_state(algorithm, jax.tree.map(jnp.copy, poisoned), key=jax.random.key(9))
    rates = []
    for _ in range(2):
        state, metrics = step(algorithm, state, PROMPTS, STEP_KEY)
        assert metrics["update/skipped"] == 1
        rates.append(float(metrics["learning_rate"]))
    assert rates == [0.0, 0.0]


@pytest.mark.parametrize(("norm_constant", "expected"), [("batch_time", 3 * T), ("time", T)])
def test_seq_mean_token_sum_norm_constant(norm_constant, expected):
    """Dr.GRPO's constant is `B·T` with `B` the trained sequences (TRL's `dr_grpo`); verl's is
    `T` alone."""
    trained = jnp.asarray([True, True, False, True])
    batch = UpdateBatch(
        ids=jnp.zeros((4, T + 1), jnp.int32),
        full_mask=jnp.ones((4, T + 1), bool),
        mask=jnp.ones((4, T), bool) & trained[:, None],
        trained=trained,
        advantages=jnp.zeros((4, T)),
        old_logp=None,
        sampling_logp=None,
        sampler_logp=None,
        ref_logp=None,
        old_values=None,
        returns=None,
    )
    loss = PolicyLoss(agg="seq-mean-token-sum-norm", norm_constant=norm_constant)
    assert float(loss.denominator(batch)) == expected
    assert float(PolicyLoss(norm_constant=norm_constant).denominator(batch)) == 3 * T


def test_zero_std_groups_and_clipfrac_high_are_logged():
    """`reward/zero_std_groups`: the fraction of sampled groups with no reward spread (DAPO
    samples 2P uniform groups beside the fixed batch's P informative ones)."""
    assert named_run("reinforce")[1]["reward/zero_std_groups"] == 0
    np.testing.assert_allclose(named_run("dapo")[1]["reward/zero_std_groups"], 2 / 3)
    ppo = named_run("ppo")[1]  # its clipped tokens have A < 0 (values: tests/test_losses.py)
    assert 0 <= ppo["loss/clipfrac_high"] < ppo["loss/clipfrac"]


# ---------------------------------------------------------------------------------------------
# 9. Sampler-trainer mismatch (rollout correction).


def _correction_weights(mode, ratio, mask, threshold=2.0):
    """The weights `docs/algorithms.md` defines for each rollout correction (numpy)."""
    if mode == "none":
        return np.ones_like(ratio)
    if mode == "token_tis":
        return np.minimum(ratio, threshold)
    if mode == "token_mask":
        return np.where(ratio > threshold, 0.0, ratio)
    seq = np.exp((np.log(ratio) * mask).sum(1, keepdims=True)) * np.ones_like(ratio)
    return np.where(seq > threshold, 0.0, seq)


@pytest.mark.parametrize("mode", ["none", "token_tis", "token_mask", "sequence_mask"])
def test_rollout_correction_weights(mode):
    """At ratio 1 the policy loss's gradient per token is `-A_t · w_t / Σm`, with `w` the
    correction of `ρ_t = π_old(y_t) / π_sampler(y_t)`; its metrics are the ratio's mean and
    max and the fraction truncated or masked."""
    rng = np.random.RandomState(13)
    mask = rng.rand(B, T) < 0.8
    ratio = np.exp(rng.normal(0.0, 0.6, (B, T)))
    logp = rng.normal(-2.0, 0.5, (B, T))
    advantages = rng.normal(size=(B, T)) * mask
    batch = UpdateBatch(
        ids=jnp.zeros((B, T + 1), jnp.int32),
        full_mask=jnp.ones((B, T + 1), bool),
        mask=jnp.asarray(mask),
        trained=jnp.ones(B, bool),
        advantages=jnp.asarray(advantages, jnp.float32),
        old_logp=jnp.asarray(logp, jnp.float32),
        sampling_logp=None,
        sampler_logp=jnp.asarray(logp - np.log(ratio), jnp.float32),
        ref_logp=None,
        old_values=None,
        returns=None,
    )
    loss = PolicyLoss(rollout_correction=mode)
    denominator = loss.denominator(batch)

    def objective(logp):
        return loss(logp, jnp.zeros((B, T)), None, batch, denominator)

    grad, metrics = jax.grad(objective, has_aux=True)(jnp.asarray(logp, jnp.float32))
    weights = _correction_weights(mode, ratio, mask)
    expected = -advantages * weights * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-4, atol=1e-7)
    reduced = {k: float(v.reduce()) for k, v in metrics.items() if k.startswith("rollout/")}
    np.testing.assert_allclose(reduced["rollout/is_mean"], ratio[mask].mean(), rtol=1e-4)
    np.testing.assert_allclose(reduced["rollout/is_max"], ratio[mask].max(), rtol=1e-4)
    if mode == "token_tis":
        np.testing.assert_allclose(reduced["rollout/is_truncated"], (ratio > 2)[mask].mean())
    elif mode != "none":
        masked = (weights == 0)[mask].mean()
        assert 0 < masked < 1
        np.testing.assert_allclose(reduced["rollout/is_masked"], masked, rtol=1e-6)
    else:
        assert not {"rollout/is_truncated", "rollout/is_masked"} & set(reduced)


def test_rollout_correction_in_step():
    """`token_tis` in a GRPO step: the sampler's log-probs (`Completions.logprobs`, at
    temperature 1) against the recomputed ones weigh each token by `min(ρ, 2)`; the step logs
    the trainer-sampler log-prob gap."""
    ratio = np.exp(np.random.RandomState(14).normal(0.0, 0.7, (B, T)))
    completions = dataclasses.replace(
        COMPLETIONS, logprobs=jnp.asarray(logprobs_of(MODEL) - np.log(ratio), jnp.float32)
    )
    algorithm = make("grpo", reward=REWARD, eos_token_ids=(EOS,), group_size=G, max_new_tokens=T)
    algorithm = eqx.tree_at(lambda a: a.loss.rollout_correction, algorithm, "token_tis")
    _, metrics, grad = run(prepared(algorithm, completions))
    advantages = grpo_advantages_ref()
    expected = expected_grad(advantages * np.minimum(ratio, 2.0))
    assert_grad_close(grad, expected)
    assert relative_gap(expected, expected_grad(advantages)) > 0.05
    np.testing.assert_allclose(metrics["rollout/is_truncated"], (ratio > 2)[MASK].mean())
    gap = np.abs(np.log(ratio))[MASK].mean()
    np.testing.assert_allclose(metrics["rollout/logprob_abs_diff"], gap, rtol=1e-4)


def test_logprob_gap_at_another_temperature_compares_tempered_log_probs():
    """At temperature 0.7 the trainer's tempered log-probs are compared with the sampler's
    tempered ones (`sampling_logprobs`, no filter)."""
    tempered = completion_logprobs(MODEL, IDS, FULL_MASK, PROMPT_LEN, temperature=0.7)[0]
    shift = np.random.RandomState(15).uniform(-0.3, 0.3, (B, T))
    completions = dataclasses.replace(
        COMPLETIONS, sampling_logprobs=jnp.asarray(np.asarray(tempered) + shift, jnp.float32)
    )
    algorithm = make(
        "reinforce",
        reward=REWARD,
        eos_token_ids=(EOS,),
        group_size=G,
        max_new_tokens=T,
        temperature=0.7,
    )
    _, metrics, _ = run(prepared(algorithm, completions))
    np.testing.assert_allclose(
        metrics["rollout/logprob_abs_diff"], np.abs(shift)[MASK].mean(), rtol=1e-4
    )
