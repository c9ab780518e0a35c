"""Synthetic spelling tasks over the dwyl english-words list (picochat.tasks.data.load_word_list).
A tokenizer hides the letters of a word, so a small model has to be taught to spell before it
can count letters.

- SpellingBee: "how many r are in strawberry?" answered by spelling the word out, counting by
  hand, double-checking with a python .count call, and ending with "#### N" (generative eval).
- SimpleSpelling: "Spell the word: cat" -> "cat:c,a,t".

Example i is drawn from random.Random(i) (test: i + 10,000,000), so any size and slice is
reproducible and the two splits do not share a seed.
"""

import random
import string

from picochat.common import PicochatError
from picochat.tasks.common import Task
from picochat.tasks.data import load_word_list
from picochat.tasks.gsm8k import final_answer_matches

SPLITS = ("train", "test")
TEST_SEED_OFFSET = 10_000_000
LETTER_FROM_WORD = 0.9  # else any letter, so that "0" is sometimes the answer
LOWERCASE = 0.3
QUESTION_MARK = 0.5

# in several languages, so the skill is not tied to one phrasing
TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are there in {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the letter {letter} in the word {word}",
    "Count how often {letter} occurs in {word}",
    "What is the number of {letter} in {word}",
    "In the word {word}, how many times does {letter} occur",
    "How often does {letter} show up in {word}",
    "Tell me how many {letter} the word {word} has",
    "Number of {letter} letters in {word}",
    "How many occurrences of the letter {letter} does {word} contain",
    "Can you count the {letter} in {word}",
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}",
    "¿Cuántas {letter} tiene {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans le mot {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie oft kommt der Buchstabe {letter} im Wort {word} vor",
    "Wie viele {letter} hat das Wort {word}",
    "Quante volte compare la lettera {letter} nella parola {word}",
    "Quantas vezes a letra {letter} aparece na palavra {word}",
    "单词 {word} 中有几个字母 {letter}",
    "{word} という単語に {letter} は何回出てきますか",
    "{word} 단어에 {letter} 글자가 몇 개 있나요",
]


def _check(size: int, split: str):
    if split not in SPLITS:
        raise PicochatError(f"spelling split {split!r}: choose {' or '.join(SPLITS)}")
    if size < 0:
        raise PicochatError(f"spelling size must be >= 0, got {size}")


def _rng(split: str, index: int) -> random.Random:
    return random.Random(index if split == "train" else TEST_SEED_OFFSET + index)


def spelled(word: str) -> str:
    return f"{word}:{','.join(word)}"


class WordTask(Task):
    """size generated examples over the word list, example i drawn from its own seed."""
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        _check(size, split)
        self.size, self.split = size, split
        self.words = load_word_list()

    def num_examples(self) -> int:
        return self.size


class SpellingBee(WordTask):
    def get_example(self, index: int) -> dict:
        rng = _rng(self.split, index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_FROM_WORD else rng.choice(string.ascii_lowercase)
        template = rng.choice(TEMPLATES)
        if rng.random() < LOWERCASE:
            template = template.lower()
        question = template.format(letter=letter, word=word)
        if rng.random() < QUESTION_MARK:
            question += "?"
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer_parts(word, letter)}]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return final_answer_matches(conversation, completion)


def answer_parts(word: str, letter: str) -> list[dict]:
    count = word.count(letter)
    lines, running = [], 0
    for position, char in enumerate(word, 1):
        if char == letter:
            running += 1
            lines.append(f"{position}:{char} hit, count={running}")
        else:
            lines.append(f"{position}:{char}")
    by_hand = (f"We need to count the letter '{letter}' in the word '{word}'. First I spell the word out:\n"
               f"{spelled(word)}\n\n"
               f"Then I go through it letter by letter, counting every '{letter}':\n"
               + "\n".join(lines) + f"\n\nThat makes {running}.\n\nLet me double check with Python:\n\n")
    return [{"type": "text", "text": by_hand},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython also gives {count}.\n\nMy final answer is:\n\n#### {count}"}]


class SimpleSpelling(WordTask):
    def __init__(self, size: int = 1000, split: str = "train", **slice_args):
        super().__init__(size, split, **slice_args)
        # SpellingBee draws example i from the same seed: another word order gives it other words
        random.Random(42).shuffle(self.words)

    def get_example(self, index: int) -> dict:
        word = _rng(self.split, index).choice(self.words)
        messages = [{"role": "user", "content": f"Spell the word: {word}"},
                    {"role": "assistant", "content": spelled(word)}]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
