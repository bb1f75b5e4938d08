"""Multi-turn trajectories under real chat templates: the token ids a rollout builds for a whole
conversation equal `tokenizer.apply_chat_template` of that conversation.

The templates are the official ones (`tests/data/chat_templates/`, see its README): Qwen2.5-Instruct
and Qwen3 (thinking off) over the real Qwen2 BPE vocabulary shipped in `gradflow:qwen2` (with
their added tokens), SmolLM2-135M-Instruct's ChatML and Gemma 3-it over small byte-level
tokenizers that hold their real special tokens. Each trajectory goes through the production
path (`build_task`: prompts, environment, stop tokens; `Task.episodes`; `generate_turns`) with
the policy replaced by a script: the model's turn `k` is a fixed token sequence, emitted after
the `k`-th generation prompt of its context (how the turn ends is part of the script).

The conversation: the environment's first message (`reset`), a model turn calling a tool, the
tool's answer, a model turn with the final answer (the environment ends the trajectory). Its
model turns end with the template's end-of-turn token, with another EOS of the tokenizer, or
not at all (cut at `max_turn_tokens`).
"""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from gradflow.assets import resolve_path
from gradflow.config import ConfigError, build_config
from gradflow.environments import Episodes, sampler
from gradflow.models import Decoder, load_hf
from gradflow.tasks.rows import Rows
from gradflow.tasks.task import build_task
from gradflow.train import build_algorithm

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QUESTION = "What is 2 + 40?"
FIRST = "Use the add tool."
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>'
MORE = "\nI will wait for the result of this call before I answer the question."
ANSWER = "The answer is 42."
MAX_TURNS, MAX_OBSERVATION = 3, 96

# Qwen2.5's and Qwen3's added tokens after the three of Qwen2 (ids 151646 on, in order).
QWEN_SPECIAL = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN25_ADDED = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_ADDED = [*QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>"]
SMOLLM2_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]
GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def _qwen(template: str, added: list[str]):
    """The real Qwen2 vocabulary with a Qwen2.5 / Qwen3 chat template and added tokens."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_path("gradflow:qwen2"))
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in QWEN_SPECIAL], True)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    assert tokenizer.convert_tokens_to_ids("<tool_call>") == 151657  # the real ids
    tokenizer.chat_template = (TEMPLATES / template).read_text()
    return tokenizer


def _small(template: str, special: list[str], **tokens: str):
    """A byte-level tokenizer (every byte one token, no merges) with a model's special tokens
    (`tokens`: which are its bos/eos/pad/unk) and chat template."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*special, *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=special,
        chat_template=(TEMPLATES / template).read_text(),
        clean_up_tokenization_spaces=False,
        **tokens,
    )


TOKENIZERS = {
    "qwen2.5": lambda: _qwen("qwen2.5-instruct.jinja", QWEN25_ADDED),
    "qwen3": lambda: _qwen("qwen3.jinja", QWEN3_ADDED),
    "smollm2": lambda: _small(
        "smollm2-135m-instruct.jinja",
        SMOLLM2_SPECIAL,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    ),
    "gemma3": lambda: _small(
        "gemma-3-it.jinja",
        GEMMA3_SPECIAL,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ),
}
# How each template ends a model turn: `end` is the token the template closes it with.
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "smollm2": "<|im_end|>"}
END_OF_TURN["gemma3"] = "<end_of_turn>"
KWARGS = {"qwen3": {"enable_thinking": False}}

ENVIRONMENT = '''
from gradflow.environments import ToolEnvironment


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first one.
        b: the second one.
    """
    return a + b


class Calculator(ToolEnvironment):
    def __init__(self):
        super().__init__(tools=[add])

    def reset(self, first, **row):
        return first or None
'''
REWARDS = "def zero(completions, **kwargs):\n    return [0.0] * len(completions)\n"


