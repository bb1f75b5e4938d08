"""Multi-turn rollouts (`[environment]`): trajectories against a host loop of HF `generate`
calls turn by turn, log-probs against one full forward pass, the loss mask, the environment
interface's failures, Hermes tool calls, and one tiny training run."""

import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from child_run import tiny_config
from hf_parity import completion_logprobs

from gradflow.assets import resolve_path
from gradflow.environments import Episodes, ToolEnvironment, TurnFormat, parse_tool_calls
from gradflow.environments.sampler import generate_turns
from gradflow.models import load_hf
from gradflow.tasks.rows import Rows
from gradflow.tasks.task import tokenize_prompts

TOY = resolve_path("gradflow:toy-arith")
TURNS, TURN_TOKENS, OBS_TOKENS = 3, 12, 6
QUESTIONS = ["12+30=?\n", "7-5=?\n", "41+17-25=?\n", "3*4=?\n"]


class Echo:
    """Answers each turn with a piece of it (lengths vary; a long one is cut); stops after
    `stop` turns; row 3 starts with a message."""

    def reset(self, question, stop, **row):
        self.stop, self.turn = stop, 0
        return "go\n" if stop == 3 else None

    def step(self, completion):
        self.turn += 1
        answer = "no " + completion.replace("\n", " ")[: self.turn * 2] + "\n"
        return answer, 0.5 * self.turn, self.turn >= self.stop


def _rows() -> Rows:
    return Rows({"question": QUESTIONS, "stop": [1, 2, 3, 3]}, "test")


@pytest.fixture(scope="module")
def toy():
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOY)
    hf = transformers.AutoModelForCausalLM.from_pretrained(TOY, dtype=torch.float32).eval()
    return tokenizer, hf, load_hf(TOY)


def _sample(policy, tokenizer, episodes, temperature=0.0):
    bank = tokenize_prompts(tokenizer, QUESTIONS, max_tokens=0, split="test")
    run = eqx.filter_jit(generate_turns)
    out = run(
        policy,
        jnp.asarray(bank.ids),
        jnp.asarray(bank.mask),
        jnp.arange(len(QUESTIONS)),
        jax.random.key(0),
        episodes=episodes,
        max_turns=TURNS,
        max_turn_tokens=TURN_TOKENS,
        max_observation_tokens=OBS_TOKENS,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )
    return bank, out


def _reference(hf, tokenizer, question, stop):
    """The trajectory of one row by a host loop: HF greedy `generate` per turn, the answers
    appended as tokens. Returns its tokens, which are the model's, and the turn rewards."""
    eos = tokenizer.eos_token_id
    env = Echo()
    ids = tokenizer.encode(question, add_special_tokens=False)
    tokens, model = [], []
    first = env.reset(question=question, stop=stop)
    if first is not None:
        obs = tokenizer.encode(first, add_special_tokens=False)[:OBS_TOKENS]
        tokens += obs
        model += [False] * len(obs)
    reward = 0.0
    for turn in range(TURNS):
        context = torch.as_tensor([ids + tokens])
        with torch.no_grad():
            out = hf.generate(
                context,
                attention_mask=torch.ones_like(context),
                max_new_tokens=TURN_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, context.shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        tokens += new
        model += [True] * len(new)
        answer, r, done = env.step(tokenizer.decode(new, skip_special_tokens=True))
        reward += r
        if done or turn == TURNS - 1:
            break
        obs = tokenizer.encode(answer, add_special_tokens=False)[:OBS_TOKENS]
        tokens += obs
        model += [False] * len(obs)
    return tokens, model, reward


def test_greedy_trajectories_match_a_host_loop_of_hf_generate(toy):
    tokenizer, hf, policy = toy
    episodes = Episodes(
        Echo, _rows(), tokenizer, template="plain", max_observation_tokens=OBS_TOKENS, timeout_s=5.0
    )
    bank, out = _sample(policy, tokenizer, episodes)
    context = np.asarray(out.context_mask)
    for b, (question, stop) in enumerate(zip(QUESTIONS, [1, 2, 3, 3], strict=True)):
        tokens, model, reward = _reference(hf, tokenizer, question, stop)
        n = len(tokens)
        assert np.asarray(out.tokens)[b, :n].tolist() == tokens, b
        assert context[b, :n].all() and not context[b, n:].any()  # contiguous, then padding
        # The loss mask is exactly the model's tokens: 0 on every answer token.
        assert np.asarray(out.mask)[b, :n].tolist() == model
        assert np.asarray(out.turns.observed)[b, :n].tolist() == [not m for m in model]
        assert int(out.lengths[b]) == sum(model)
        assert float(out.turns.reward[b]) == pytest.approx(reward)
        assert int(out.turns.turns[b]) == min(stop, TURNS)
    assert int(out.turns.truncated.sum()) > 0  # some answer was cut to OBS_TOKENS
    assert out.finished.any()

    # Log-probs of the model's tokens equal one full forward pass over each whole trajectory
    # (the cache carried across turns is right); the answers' positions carry none.
    reference = completion_logprobs(hf, bank.ids, bank.mask, np.asarray(out.tokens), context)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], reference[mask], atol=2e-4)
    assert not np.asarray(out.logprobs)[~mask].any()


