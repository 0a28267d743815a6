"""User prompts for the teacher's answers, from training documents only, their split (train or
``heldout-chat-answers``, by a hash of the text) and the generation order of (prompt, mode) units."""
from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


from model.data.split import assert_no_heldout, split_of, u
from model.data.formats import Doc, read_docs

log = logging.getLogger(__name__)

HELDOUT_NAME = "heldout-chat-answers"
HELDOUT_SALT = "chat-answers-v1:"
HELDOUT_BELOW = 0.05  # share of prompts held out (by a hash of the prompt text)
SPLITS = ("train", HELDOUT_NAME)
MODES = ("greedy", "sampled")
PROMPT_SOURCES = ("chitchat", "wiki-sample", "sotu")
# the "extended" pool (issue 13's GPU run: ~100k answers need ~50k prompts) adds these training sources
EXTENDED_SOURCES = ("gcide", "jargon", "fortunes")
POOLS = ("base", "extended")
WORD_SHARE = 0.15  # seeded share of the single-word gcide headwords asked about
MODERN_SOTU_FROM = 1945  # State of the Union addresses from this year on count as modern prose

# --------------------------------------------------------------------------------------------
# 1. Prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One user prompt and where it came from; ``key`` is the hash of its text (the dedup key)."""

    text: str
    kind: str
    source: str
    doc_id: str

    @property
    def key(self) -> str:
        return prompt_key(self.text)

    @property
    def split(self) -> str:
        return prompt_split(self.key)


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_split(key: str) -> str:
    """``heldout-chat-answers`` or ``train`` for a prompt key; a pure function of the key."""
    return HELDOUT_NAME if u(key, salt=HELDOUT_SALT) < HELDOUT_BELOW else "train"


TOPIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": ("What is {topic}?", "Explain {topic} in simple terms.", "Can you tell me about {topic}?",
                "Why is {topic} important?"),
    "list": ("List three facts about {topic}.", "Give me five key points about {topic}.",
             "What are the main things to know about {topic}?"),
    "how-to": ("How can I learn more about {topic}?", "How would you explain {topic} to a child?",
               "How do I write a short school report about {topic}?"),
    "poem-story": ("Write a short poem about {topic}.", "Write a short story that involves {topic}.",
                   "Write a haiku about {topic}."),
    "facts": ("Tell me a fun fact about {topic}.", "In one sentence, what is {topic}?",
              "Give me a quick fact about {topic}."),
}
SUBTOPIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": ("What can you tell me about {topic}?", "Explain {topic} briefly."),
    "list": ("Give me three key facts about {topic}.",),
    "facts": ("Tell me something interesting about {topic}.",),
}
COMPARE_TEMPLATES = ("Compare {topic} and {other}.", "What is the difference between {topic} and {other}?")
SUMMARY_TEMPLATES = ("Summarize this passage in two sentences:\n\n{passage}",
                     "Give a one-sentence summary of the following text.\n\n{passage}",
                     "What is the main idea of this paragraph?\n\n{passage}")
TOPIC_CONTINUE_TEMPLATE = "Continue this paragraph about {topic}:\n\n{passage}"
PROSE_CONTINUE_TEMPLATES = ("Continue this text: {passage}", "Continue the following passage:\n\n{passage}",
                            "What might come next? Continue this text:\n\n{passage}")
STOPWORDS = frozenset("a an and are as at be by for from has in is it its of on or that the this to was were which "
                      "with also one two most many other been who".split())


def training_docs(docs: Iterable[Doc]) -> list[Doc]:
    """Only the documents of the ``train`` split (no validation, no held-out)."""
    return [doc for doc in docs if split_of(doc.id, doc.source) == "train"]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def leading_text(text: str, max_chars: int) -> str:
    """Whole sentences from the start of ``text``, at most ``max_chars`` (at least one sentence)."""
    kept: list[str] = []
    for sentence in sentences(text):
        if kept and len(" ".join([*kept, sentence])) > max_chars:
            break
        kept.append(sentence)
    return " ".join(kept)


