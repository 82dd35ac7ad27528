"""The verifiable reasoning task: multi-step arithmetic word problems with checkable integer answers.

Each problem is a start amount and 2-4 events (buy more, buy boxes of k, give away, double, share
equally) on one quantity; the answer is what is left. Problems come from a seeded stream, and a problem's
split is decided by a hash of its text, so the train and test splits are disjoint by construction and
each split is stable: the first n problems of a split are the same for any larger n.

Every problem carries two worked solutions ending in `\\boxed{answer}`: a concise one (one line per event)
and a verbose one, the training data of the verbose starting reasoner whose length on-policy SFT is meant to
remove. A verbose solution's redundancy comes at one of four levels, drawn per problem (mostly the two most
verbose): from the bare steps to restatements, a self-check per step and a final recheck, twice over. A real
reasoner's verbosity varies from problem to problem in the same way; without that spread a sampled reasoner
would hold no shorter correct answer for on-policy SFT to select, whatever its budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from workbench.errors import InputError

Split = Literal["train", "test"]
TEST_BUCKETS = 1  # of HASH_BUCKETS: a tenth of the stream is test
HASH_BUCKETS = 10
NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jon", "Kai", "Lena")
ITEMS = ("apple", "marble", "sticker", "pencil", "coin", "shell", "card", "book", "stamp", "cookie")
# The share of problems whose verbose solution has each level of redundancy (0: bare steps .. 3: rechecked twice).
VERBOSITY_WEIGHTS = (0.1, 0.2, 0.4, 0.3)
MAX_VERBOSITY = len(VERBOSITY_WEIGHTS) - 1
INSTRUCTION = "Solve step by step, and put the final answer in \\boxed{}."


@dataclass(frozen=True)
class Event:
    """One change to the running amount: its sentence, the arithmetic as text, and the amount after it."""

    sentence: str
    arithmetic: str  # e.g. "7 + 3 * 4 = 19"
    check: str  # the same step worked backwards, for the verbose solution's self-check
    before: int
    after: int


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    events: tuple[Event, ...]
    name: str
    item: str
    start: int

    @property
    def prompt(self) -> str:
        """The user turn the model sees."""
        return f"{self.question} {INSTRUCTION}"

    def concise_solution(self) -> str:
        lines = [f"Start: {self.start}."] + [f"{event.arithmetic}." for event in self.events]
        return "\n".join(lines) + f"\nThe answer is \\boxed{{{self.answer}}}."

    @property
    def verbosity(self) -> int:
        """The verbose solution's level of redundancy, 0..MAX_VERBOSITY, drawn from a hash of the question."""
        draw = int.from_bytes(hashlib.sha256(f"verbosity:{self.question}".encode()).digest()[:8], "big") / 2**64
        return int(np.searchsorted(np.cumsum(VERBOSITY_WEIGHTS), draw, side="right"))

    def verbose_solution(self) -> str:
        """Long on purpose, as its verbosity level says: level 0 gives each step in a sentence; 1 adds the
        restatement of the problem and of each step; 2 a self-check per step and a final recheck; 3 a second
        recheck."""
        level, things = self.verbosity, f"{self.item}s"
        parts = [f"Let me restate the problem. {self.name} starts with {self.start} {things}, and then "
                 f"{len(self.events)} things happen to them. I need the number of {things} at the end. "
                 "I will go through the events one at a time" + (" and check each step." if level >= 2 else ".")
                 ] if level >= 1 else []
        for number, event in enumerate(self.events, start=1):
            restated = f" {event.sentence} Before this, {self.name} had {event.before} {things}." if level >= 1 else ""
            check = f" Let me check this step: {event.check}, which matches." if level >= 2 else ""
            lead = "So the" if restated else "The"
            parts.append(f"Step {number}:{restated} {lead} new amount is {event.arithmetic}.{check} "
                         f"So now {self.name} has {event.after} {things}.")
        chain = " -> ".join(str(amount) for amount in [self.start] + [event.after for event in self.events])
        if level >= 2:
            parts.append(f"Let me go over everything again to be sure. The amounts were {chain}. "
                         f"Each step checks out, so {self.name} ends with {self.answer} {things}.")
        if level >= 3:
            parts.append(f"Let me recheck once more from the start. {self.name} began with {self.start} {things}, "
                         f"and the amounts went {chain}. Yes, that is right.")
        parts.append(f"The final answer is \\boxed{{{self.answer}}}.")
        return "\n\n".join(parts)


