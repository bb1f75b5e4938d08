"""A split's rows: every dataset column as a list, and the problems of the built-in tasks."""

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Problem:
    """One instance of a built-in task (arithmetic, GSM8K).

    **Arguments:**

    - `question`: the prompt text shown to the model.
    - `answer`: the reference: for GSM8K the full solution ending in `#### N`, for the arithmetic
        task the worked chain ending in `#### N`.
    """

    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Rows:
    """The rows of one split, column by column, as `datasets` reads them (a struct column holds
    dicts, a list column lists).

    **Arguments:**

    - `columns`: column name → one value per row (all the same length).
    - `source`: where the rows came from (a file, `hub:ORG/NAME`, a built-in task), for messages.
    """

    columns: dict[str, list]
    source: str

    def __post_init__(self):
        lengths = {len(values) for values in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"{self.source}: columns of different lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @classmethod
    def from_problems(cls, problems: Sequence[Problem], source: str) -> "Rows":
        """The rows of built-in problems: columns `question` and `answer`.

        **Arguments:**

        - `problems`: the problems.
        - `source`: the task's name.

        **Returns:**

        The rows.
        """
        return cls(
            columns={
                "question": [p.question for p in problems],
                "answer": [p.answer for p in problems],
            },
            source=source,
        )

    def head(self, count: int) -> "Rows":
        """The first `count` rows.

        **Arguments:**

        - `count`: how many.

        **Returns:**

        The rows.
        """
        return Rows({k: v[:count] for k, v in self.columns.items()}, self.source)

    def take(self, indices: Sequence[int]) -> dict[str, list]:
        """The columns of some rows.

        **Arguments:**

        - `indices`: row numbers.

        **Returns:**

        Column name → the values of those rows, in order.
        """
        return {k: [v[int(i)] for i in indices] for k, v in self.columns.items()}

    def row(self, index: int) -> dict:
        """One row as a dictionary.

        **Arguments:**

        - `index`: the row number.

        **Returns:**

        Column name → value.
        """
        return {k: v[index] for k, v in self.columns.items()}