def tidy(text: str) -> str:
    """Remove the debris of stripped wiki templates: empty brackets, ``(; ...``, doubled spaces."""
    text = re.sub(r"\(\s*[;,]?\s*\)", "", text)
    text = re.sub(r"\(\s*[;,]\s*", "(", text)
    return re.sub(r" {2,}", " ", re.sub(r" ([,.;:])", r"\1", text)).strip()


def paragraphs(doc: Doc, min_chars: int = 300) -> list[str]:
    """The document's prose paragraphs (lines of at least ``min_chars``), tidied."""
    return [tidy(line) for line in doc.text.split("\n") if len(line.strip()) >= min_chars]


def wiki_topic(title: str) -> str | None:
    """A topic phrase from a wiki title; None for disambiguation pages."""
    if "(disambiguation)" in title:
        return None
    topic = re.sub(r"\s*\([^)]*\)$", "", title)
    return topic[len("List of "):] if topic.startswith("List of ") else topic


def section_headings(doc: Doc) -> list[str]:
    """Headings of the cleaned wiki text: short unindented lines followed by a paragraph."""
    lines = doc.text.split("\n")
    found = []
    for line, after in zip(lines, lines[1:]):
        if (3 <= len(line) < 60 and line == line.strip() and line[0].isupper() and line[-1] not in ".,:;"
                and len(after) >= 200):
            found.append(line)
    return list(dict.fromkeys(found))


def mid_sentence_phrase(heading: str, text: str) -> str:
    """``heading`` as it reads mid-sentence: first letter lowered unless the word is a proper noun."""
    first = heading.split()[0]
    if first.isupper() or re.search(rf"[a-z,] {re.escape(first)}\b", text):
        return heading
    return heading[0].lower() + heading[1:]


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 2}


def nearest_topic(doc: Doc, others: Sequence[Doc], rng: random.Random) -> Doc:
    """The other document whose first sentence shares most content words (ties: seeded choice)."""
    mine = content_words(leading_text(doc.text, 300))
    scored = [(len(mine & content_words(leading_text(o.text, 300))), rng.random(), o) for o in others if o.id != doc.id]
    return max(scored, key=lambda s: (s[0], s[1]))[2]


def doc_rng(seed: int, doc_id: str, what: str) -> random.Random:
    """A random generator for one seeded decision about one document (order-independent)."""
    return random.Random(f"{seed}:{what}:{doc_id}")


def chat_prompts(docs: Iterable[Doc], max_chars: int = 400) -> Iterator[Prompt]:
    """The first user turn (``A:`` line) of each chit-chat training conversation."""
    for doc in training_docs(docs):
        first = doc.text.split("\n", 1)[0]
        said = first[3:].strip() if first.startswith("A: ") else ""
        if re.search(r"[A-Za-z]", said) and len(said) <= max_chars:
            yield Prompt(said, "chat", doc.source, doc.id)


def topic_prompts(docs: Iterable[Doc], seed: int = 0, subtopics_per_doc: int = 6,
                  passages_per_doc: int = 3) -> Iterator[Prompt]:
    """Templated questions and instructions over each wiki training document's topic."""
    usable = [d for d in training_docs(docs) if wiki_topic(d.title)]
    for doc in usable:
        topic = wiki_topic(doc.title)
        for kind, templates in TOPIC_TEMPLATES.items():
            for template in templates:
                yield Prompt(template.format(topic=topic), kind, doc.source, doc.id)
        rng = doc_rng(seed, doc.id, "topic")
        other = wiki_topic(nearest_topic(doc, usable, rng).title)
        for template in COMPARE_TEMPLATES:
            yield Prompt(template.format(topic=topic, other=other), "compare", doc.source, doc.id)
        headings = section_headings(doc)
        for heading in rng.sample(headings, min(subtopics_per_doc, len(headings))):
            kind = rng.choice(sorted(SUBTOPIC_TEMPLATES))
            phrase = f"the {mid_sentence_phrase(heading, doc.text)} of {topic}"
            yield Prompt(rng.choice(SUBTOPIC_TEMPLATES[kind]).format(topic=phrase), kind, doc.source, doc.id)
        if len(headings) >= 2:
            a, b = rng.sample(headings, 2)
            yield Prompt(f"In {topic}, what is the difference between {mid_sentence_phrase(a, doc.text)} and "
                         f"{mid_sentence_phrase(b, doc.text)}?", "compare", doc.source, doc.id)
        found = paragraphs(doc)
        for passage in rng.sample(found, min(passages_per_doc, len(found))):
            yield Prompt(rng.choice(SUMMARY_TEMPLATES).format(passage=leading_text(passage, 700)), "summarise",
                         doc.source, doc.id)
        if found:
            yield Prompt(TOPIC_CONTINUE_TEMPLATE.format(topic=topic, passage=leading_text(found[0], 300)), "continue",
                         doc.source, doc.id)


