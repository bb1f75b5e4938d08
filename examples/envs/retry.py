"""A retry environment for the embedded arithmetic task: a wrong answer is told so, with the
question again, and the model may answer once more (up to `environment.max_turns` turns).

Each turn's reward is 1 for a right answer (which ends the trajectory), else 0.
"""

from gradflow.rewards.gsm8k import is_correct


class Retry:
    """Answers a wrong `#### N` with `wrong` and the question; a right one ends the trajectory."""

    def reset(self, question: str, answer: str, **row) -> None:
        self.question = question
        self.answer = answer

    def step(self, completion: str) -> tuple[str | None, float, bool]:
        if is_correct(completion, self.answer, mode="strict"):
            return None, 1.0, True
        return f"wrong\n{self.question}\n", 0.0, False
