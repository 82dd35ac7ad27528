"""A generated English-like -> French-like translation task whose word order differs, so reading ahead matters.

The target language is made up but French-shaped: adjectives follow the noun (mirrored when there are two),
determiners and adjectives agree with the noun's gender, and a few multi-word expressions change length
(`in front of` -> `devant`, `because of` -> `a cause de`). A sentence is one or more clauses joined by
`and`/`but`, at most `MAX_WORDS` source words, ending in a period attached to the last word. The splits are
fixed by a seed: the same seed gives the same pairs, and no test source appears in train.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_WORDS = 40

# noun -> (target noun, gender)
NOUNS = {
    "cat": ("chat", "m"), "dog": ("chien", "m"), "house": ("maison", "f"), "car": ("voiture", "f"),
    "apple": ("pomme", "f"), "book": ("livre", "m"), "table": ("table", "f"), "bird": ("oiseau", "m"),
    "flower": ("fleur", "f"), "tree": ("arbre", "m"), "boat": ("bateau", "m"), "door": ("porte", "f"),
    "child": ("enfant", "m"), "woman": ("femme", "f"), "garden": ("jardin", "m"), "window": ("fenetre", "f"),
}
# adjective -> (masculine, feminine)
ADJECTIVES = {
    "red": ("rouge", "rouge"), "black": ("noir", "noire"), "white": ("blanc", "blanche"),
    "green": ("vert", "verte"), "small": ("petit", "petite"), "big": ("grand", "grande"),
    "old": ("vieux", "vieille"), "new": ("nouveau", "nouvelle"), "happy": ("content", "contente"),
    "blue": ("bleu", "bleue"),
}
DETERMINERS = {"the": ("le", "la"), "a": ("un", "une"), "my": ("mon", "ma"), "this": ("ce", "cette")}
VERBS = {
    "sees": "voit", "likes": "aime", "finds": "trouve", "takes": "prend", "watches": "regarde",
    "follows": "suit", "paints": "peint", "opens": "ouvre",
}
PREPOSITIONS = {"in front of": "devant", "next to": "a cote de", "because of": "a cause de", "near": "pres de",
                "behind": "derriere", "under": "sous"}
ADVERBIALS = {"every day": "chaque jour", "right now": "tout de suite", "again": "encore", "today": "aujourd'hui"}
CONJUNCTIONS = {"and": "et", "but": "mais"}


@dataclass(frozen=True)
class Pair:
    source: str
    target: str

    @property
    def source_words(self) -> list[str]:
        return self.source.split(" ")


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str]]:
    determiner = rng.choice(list(DETERMINERS))
    adjectives = rng.sample(list(ADJECTIVES), rng.choice([0, 0, 1, 1, 2]))
    noun = rng.choice(list(NOUNS))
    target_noun, gender = NOUNS[noun]
    agree = 0 if gender == "m" else 1
    source = [determiner, *adjectives, noun]
    # Adjectives follow the noun in mirrored order: "the big red cat" -> "le chat rouge grand".
    target = [DETERMINERS[determiner][agree], target_noun, *(ADJECTIVES[a][agree] for a in reversed(adjectives))]
    return source, target


def _clause(rng: random.Random) -> tuple[list[str], list[str]]:
    subject_source, subject_target = _noun_phrase(rng)
    verb = rng.choice(list(VERBS))
    object_source, object_target = _noun_phrase(rng)
    source = [*subject_source, verb, *object_source]
    target = [*subject_target, VERBS[verb], *object_target]
    if rng.random() < 0.5:
        preposition = rng.choice(list(PREPOSITIONS))
        place_source, place_target = _noun_phrase(rng)
        source += [*preposition.split(), *place_source]
        target += [*PREPOSITIONS[preposition].split(), *place_target]
    if rng.random() < 0.3:
        adverbial = rng.choice(list(ADVERBIALS))
        source += adverbial.split()
        target += ADVERBIALS[adverbial].split()
    return source, target


def sentence_pair(rng: random.Random, max_words: int = MAX_WORDS) -> Pair:
    """One pair of at most `max_words` source words: clauses are added while they fit a drawn length."""
    budget = rng.randint(4, max_words)
    source, target = _clause(rng)
    while True:
        conjunction = rng.choice(list(CONJUNCTIONS))
        more_source, more_target = _clause(rng)
        if len(source) + 1 + len(more_source) > min(budget, max_words):
            break
        source += [conjunction, *more_source]
        target += [CONJUNCTIONS[conjunction], *more_target]
    return Pair(" ".join(source) + ".", " ".join(target) + ".")


def make_splits(seed: int = 0, train_size: int = 2000, test_size: int = 200) -> tuple[list[Pair], list[Pair]]:
    """Fixed train and test pairs for `seed`; test sources are distinct and never occur in train."""
    rng = random.Random(seed)
    test: dict[str, Pair] = {}
    while len(test) < test_size:
        pair = sentence_pair(rng)
        test.setdefault(pair.source, pair)
    train = []
    while len(train) < train_size:
        pair = sentence_pair(rng)
        if pair.source not in test:
            train.append(pair)
    return train, list(test.values())
