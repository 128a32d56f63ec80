"""A deterministic corpus of English-like sentences with long-tailed lengths (4-120 words).

Shared by the embedding demo, ``embed_corpus.py``, the evaluation harness, ``bench_embed.py``
and the tests, so they all measure the same thing. Sentence ``i`` depends only on ``(seed,
i)``: any slice, file or generator of the corpus is reproducible, and nothing is downloaded.

Lengths follow a log-normal law (median about 13 words, one sentence in a hundred above 70,
capped at 120), the shape of real corpora that makes batches in arrival order mostly padding.
Each sentence is about one of a few topics, built from that topic's words, so a semantic
search has a right answer: a query's nearest neighbours share its topic.

    >>> sentence(0) == sentence(0) and sentence(0) != sentence(1)
    True
    >>> all(MIN_WORDS <= len(sentence(i).split()) <= MAX_WORDS for i in range(200))
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

MIN_WORDS = 4
MAX_WORDS = 120
#: log-normal length law: median e**2.55 ~ 13 words; sigma puts 1% of sentences above 70 words.
_MU, _SIGMA = 2.55, 0.72

_KINDS = ("nouns", "verbs", "adjectives")
#: Per topic: nouns | verbs | adjectives, comma-separated (some nouns are two words).
_TOPIC_WORDS = {
    "astronomy": (
        "telescope, galaxy, planet, comet, star, orbit, nebula, "
        "moon, astronomer, observatory, asteroid, supernova, eclipse, black hole",
        "observes, orbits, detects, photographs, measures, tracks, circles, illuminates",
        "distant, bright, faint, massive, icy, rotating, ancient, red",
    ),
    "cooking": (
        "chef, recipe, garlic, oven, sauce, butter, onion, "
        "pasta, kitchen, pan, soup, dough, spice, tomato",
        "simmers, bakes, chops, seasons, roasts, stirs, tastes, fries",
        "crispy, fresh, spicy, creamy, golden, savory, sweet, tender",
    ),
    "football": (
        "striker, goalkeeper, referee, stadium, penalty, match, coach, "
        "team, midfielder, goal, league, fans, defender, corner kick",
        "scores, passes, defends, tackles, celebrates, shoots, saves, wins",
        "decisive, late, brilliant, crowded, offside, tactical, injured, winning",
    ),
    "programming": (
        "compiler, function, bug, database, server, developer, variable, "
        "loop, repository, test suite, thread, memory leak, algorithm, API",
        "compiles, debugs, refactors, deploys, crashes, parses, caches, queries",
        "recursive, concurrent, slow, typed, legacy, open source, asynchronous, broken",
    ),
    "medicine": (
        "doctor, patient, vaccine, nurse, hospital, surgery, fever, "
        "infection, symptom, diagnosis, antibiotic, clinic, heart, blood pressure",
        "treats, diagnoses, prescribes, examines, heals, monitors, vaccinates, operates on",
        "chronic, acute, healthy, infected, clinical, painful, elderly, recovering",
    ),
    "music": (
        "guitarist, orchestra, melody, piano, drummer, concert, song, "
        "violin, chorus, album, singer, rhythm, conductor, symphony",
        "plays, composes, sings, records, tunes, performs, rehearses, improvises",
        "loud, melodic, acoustic, catchy, classical, jazzy, harmonic, soulful",
    ),
    "gardening": (
        "gardener, seed, rose, soil, compost, greenhouse, tulip, "
        "hedge, watering can, vegetable patch, root, weed, shovel, orchard",
        "plants, waters, prunes, harvests, digs, fertilizes, grows, weeds",
        "blooming, muddy, green, wilted, fertile, organic, shady, leafy",
    ),
    "finance": (
        "investor, stock, bank, loan, interest rate, portfolio, market, "
        "bond, dividend, inflation, budget, trader, mortgage, currency",
        "invests, borrows, trades, lends, audits, hedges, saves, forecasts",
        "volatile, profitable, risky, quarterly, bearish, bullish, indebted, liquid",
    ),
}
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    topic: {kind: tuple(text.split(", ")) for kind, text in zip(_KINDS, texts, strict=True)}
    for topic, texts in _TOPIC_WORDS.items()
}
TOPIC_NAMES = tuple(TOPICS)
_CONNECTORS = ("and", "while", "because", "so", "but", "after", "although", "when")
_PLACES = ("near", "behind", "with", "beside", "without", "under", "above", "for")

#: Queries for a semantic-search sanity check: (query, the topic its neighbours should have).
SEARCH_QUERIES = (
    ("telescopes photograph faint galaxies and distant planets", "astronomy"),
    ("a creamy garlic sauce simmering in the kitchen", "cooking"),
    ("the goalkeeper saves a late penalty in the stadium", "football"),
    ("debugging a memory leak in the database server", "programming"),
    ("the doctor prescribes antibiotics for the infection", "medicine"),
    ("an orchestra rehearses a classical symphony", "music"),
)


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"psm-corpus:{seed}:{index}")  # str seeds hash the same everywhere


def word_count(index: int, seed: int = 0) -> int:
    """The length of sentence ``index`` in words: log-normal, clipped to 4..120."""
    draw = _rng(seed, index).lognormvariate(_MU, _SIGMA)
    return max(MIN_WORDS, min(MAX_WORDS, math.floor(draw)))


def topic_of(index: int, seed: int = 0) -> str:
    """The topic sentence ``index`` is about."""
    return TOPIC_NAMES[_rng(seed + 1, index).randrange(len(TOPIC_NAMES))]


def _clause(rng: random.Random, words: dict[str, tuple[str, ...]]) -> list[str]:
    noun, other, place = (rng.choice(words["nouns"]) for _ in range(3))
    text = (
        f"the {rng.choice(words['adjectives'])} {noun} {rng.choice(words['verbs'])} "
        f"the {other} {rng.choice(_PLACES)} the {rng.choice(words['adjectives'])} {place}"
    )
    return text.split()


def sentence(index: int, seed: int = 0) -> str:
    """Sentence ``index`` of the corpus: clauses about one topic, exactly ``word_count`` words."""
    rng = _rng(seed + 2, index)
    words = TOPICS[topic_of(index, seed)]
    target = word_count(index, seed)
    out = _clause(rng, words)
    while len(out) < target:
        out += [rng.choice(_CONNECTORS), *_clause(rng, words)]
    text = " ".join(out[:target])
    return text[0].upper() + text[1:] + "."


def sentences(count: int | None = None, seed: int = 0, start: int = 0) -> Iterator[str]:
    """Sentences ``start, start+1, ...``: ``count`` of them, or endlessly; made as read."""
    index = start
    while count is None or index < start + count:
        yield sentence(index, seed)
        index += 1


class Corpus(Sequence[str]):
    """``length`` sentences as a sequence (sized, so progress bars know the total).

    >>> corpus = Corpus(3)
    >>> len(corpus), corpus[1] == sentence(1), len(corpus[:2])
    (3, True, 2)
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        return sentence(index, self.seed)


def write_corpus(path: str | Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` sentences to ``path``, one per line, streaming (any size fits)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as out:
        for text in sentences(count, seed):
            out.write(text + "\n")
    return path
