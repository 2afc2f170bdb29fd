"""The README's console walkthroughs: their commands, each with the lines shown under it."""

from __future__ import annotations

from dataclasses import dataclass

from support.paths import readme

__all__ = ["Step", "walkthrough"]


@dataclass(frozen=True)
class Step:
    line: int
    command: str
    output: list[str]


def walkthrough(fence: str) -> list[Step]:
    """The `$ …` commands of the README's blocks opened by the fence line `fence` (e.g.
    "```console"), in order, each with the lines under it up to the next command."""
    steps: list[Step] = []
    inside = False
    for number, text in enumerate(readme.read_text().splitlines(), start=1):
        if text.startswith("```"):
            inside = text == fence
            continue
        if not inside:
            continue
        if text.startswith("$ "):
            steps.append(Step(number, text[2:], []))
        else:
            assert steps, f"README.md:{number}: output before any command"
            steps[-1].output.append(text)
    return steps