def is_modern_prose(doc: Doc) -> bool:
    """Wiki articles and State of the Union addresses from ``MODERN_SOTU_FROM`` on."""
    if doc.source == "sotu":
        year = doc.id.split("/", 1)[1][:4]
        return year.isdigit() and int(year) >= MODERN_SOTU_FROM
    return doc.source == "wiki-sample"


def prose_prompts(docs: Iterable[Doc], seed: int = 0, passages_per_doc: int = 4) -> Iterator[Prompt]:
    """"Continue this text" over the opening sentences of paragraphs of modern training prose."""
    for doc in training_docs(docs):
        if not is_modern_prose(doc):
            continue
        rng = doc_rng(seed, doc.id, "prose")
        found = paragraphs(doc)
        for passage in rng.sample(found, min(passages_per_doc, len(found))):
            yield Prompt(rng.choice(PROSE_CONTINUE_TEMPLATES).format(passage=leading_text(passage, 350)),
                         "continue-prose", doc.source, doc.id)


WORD_TEMPLATES = ("What does the word '{word}' mean?", "Use the word '{word}' in a sentence.",
                  "Explain the meaning of '{word}' in simple terms.", "Give me a synonym for '{word}'.")
JARGON_TEMPLATES = ("What does '{term}' mean in hacker slang?", "What is '{term}' in computer jargon?")
QUOTE_TEMPLATES = ("What does this quote mean?\n\n{text}", "Explain this saying in your own words:\n\n{text}",
                   "Do you agree with this? Why or why not?\n\n{text}")


def chat_turn_prompts(docs: Iterable[Doc], max_chars: int = 300) -> Iterator[Prompt]:
    """Extended pool: the conversation-starter title and every later question turn (ending with '?', at
    least four words) of each chit-chat training conversation, each as a first user turn."""
    for doc in training_docs(docs):
        if doc.title.endswith("?") and len(doc.title) <= max_chars:
            yield Prompt(doc.title, "chat", doc.source, doc.id)
        for line in doc.text.split("\n")[1:]:
            said = line[3:].strip() if line[:3] in ("A: ", "B: ") else ""
            if said.endswith("?") and len(said.split()) >= 4 and len(said) <= max_chars:
                yield Prompt(said, "chat", doc.source, doc.id)


def word_prompts(docs: Iterable[Doc], seed: int = 0, share: float = WORD_SHARE) -> Iterator[Prompt]:
    """Extended pool: questions about a seeded ``share`` of the single-word dictionary headwords (gcide) and
    about every jargon-file term of the training split."""
    for doc in training_docs(docs):
        rng = doc_rng(seed, doc.id, "word")
        if doc.source == "gcide":
            if re.fullmatch(r"[A-Za-z]{4,}", doc.title) and rng.random() < share:
                yield Prompt(rng.choice(WORD_TEMPLATES).format(word=doc.title.lower()), "define", doc.source, doc.id)
        elif doc.source == "jargon" and 2 <= len(doc.title) <= 40:
            yield Prompt(rng.choice(JARGON_TEMPLATES).format(term=doc.title), "define", doc.source, doc.id)


