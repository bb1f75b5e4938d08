"""Environments for multi-turn rollouts: what answers the model's turns (`[environment]`).

- `episodes`: the environment interface (`reset(**row)`, `step(completion)`), one environment
  per trajectory on the host, answers as observation tokens framed as the chat template writes
  them (`TurnFormat`), timeouts.
- `tools`: `ToolEnvironment`, plain Python functions called in the Hermes tool-call format.
- `sampler`: the turn loop inside the compiled step.
"""

from .episodes import Episodes, TurnFormat
from .tools import ToolEnvironment, parse_tool_calls

__all__ = ["Episodes", "ToolEnvironment", "TurnFormat", "parse_tool_calls"]
