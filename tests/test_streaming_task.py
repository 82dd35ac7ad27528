"""The generated translation task: fixed splits by seed, real reordering, gender agreement, bounded length."""

import random

from efficient_models.streaming.task import (
    ADJECTIVES, DETERMINERS, MAX_WORDS, NOUNS, PREPOSITIONS, make_splits, sentence_pair,
)

FEMININE_NOUNS = {target for target, gender in NOUNS.values() if gender == "f"}
TARGET_NOUNS = {target for target, _ in NOUNS.values()}
MASCULINE_FORMS = {forms[0] for forms in [*DETERMINERS.values(), *ADJECTIVES.values()]}
FEMININE_FORMS = {forms[1] for forms in [*DETERMINERS.values(), *ADJECTIVES.values()]}


def test_the_splits_are_fixed_by_the_seed_and_disjoint():
    train, test = make_splits(seed=3, train_size=300, test_size=50)
    assert (train, test) == make_splits(seed=3, train_size=300, test_size=50)
    assert make_splits(seed=4, train_size=300, test_size=50)[1] != test
    assert len({pair.source for pair in test}) == 50
    assert not {pair.source for pair in train} & {pair.source for pair in test}


def test_sentences_reach_but_never_pass_the_length_limit():
    train, _ = make_splits(seed=0, train_size=1000, test_size=10)
    lengths = [len(pair.source_words) for pair in train]
    assert max(lengths) <= MAX_WORDS
    assert max(lengths) >= MAX_WORDS - 4 and min(lengths) <= 8


def test_a_noun_phrase_is_reordered_and_agrees_in_gender():
    assert sentence_pair(random.Random(1)) == sentence_pair(random.Random(1))
    # Checked by hand: two adjectives mirror behind the noun, masculine for "arbre", feminine for "table".
    example = make_splits(seed=0, train_size=0, test_size=2)[1][1]
    assert example.source == "my new black tree watches the big happy table."
    assert example.target == "mon arbre noir nouveau regarde la table contente grande."
    train, _ = make_splits(seed=0, train_size=500, test_size=10)
    reordered = 0
    for pair in train:
        words = pair.target.rstrip(".").split(" ")
        for index, word in enumerate(words):
            if word not in TARGET_NOUNS:
                continue
            feminine = word in FEMININE_NOUNS
            determiner = words[index - 1]
            assert determiner in (FEMININE_FORMS if feminine else MASCULINE_FORMS) or determiner in (
                FEMININE_FORMS & MASCULINE_FORMS), pair
            following = index + 1
            while following < len(words) and words[following] in MASCULINE_FORMS | FEMININE_FORMS \
                    and words[following] not in {form for forms in DETERMINERS.values() for form in forms}:
                assert words[following] in (FEMININE_FORMS if feminine else MASCULINE_FORMS), pair
                following += 1
            reordered += following > index + 1
    assert reordered > 200  # adjectives moved behind their noun in many phrases


def test_multi_word_expressions_change_length():
    train, _ = make_splits(seed=0, train_size=500, test_size=10)
    with_expression = [pair for pair in train if " in front of " in pair.source]
    assert with_expression and all(" devant " in pair.target for pair in with_expression)
    assert any(" a cause de " in pair.target for pair in train)
    assert set(PREPOSITIONS.values()) >= {"devant", "a cause de"}