class Flaky:
    """Raises in reset on one row, in step on another, hangs on a third."""

    def reset(self, question, stop, **row):
        self.question = question
        if question == QUESTIONS[0]:
            raise RuntimeError("reset failed")

    def step(self, completion):
        if self.question == QUESTIONS[1]:
            raise ValueError("step failed")
        if self.question == QUESTIONS[2]:
            time.sleep(3)  # past timeout_s: cut, so the row fails
        return "again\n", 1.0, False


def test_a_raising_or_hanging_environment_ends_only_its_trajectory(toy):
    tokenizer, _, policy = toy
    episodes = Episodes(
        Flaky,
        _rows(),
        tokenizer,
        template="plain",
        max_observation_tokens=OBS_TOKENS,
        timeout_s=1.0,
    )
    _, out = _sample(policy, tokenizer, episodes, temperature=1.0)
    assert np.asarray(out.turns.failed).tolist() == [True, True, True, False]
    assert np.asarray(out.turns.turns).tolist() == [0, 1, 1, TURNS]
    assert float(out.turns.reward[3]) == TURNS
    assert not np.asarray(out.mask)[0].any()


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first one.
        b: the second one.
    """
    return a + b


def test_hermes_tool_calls_reach_the_function():
    calls = []

    def record(city: str, days: int = 1) -> dict:
        """Weather forecast.

        Args:
            city: where.
            days: how many days.
        """
        calls.append((city, days))
        return {"city": city, "days": days}

    env = ToolEnvironment(tools=[add, record])
    assert env.schemas[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    text = (
        'Let me check.\n<tool_call>\n{"name": "record", "arguments": {"city": "Paris", "days": 3}}'
        '\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
    )
    answer, reward, done = env.step(text)
    assert calls == [("Paris", 3)]
    assert answer.splitlines() == [json.dumps({"city": "Paris", "days": 3}), "42"]
    assert (reward, done) == (0.0, False)
    assert env.step("The answer is 42.") == (None, 0.0, True)
    # Malformed calls are answered with the error, not raised.
    assert "not valid JSON" in env.step("<tool_call>{'name': add}</tool_call>")[0]
    assert "no tool 'mul'" in env.step('<tool_call>{"name": "mul", "arguments": {}}</tool_call>')[0]
    wrong = env.step('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')[0]
    assert wrong.startswith("error: wrong arguments for add")
    assert parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    ) == [{"name": "add", "arguments": {"a": 1}}]


# Qwen2.5's handling of tool turns, cut down.
TOOL_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", ["qwen2.5", "qwen2"])
def test_tool_answers_go_through_the_chat_template(template):
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_path("gradflow:qwen2"))
    if template == "qwen2.5":
        tokenizer.chat_template = TOOL_TEMPLATE  # Qwen2's own drops tool turns
    form = TurnFormat(tokenizer, "chat")
    assert form.closing == "<|im_end|>\n"
    assert form.end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Qwen2's template opens the assistant's turn after every user turn: no generation prompt.
    assert form.opening == ("<|im_start|>assistant\n" if template == "qwen2.5" else "")
    head, tail = form.framing("tool", closed=True)
    assert head == "\n<|im_start|>user\n<tool_response>\n"
    assert tail == "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert form.framing("user", closed=False) == (
        "<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    )
    first = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert form.first("hi") == first


ENVIRONMENT = """
class Retry:
    def reset(self, question, answer, **row):
        self.answer = answer
        if question.startswith("1"):
            raise RuntimeError("no")

    def step(self, completion):
        return "wrong\\n", 0.25, False