def quote_prompts(docs: Iterable[Doc], seed: int = 0, max_chars: int = 280) -> Iterator[Prompt]:
    """Extended pool: short fortune-cookie sayings and jokes of the training split, to explain or discuss."""
    for doc in training_docs(docs):
        text = "\n".join(line.strip() for line in doc.text.strip().split("\n"))
        if 20 <= len(text) <= max_chars and re.search(r"[A-Za-z]{3}", text):
            yield Prompt(doc_rng(seed, doc.id, "quote").choice(QUOTE_TEMPLATES).format(text=text), "quote",
                         doc.source, doc.id)


def dedupe(prompts: Iterable[Prompt]) -> list[Prompt]:
    """First occurrence of each prompt text (by its hash)."""
    seen: dict[str, Prompt] = {}
    for p in prompts:
        seen.setdefault(p.key, p)
    return list(seen.values())


def build_prompts(docs: Iterable[Doc], seed: int = 0, passages_per_doc: int = 4, pool: str = "base") -> list[Prompt]:
    """The whole pool from ``docs`` (any sources; held-out and validation documents are skipped).
    ``pool="extended"`` appends chit-chat question turns, dictionary/jargon words and short sayings
    (the base pool comes first, unchanged, so its prompts keep their order)."""
    if pool not in POOLS:
        raise ValueError(f"unknown prompt pool {pool!r}; choose from {', '.join(POOLS)}")
    docs = list(docs)
    prompts = [*chat_prompts(d for d in docs if d.source == "chitchat"),
               *topic_prompts((d for d in docs if d.source == "wiki-sample"), seed,
                              passages_per_doc=max(1, passages_per_doc - 1)),
               *prose_prompts(docs, seed, passages_per_doc)]
    if pool == "extended":
        prompts += [*chat_turn_prompts(d for d in docs if d.source == "chitchat"),
                    *word_prompts((d for d in docs if d.source in ("gcide", "jargon")), seed),
                    *quote_prompts((d for d in docs if d.source == "fortunes"), seed)]
    pool_list = dedupe(prompts)
    assert_no_heldout({p.doc_id for p in pool_list})
    return pool_list


def corpus_docs(pool: str = "base") -> list[Doc]:
    """The extracted documents of the prompt sources (``python -m model.data prepare`` first)."""
    sources = PROMPT_SOURCES + (EXTENDED_SOURCES if pool == "extended" else ())
    return [doc for source in sources for doc in read_docs(source)]


# --------------------------------------------------------------------------------------------
# 2. The work list: (prompt, mode) units in generation order
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One answer to generate: a prompt in one mode; ``seed`` drives a sampled answer (None: greedy)."""

    prompt: Prompt
    mode: str
    seed: int | None

    @property
    def key(self) -> str:
        return f"{self.prompt.key}:{self.mode}"


def sample_seed(run_seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{run_seed}:{key}".encode()).hexdigest()[:8], 16)


def kind_group(prompt: Prompt) -> str:
    return {"chat": "chat", "continue-prose": "prose", "define": "words", "quote": "quotes"}.get(prompt.kind, "topic")


def interleave_groups(prompts: Sequence[Prompt], seed: int) -> list[Prompt]:
    """Seeded shuffle within each group (chat / topic / prose), then round-robin across groups, so
    that any prefix of the schedule is a balanced mix."""
    groups: dict[str, list[Prompt]] = {}
    for p in sorted(prompts, key=lambda p: p.key):
        groups.setdefault(kind_group(p), []).append(p)
    rng = random.Random(f"schedule:{seed}")
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    order = []
    for i in range(max((len(q) for q in queues), default=0)):
        order += [q[i] for q in queues if i < len(q)]
    return order


def schedule(prompts: Sequence[Prompt], seed: int = 0) -> list[Unit]:
    """Held-out prompts' greedy answers first, then each training prompt greedy and sampled."""
    heldout = [Unit(p, "greedy", None) for p in interleave_groups([p for p in prompts if p.split != "train"], seed)]
    train = [Unit(p, mode, sample_seed(seed, f"{p.key}:{mode}") if mode == "sampled" else None)
             for p in interleave_groups([p for p in prompts if p.split == "train"], seed) for mode in MODES]
    return heldout + train
