"""Tree-of-Thoughts tasks: how a state is proposed, sampled, valued, voted on and finished.

A state is the text of the thoughts so far (one thought per line), as in the reference
implementation (princeton-nlp/tree-of-thought-llm). `steps` is a generic step-by-step task
whose final answer is a marked "Answer:" line; `game24` follows the paper's prompts.
A user adds a task by subclassing `Task` and decorating it with `register_task`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from steer.critics import Question
from steer.critics.extract import answer_line
from steer.critics.game24 import current_numbers, puzzle_numbers
from steer.engine import Message

# The paper's value map: sure / likely / impossible.
VALUE_MAP = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


class Task(ABC):
    name: ClassVar[str]
    extra_final_step: ClassVar[bool] = False  # one more level after `depth` to write the answer

    @abstractmethod
    def propose_prompt(self, question: Question, state: str) -> list[Message]: ...

    @abstractmethod
    def sample_prompt(self, question: Question, state: str) -> list[Message]: ...

    @abstractmethod
    def value_prompt(self, question: Question, state: str) -> list[Message]: ...

    def vote_prompt(self, question: Question, states: Sequence[str]) -> list[Message]:
        choices = "\n".join(f"Choice {i + 1}:\n{s.strip() or '(no steps yet)'}"
                            for i, s in enumerate(states))
        return [Message("user", (
            f"Question: {question.text}\n\nWhich partial solution is most promising? "
            f"Analyze each choice, then conclude with a last line \"The best choice is N\".\n\n"
            f"{choices}"))]

    def parse_proposals(self, text: str) -> list[str]:
        steps = [_LIST_MARK.sub("", line).strip() for line in text.split("\n")]
        return [s for s in steps if s]

    def parse_value(self, state: str, outputs: Sequence[str]) -> float:
        """Sum of the mapped verdicts on each output's last line (the paper's unwrap)."""
        total = 0.0
        for out in outputs:
            last = out.strip().split("\n")[-1].lower() if out.strip() else ""
            for word, value in VALUE_MAP.items():
                if word in last:
                    total += value
                    break
        return total

    def parse_vote(self, text: str, n_states: int) -> int | None:
        m = re.findall(r"best choice is\s*(\d+)", text, re.I)
        if m and 1 <= int(m[-1]) <= n_states:
            return int(m[-1]) - 1
        return None

    def is_final(self, state: str) -> bool:
        return answer_line(state) is not None

    def conclude_prompt(self, question: Question, state: str) -> Message | None:
        """When the search ends on no final state: a prompt that writes the answer from the
        best state (one more, streamed, generation), or None to return the state itself."""
        return Message("user", f"{question.text}\n\nUse these steps:\n{state.strip()}\n\n"
                               "Give the final answer, ending with a line \"Answer: <answer>\".")


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def _steps(state: str) -> str:
    return state.strip() or "(none yet)"


@register_task
class StepsTask(Task):
    """Generic reasoning: thoughts are steps toward an answer on an "Answer:" line."""

    name = "steps"

    def propose_prompt(self, question: Question, state: str) -> list[Message]:
        return [Message("user", (
            f"Question: {question.text}\n\nSteps so far:\n{_steps(state)}\n\n"
            "List a few different possible next steps, one per line. If the steps so far "
            "already solve it, write the final line as \"Answer: <answer>\"."))]

    def sample_prompt(self, question: Question, state: str) -> list[Message]:
        return [Message("user", (
            f"Question: {question.text}\n\nSteps so far:\n{_steps(state)}\n\n"
            "Write only the next step, in one line. If you know the answer, write "
            "\"Answer: <answer>\"."))]

    def value_prompt(self, question: Question, state: str) -> list[Message]:
        return [Message("user", (
            f"Question: {question.text}\n\nPartial solution:\n{_steps(state)}\n\n"
            "Can these steps lead to a correct answer? Think briefly, then end with one "
            "word on the last line: sure, likely or impossible."))]


# The paper's Game of 24 prompts (src/tot/prompts/game24.py), shortened examples.
_PROPOSE_24 = """Input: 2 8 8 14
Possible next steps:
2 + 8 = 10 (left: 8 10 14)
8 / 2 = 4 (left: 4 8 14)
14 + 2 = 16 (left: 8 8 16)
2 * 8 = 16 (left: 8 14 16)
8 - 2 = 6 (left: 6 8 14)
14 - 8 = 6 (left: 2 6 8)
14 / 2 = 7 (left: 7 8 8)
14 - 2 = 12 (left: 8 8 12)
Input: {numbers}
Possible next steps:
"""
_VALUE_24 = """Evaluate if given numbers can reach 24 (sure/likely/impossible)
10 14
10 + 14 = 24
sure
11 12
11 + 12 = 23
12 - 11 = 1
11 * 12 = 132
11 / 12 = 0.91
impossible
4 4 10
4 + 4 + 10 = 8 + 10 = 18
4 * 10 - 4 = 40 - 4 = 36
(10 - 4) * 4 = 6 * 4 = 24
sure
5 7 8
5 + 7 + 8 = 12 + 8 = 20
(8 - 5) * 7 = 3 * 7 = 21
I cannot obtain 24 now, but numbers are within a reasonable range
likely
1 3 3
1 * 3 * 3 = 9
(1 + 3) * 3 = 12
1 3 3 are all too small
impossible
{numbers}
"""
_FINAL_24 = """Use numbers and basic arithmetic operations (+ - * /) to obtain 24. Each step, \
you are only allowed to choose two of the remaining numbers to obtain a new number.
Input: 4 4 6 8
Steps:
4 + 8 = 12 (left: 4 6 12)
6 - 4 = 2 (left: 2 12)
2 * 12 = 24 (left: 24)
Answer: (6 - 4) * (4 + 8) = 24
Input: {puzzle}
Steps:
{steps}"""
_VALUE_LAST_24 = """Use numbers and basic arithmetic operations (+ - * /) to obtain 24. \
Given an input and an answer, give a judgement (sure/impossible) if the answer is correct, \
i.e. it uses each input exactly once and no other numbers, and reach 24.
Input: 4 4 6 8
Answer: (4 + 8) * (6 - 4) = 24
Judge: sure
Input: 4 9 10 13
Answer: (10 - 4) - (13 - 9) = 24
Judge: impossible
Input: {puzzle}
Answer: {answer}
Judge:"""


@register_task
class Game24Task(Task):
    """Game of 24 (the paper's set-up): three arithmetic steps, then the answer line."""

    name = "game24"
    extra_final_step = True

    def _numbers(self, question: Question, state: str) -> str:
        left = current_numbers(state)
        return left if left is not None else " ".join(map(str, puzzle_numbers(question.text)))

    def propose_prompt(self, question: Question, state: str) -> list[Message]:
        numbers = self._numbers(question, state)
        if numbers == "24":
            puzzle = " ".join(map(str, puzzle_numbers(question.text)))
            return [Message("user", _FINAL_24.format(puzzle=puzzle, steps=state))]
        return [Message("user", _PROPOSE_24.format(numbers=numbers))]

    def sample_prompt(self, question: Question, state: str) -> list[Message]:
        return self.propose_prompt(question, state)

    def value_prompt(self, question: Question, state: str) -> list[Message]:
        last = state.strip().split("\n")[-1] if state.strip() else ""
        if "left: " not in last and state.strip():
            puzzle = " ".join(map(str, puzzle_numbers(question.text)))
            answer = last.lower().replace("answer: ", "")
            return [Message("user", _VALUE_LAST_24.format(puzzle=puzzle, answer=answer))]
        return [Message("user", _VALUE_24.format(numbers=self._numbers(question, state)))]

    def parse_value(self, state: str, outputs: Sequence[str]) -> float:
        # The paper: a 4-line state without an answer is worthless.
        if len(state.strip().split("\n")) == 4 and "answer" not in state.lower():
            return 0.0
        return super().parse_value(state, outputs)

    def parse_proposals(self, text: str) -> list[str]:
        return [line for line in super().parse_proposals(text)
                if "left:" in line or line.lower().startswith("answer")][:16]

    def is_final(self, state: str) -> bool:
        return "answer:" in state.lower()

    def conclude_prompt(self, question: Question, state: str) -> Message | None:
        return None  # the paper's answer is the best state as it stands
