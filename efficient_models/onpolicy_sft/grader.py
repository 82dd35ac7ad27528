"""The grader: a response is correct when its last `\\boxed{...}` answer equals the reference answer.

The box is found by matching braces (so `\\boxed{\\frac{1}{2}}` is read whole), and the two answers are
compared by math-verify (symbolic: 1/2, 0.5 and \\frac{1}{2} are the same answer). math-verify bounds its
sympy work with SIGALRM, which only the main thread may use; elsewhere (a data-loader thread) answers
longer than `MAX_ANSWER_CHARS` are refused instead, since a short answer cannot be costly to parse.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from math_verify import parse, verify

BOX_OPENERS = ("\\boxed{", "\\fbox{")
MAX_ANSWER_CHARS = 64  # far above any answer of the task; longer boxes are wrong, not parsed
TIMEOUT_SECONDS = 5


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`; None when there is none, it is empty or never closes."""
    start, opener = max((text.rfind(opener), opener) for opener in BOX_OPENERS)
    if start < 0:
        return None
    depth, begin = 1, start + len(opener)
    for position in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[begin:position].strip() or None
    return None  # an unclosed last box is malformed: an earlier box is not the model's final answer


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parsed(answer: str):
    # `$...$` makes math-verify read the answer as LaTeX; plain numbers and a/b parse the same way.
    return parse(f"${answer}$", parsing_timeout=_timeout())


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two answer strings (the contents of boxes) are mathematically equal."""
    if predicted.strip() == reference.strip():
        return True
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    gold, guess = _parsed(reference), _parsed(predicted)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=_timeout()))


def is_correct(response: str, reference: str) -> bool:
    """Whether the last boxed answer of `response` equals `reference`; no box, or a malformed one, is wrong."""
    answer = last_boxed(response)
    return answer is not None and answers_match(answer, reference)


# Off the main thread math-verify warns on every call that its timeout is off; `MAX_ANSWER_CHARS` bounds it.
for _module in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_module).setLevel(logging.ERROR)