"""


def test_a_multi_turn_run_trains_and_reports_turns(tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from run import main

    (tmp_path / "env.py").write_text(ENVIRONMENT)
    config = tiny_config(
        tmp_path,
        tmp_path / "run",
        algorithm={"name": "grpo", "group_size": 2, "learning_rate": 0.01},
        environment={
            "class": str(tmp_path / "env.py") + ":Retry",
            "max_turns": 2,
            "max_turn_tokens": 4,
            "max_observation_tokens": 3,
        },
        train={"steps": 1, "prompts_per_step": 4},
        checkpoint={"every": 0, "keep": 1},
    )
    # max_turn_tokens caps each turn: algorithm.max_new_tokens does not apply.
    config.write_text(config.read_text().replace("max_new_tokens = 6\n", ""))
    main([str(config)])
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    metrics = {k: v for line in lines for k, v in line.items()}
    assert metrics["rollout/turns_max"] == 2
    assert 0 < metrics["rollout/turns_mean"] <= 2
    assert metrics["rollout/observation_tokens_mean"] > 0
    assert metrics["rollout/observations_truncated"] > 0  # "wrong\n" is cut to 3 tokens
    failed = metrics["rollout/env_errors"]
    assert metrics["reward/failed"] == pytest.approx(failed / 8)
    assert metrics["reward/environment"] > 0
    assert "eval/environment" in metrics and "eval/turns_mean" in metrics


def _config(**environment):
    from gradflow.config import build_config

    raw = {"model": {"path": "gradflow:toy-arith"}, "algorithm": {"name": "grpo"}}
    return build_config({**raw, "environment": environment})


def test_environment_config_is_checked(toy):
    from gradflow import algorithms
    from gradflow.config import ConfigError, build_config
    from gradflow.stages import HostReward

    config = _config(**{"class": "envs/calculator.py:Calculator", "max_turns": 2})
    assert config.environment.class_ == "envs/calculator.py:Calculator"
    assert build_config(__import__("tomllib").loads(config.to_toml())) == config
    assert (
        "environment"
        not in build_config({"model": {"path": "x"}, "algorithm": {"name": "grpo"}}).to_dict()
    )
    with pytest.raises(ConfigError, match="did you mean 'class'"):
        _config(klass="a.py:B")
    with pytest.raises(ConfigError, match=r"\[environment\] needs class"):
        _config(max_turns=2)
    with pytest.raises(ConfigError, match="max_turn_tokens = 8 to cap each model turn"):
        build_config(
            {
                "model": {"path": "x"},
                "algorithm": {"name": "grpo", "max_new_tokens": 8},
                "environment": {"class": "a.py:B"},
            }
        )
    tokenizer = toy[0]
    episodes = Episodes(
        Echo, _rows(), tokenizer, template="plain", max_observation_tokens=4, timeout_s=1.0
    )
    reward = HostReward(scorer=lambda *a: None, parts=("x",), weights=(1.0,))
    limits = dict(max_turns=2, max_turn_tokens=4, max_observation_tokens=4)
    for name, refused in (
        ("dapo", "DynamicSampling"),
        ("ppo", "GAE"),
        ("reinforce_pp", "ReinforcePP"),
    ):
        with pytest.raises(ValueError, match=refused):
            algorithms.multi_turn(algorithms.make(name, reward=reward), episodes, **limits)
    turns = algorithms.multi_turn(algorithms.make("rloo", reward=reward), episodes, **limits)
    assert turns.rollout.max_new_tokens == 2 * (4 + 4)