def _buy(rng: np.random.Generator, amount: int, who: str, item: str) -> Event:
    more = int(rng.integers(2, 10))
    return Event(f"{who} buys {more} more {item}s.", f"{amount} + {more} = {amount + more}",
                 f"{amount + more} - {more} = {amount}", amount, amount + more)


def _buy_boxes(rng: np.random.Generator, amount: int, who: str, item: str) -> Event:
    boxes, each = int(rng.integers(2, 5)), int(rng.integers(2, 7))
    after = amount + boxes * each
    return Event(f"{who} buys {boxes} boxes with {each} {item}s in each box.",
                 f"{amount} + {boxes} * {each} = {amount} + {boxes * each} = {after}",
                 f"{after} - {boxes * each} = {amount}", amount, after)


def _give_away(rng: np.random.Generator, amount: int, who: str, item: str) -> Event | None:
    if amount < 2:
        return None
    given = int(rng.integers(1, min(amount, 10)))
    return Event(f"{who} gives {given} {item}s to a friend.", f"{amount} - {given} = {amount - given}",
                 f"{amount - given} + {given} = {amount}", amount, amount - given)


def _multiply(rng: np.random.Generator, amount: int, who: str, item: str) -> Event | None:
    if amount > 40:  # keeps answers small enough for a 135M model's arithmetic
        return None
    factor = int(rng.integers(2, 4))
    word = {2: "doubles", 3: "triples"}[factor]
    return Event(f"Then the number of {item}s {who} has {word}.", f"{amount} * {factor} = {amount * factor}",
                 f"{amount * factor} / {factor} = {amount}", amount, amount * factor)


def _share(rng: np.random.Generator, amount: int, who: str, item: str) -> Event | None:
    parts = [d for d in (2, 3, 4) if amount % d == 0 and amount // d > 0]
    if not parts:
        return None
    d = int(rng.choice(parts))
    return Event(f"{who} splits the {item}s equally into {d} bags and keeps only one bag.",
                 f"{amount} / {d} = {amount // d}", f"{amount // d} * {d} = {amount}", amount, amount // d)


EVENT_KINDS: tuple[Callable[..., Event | None], ...] = (_buy, _buy_boxes, _give_away, _multiply, _share)


def _problem(rng: np.random.Generator, min_events: int, max_events: int) -> Problem:
    name, item = str(rng.choice(NAMES)), str(rng.choice(ITEMS))
    start = int(rng.integers(3, 20))
    amount, events = start, []
    for _ in range(int(rng.integers(min_events, max_events + 1))):
        event = None
        while event is None:  # some kinds do not apply to every amount (nothing to give, odd amount to share)
            event = EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))](rng, amount, name, item)
        events.append(event)
        amount = event.after
    sentences = " ".join(event.sentence for event in events)
    question = f"{name} has {start} {item}s. {sentences} How many {item}s does {name} have now?"
    return Problem(question, str(amount), tuple(events), name, item, start)


def split_of(question: str, seed: int) -> Split:
    """The split a question belongs to: a hash, so no question is ever in both."""
    bucket = int.from_bytes(hashlib.sha256(f"{seed}:{question}".encode()).digest()[:8], "big") % HASH_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def _stream(seed: int, min_events: int, max_events: int) -> Iterator[Problem]:
    rng = np.random.default_rng(seed)
    while True:
        yield _problem(rng, min_events, max_events)


def problems(split: Split, count: int, seed: int = 0, min_events: int = 2, max_events: int = 3) -> list[Problem]:
    """The first `count` distinct problems of `split` in the seed's stream."""
    if split not in ("train", "test"):
        raise InputError(f"unknown split {split!r}; choose train or test")
    if not 1 <= min_events <= max_events <= 4:
        raise InputError(f"events per problem must satisfy 1 <= min ({min_events}) <= max ({max_events}) <= 4")
    if count < 0:
        raise InputError(f"problem count must be >= 0, not {count}")
    chosen: dict[str, Problem] = {}
    for problem in _stream(seed, min_events, max_events):
        if len(chosen) == count:
            break
        if problem.question not in chosen and split_of(problem.question, seed) == split:
            chosen[problem.question] = problem
    return list(chosen.values())