class Script:
    """Stands in for the policy's decoding (`DecodingModel`) and prefill: its "cache" holds the
    context's token ids, and the next token of row `b` is `turns[b][k][j]`, where `k + 1` is the
    number of generation prompts (`opening`) in the context and `j` the tokens after the last.
    Greedy sampling then picks it (the logits are one-hot)."""

    def __init__(self, opening: list[int], turns: list[list[list[int]]], vocab: int):
        self.opening, self.turns, self.vocab = opening, turns, vocab

    def _next(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        out = np.zeros(tokens.shape[0], np.int32)
        n = len(self.opening)
        for b, (row, keep) in enumerate(zip(tokens, mask, strict=True)):
            context = row[keep].tolist()
            ends = [
                i + n for i in range(len(context) - n + 1) if context[i : i + n] == self.opening
            ]
            k = len(ends) - 1
            if 0 <= k < len(self.turns[b]):
                turn, j = self.turns[b][k], len(context) - ends[-1]
                out[b] = turn[min(j, len(turn) - 1)]
        return out

    def cache_slots(self, tokens: int) -> int:
        return tokens

    def prefill(self, ids, mask, slots: int):
        pad = slots - ids.shape[1]
        state = (jnp.pad(ids, ((0, 0), (0, pad))), jnp.pad(mask.astype(bool), ((0, 0), (0, pad))))
        return state, state

    def logits(self, state):
        shape = jax.ShapeDtypeStruct(state[0].shape[:1], jnp.int32)
        token = jax.pure_callback(self._next, shape, *state)
        return 20.0 * jax.nn.one_hot(token, self.vocab, dtype=jnp.float32)

    def decode(self, token, positions, slot, state):
        tokens, mask = state
        state = (tokens.at[:, slot].set(token), mask.at[:, slot].set(True))
        return state, state


@pytest.fixture(scope="module")
def policy():
    return load_hf(resolve_path("gradflow:toy-arith"))  # replaced by a `Script`: only its type


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _config(
    tmp_path: Path,
    name: str,
    tokenizer,
    rows: list[dict],
    max_turn_tokens: int,
    max_observation_tokens: int = MAX_OBSERVATION,
):
    """A chat-template dataset task with the `Calculator` environment."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "env.py").write_text(ENVIRONMENT)
    (tmp_path / "rewards.py").write_text(REWARDS)
    with open(tmp_path / "rows.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    raw = {
        "model": {
            "init": "random",
            "config": "gradflow:qwen2/qwen2-1.5b-instruct.config.json",
            "tokenizer": str(tmp_path / "tokenizer"),
        },
        "task": {
            "name": "dataset",
            "train": str(tmp_path / "rows.jsonl"),
            "test": str(tmp_path / "rows.jsonl"),
            "answer_key": "solution",
            "reward_workers": 0,
            "prompt_template": "chat",
            "chat_template_kwargs": KWARGS.get(name, {}),
        },
        "reward": [{"function": f"{tmp_path}/rewards.py:zero"}],
        "algorithm": {"name": "grpo"},
        "environment": {
            "class": f"{tmp_path}/env.py:Calculator",
            "max_turns": MAX_TURNS,
            "max_turn_tokens": max_turn_tokens,
            "max_observation_tokens": max_observation_tokens,
        },
    }
    return build_config(raw)


def _rollout(monkeypatch, policy, task, script: Script, max_turn_tokens: int):
    scripted = types.SimpleNamespace(from_decoder=lambda model, attention: script)
    monkeypatch.setattr(sampler, "DecodingModel", scripted)
    monkeypatch.setattr(Decoder, "prefill", lambda self, *args: script.prefill(*args))
    bank = task.train_prompts
    return sampler.generate_turns(
        policy,
        jnp.asarray(bank.ids),
        jnp.asarray(bank.mask),
        jnp.arange(bank.ids.shape[0]),
        jax.random.key(0),
        episodes=task.episodes(task.train, MAX_OBSERVATION),
        max_turns=MAX_TURNS,
        max_turn_tokens=max_turn_tokens,
        max_observation_tokens=MAX_OBSERVATION,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        eos_token_ids=task.eos_token_ids,
        pad_token_id=task.pad_token_id,
    )


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "smollm2", "gemma3"])
def test_a_rollout_is_the_chat_template_of_its_conversation(name, tmp_path, monkeypatch, policy):
    tokenizer = TOKENIZERS[name]()
    kwargs = KWARGS.get(name, {})
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
    others = [  # the tokenizer's other EOS tokens, which end a model turn too
        t
        for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        if isinstance(t, int) and t not in (end, tokenizer.unk_token_id)
    ]
    call, answer = _ids(tokenizer, CALL), [*_ids(tokenizer, ANSWER), end]
    max_turn_tokens = len(call) + 4  # the cut row's first turn stops inside MORE
    # Each row: its first message, and its first model turn (the second is `answer`).
    cases = {
        "ends with the end-of-turn token": (FIRST, [*call, end]),
        "cut at max_turn_tokens": ("", _ids(tokenizer, CALL + MORE)),
    }
    if others:
        cases["ends with another EOS"] = (FIRST, [*call, others[0]])
    assert name != "gemma3" or tokenizer.eos_token_id in others  # <eos> is not <end_of_turn>
    rows = [
        {"prompt": QUESTION, "first": first, "solution": "42", "case": case}
        for case, (first, _) in cases.items()
    ]
    task = build_task(_config(tmp_path, name, tokenizer, rows, max_turn_tokens))
    assert set(others) <= set(task.eos_token_ids)  # the rollout stops on them
    if name == "gemma3":
        assert end not in task.eos_token_ids  # only the template says how its turns end
    probe = [{"role": "user", "content": "q"}]
    closed = tokenizer.apply_chat_template(probe, tokenize=False, **kwargs)
    opened = tokenizer.apply_chat_template(
        probe, tokenize=False, add_generation_prompt=True, **kwargs
    )
    script = Script(
        _ids(tokenizer, opened[len(closed) :]),
        [[turn, answer] for _, turn in cases.values()],
        len(tokenizer),
    )
    out = _rollout(monkeypatch, policy, task, script, max_turn_tokens)

    tools = task.environment().schemas
    bank, tokens = task.train_prompts, np.asarray(out.tokens)
    context, model = np.asarray(out.context_mask), np.asarray(out.mask)
    for b, (case, (first, turn)) in enumerate(cases.items()):
        rollout = [*bank.ids[b][bank.mask[b]].tolist(), *tokens[b][context[b]].tolist()]
        turn = turn[:max_turn_tokens]
        # The model's turns as messages: what it wrote, but the end-of-turn token, which the
        # template writes (another EOS it wrote stays, as text: "...</tool_call><|endoftext|>").
        contents = [
            tokenizer.decode(t[:-1] if t[-1] == end else t, skip_special_tokens=False)
            for t in (turn, answer)
        ]
        tool = {"role": "tool", "content": "42"}
        if name == "gemma3":  # no tool turns: answered as Qwen2.5 writes them, in a user turn
            tool = {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
        messages = [
            {"role": "user", "content": QUESTION},
            *([{"role": "user", "content": first}] if first else []),
            {"role": "assistant", "content": contents[0]},
            tool,
            {"role": "assistant", "content": contents[1]},
        ]
        template = tokenizer.chat_template
        if name == "gemma3" and first:
            # Gemma 3's template refuses two user turns in a row; the rollout writes the first
            # message as the template writes any user turn: the reference is the template
            # without its check that roles alternate.
            start = template.index('{{ raise_exception("Conversation roles')
            template = template[:start] + template[template.index("}}", start) + 2 :]
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, chat_template=template, **kwargs
        )
        if name == "qwen3":
            # Qwen3's template writes the empty think block of the thinking-off generation prompt
            # only into the last assistant turn: it drops it from earlier ones when it renders a
            # later conversation. The model wrote turn 1 after that block (the generation
            # prompt put it there), and its tokens stay in the trajectory: compare with the
            # template's rendering of turn 1 as the model saw it.
            past = "<|im_start|>assistant\n" + contents[0]
            assert text.count(past) == 1
            text = text.replace(
                past, "<|im_start|>assistant\n<think>\n\n</think>\n\n" + contents[0]
            )
        expected = _ids(tokenizer, text)
        if name != "qwen3":  # the text's ids are apply_chat_template's
            rendered = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=True, chat_template=template, **kwargs
            )
            assert expected == rendered["input_ids"]
        # Equal up to the end of the last model turn; the template writes a newline after it.
        assert tokenizer.decode(rollout) == tokenizer.decode(expected[: len(rollout)]), case
        assert rollout == expected[: len(rollout)], case
        assert tokenizer.decode(expected[len(rollout) :]) == "\n", case
        # The loss mask covers the model's tokens (both turns) and nothing else.
        assert tokens[b][model[b]].tolist() == [*turn, *answer], case
        assert int(out.turns.turns[b]) == 2 and not bool(out.turns.failed[b]), case
        assert int(out.turns.truncated[b]) == 0, case


class Verbose:
    """Answers every turn with a long tool result."""

    role = "tool"

    def reset(self, **row):
        return None

    def step(self, completion):
        return "the sum is 42; " * 20, 0.0, False


def _episodes(tokenizer, max_observation_tokens: int) -> Episodes:
    return Episodes(
        Verbose,
        Rows({"question": ["q"]}, "test"),
        tokenizer,
        template="chat",
        max_observation_tokens=max_observation_tokens,
        timeout_s=5.0,
    )


def test_a_cut_answer_keeps_its_framing_and_a_too_small_limit_is_refused():
    tokenizer = TOKENIZERS["qwen2.5"]()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
    tail = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    needed = len(_ids(tokenizer, head)) + len(_ids(tokenizer, tail)) + 1  # and one of the answer
    with pytest.raises(ValueError, match=f"max_observation_tokens >= {needed}"):
        _episodes(tokenizer, needed - 1)
    episodes = _episodes(tokenizer, needed)
    ids, count, *_ = episodes.reset(np.zeros(1, np.int32))
    assert tokenizer.decode(ids[0][: count[0]]) == "<|im_start|>assistant\n"
    call = _ids(tokenizer, CALL)
    for turn, framing in (([*call, end], head[len("<|im_end|>") :]), (call, head)):
        ids, count, _, done, failed, truncated = episodes.step(
            np.ones(1, bool),
            np.asarray([turn], np.int32),
            np.asarray([len(turn)], np.int32),
        )
        # The answer is cut to the tokens left (one where the template's end-of-turn token is
        # needed); the turn is closed once, the next one opened.
        room = needed - len(_ids(tokenizer, framing)) - len(_ids(tokenizer, tail))
        body = tokenizer.decode(_ids(tokenizer, Verbose().step("")[0])[:room])
        assert body == ("the" if framing == head else "the sum")
        assert tokenizer.decode(ids[0][: count[0]]) == framing + body + tail
        assert count[0] == needed
        assert bool(truncated[0]) and not failed[0] and not done[0]


def test_a_too_small_max_observation_tokens_is_refused_at_start_up(tmp_path):
    tokenizer = TOKENIZERS["qwen2.5"]()
    rows = [{"prompt": QUESTION, "first": "", "solution": "42"}]
    config = _config(tmp_path, "qwen2.5", tokenizer, rows, 8, max_observation_tokens=12)
    # The framing of a tool answer after a turn cut without its <|im_end|>: 19 tokens.
    with pytest.raises(ConfigError, match=r"environment.max_observation_tokens >= 20$"):
        build_algorithm(config, build_task(config))
