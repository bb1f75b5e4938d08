"""An environment made of plain Python functions the model calls as tools, in the Hermes format
the Qwen2.5 / Qwen3 chat templates use:

```
<tool_call>
{"name": "add", "arguments": {"a": 1, "b": 2}}
</tool_call>
```

Each call is answered in a `tool` turn (the chat template wraps it in `<tool_response>`); a turn
with no call ends the trajectory. A malformed call (not JSON, no such tool, wrong arguments) or a
tool that raises is answered with the error's text, so the model may try again.
"""

import inspect
import json
import re
from collections.abc import Callable, Sequence

from transformers.utils import get_json_schema

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict | str]:
    """The Hermes tool calls in a completion.

    **Arguments:**

    - `text`: the model's turn.

    **Returns:**

    One entry per `<tool_call>…</tool_call>` block: `{"name": str, "arguments": dict}`, or an
    error message for a block that is not such a JSON object.
    """
    calls: list[dict | str] = []
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"error: the tool call is not valid JSON ({e.msg})")
            continue
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('error: a tool call must be {"name": ..., "arguments": {...}}')
        elif not isinstance(arguments, dict):
            calls.append(f"error: the arguments of {call['name']} must be a JSON object")
        else:
            calls.append({"name": call["name"], "arguments": arguments})
    return calls


class ToolEnvironment:
    """Tools as an environment: each model turn's tool calls are run and answered.

    Subclass it to add a per-trajectory `reset(**row)` (the base one answers nothing) or a
    reward; the turn reward here is 0.

    **Arguments:**

    - `tools`: plain Python functions with type hints and a Google-style docstring (their JSON
      schemas, `schemas`, come from `transformers.utils.get_json_schema`, as TRL's are).
    """

    role = "tool"

    def __init__(self, tools: Sequence[Callable]):
        self.tools = {tool.__name__: tool for tool in tools}
        self.schemas = [get_json_schema(tool) for tool in tools]

    def reset(self, **row) -> str | None:
        """Starts a trajectory (no first message)."""
        return None

    def call(self, call: dict | str) -> str:
        """Runs one parsed tool call.

        **Arguments:**

        - `call`: an entry of `parse_tool_calls`.

        **Returns:**

        The tool's result as text (JSON for anything but a string), or the error's text.
        """
        if isinstance(call, str):
            return call
        name, arguments = call["name"], call["arguments"]
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool {name!r}; the tools are {', '.join(sorted(self.tools))}"
        try:
            inspect.signature(tool).bind(**arguments)
        except TypeError as e:
            return f"error: wrong arguments for {name}: {e}"
        try:
            result = tool(**arguments)
        except Exception as e:
            return f"error: {name} raised {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)

    def step(self, completion: str) -> tuple[str | None, float, bool]:
        """Answers the turn's tool calls; a turn without one ends the trajectory.

        **Arguments:**

        - `completion`: the model's turn.

        **Returns:**

        `(answer, reward, done)`: the results, one per line, reward 0.
        """
        calls = parse_tool_calls(completion)
        if not calls:
            return None, 0.0, True
        return "\n".join(self.call(c) for c in calls), 0.0, False
