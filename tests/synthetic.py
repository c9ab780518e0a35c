"""Data the tests build for themselves, so a clone without ../shared runs every test:
- a pretraining corpus in the hosted shards' format (parquet, a string column `text`, row groups),
  of English-like text from a seeded word-level Markov chain: learnable, with documents from a
  few words to several thousand characters;
- a CORE eval bundle in the real bundle's format (core.yaml, eval_data/*.jsonl, eval_meta_data.csv)
  with every one of the 22 tasks and their real types, few-shot counts, delimiters and baselines,
  including prompts far longer than a tiny model's context.
"""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three river house water city garden winter summer market school teacher child "
    "mother father letter table window morning evening road bridge mountain forest ship village doctor music color "
    "light stone bread horse bird paper book story island field train music king queen castle"
).split()
RARE = ["café", "naïve", "Zürich", "señor", "Ωμέγα", "東京", "résumé", "œuvre", "über", "déjà"]


class TextGenerator:
    """Sentences from a word-level Markov chain with Zipf-like word frequencies, so a small model
    has both unigram and bigram structure to learn."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) for i in range(len(WORDS))]
        self.next = {w: self.rng.sample(WORDS, 6) for w in WORDS}

    def word(self, previous=None) -> str:
        if previous in self.next and self.rng.random() < 0.7:
            return self.rng.choice(self.next[previous])
        return self.rng.choices(WORDS, self.weights)[0]

    def sentence(self) -> str:
        words, previous = [], None
        for _ in range(self.rng.randint(4, 18)):
            r = self.rng.random()
            if r < 0.03:
                words.append(str(self.rng.randint(0, 2026)))
            elif r < 0.04:
                words.append(self.rng.choice(RARE))
            else:
                previous = self.word(previous)
                words.append(previous)
            if self.rng.random() < 0.06:
                words[-1] += ","
        words[0] = words[0].capitalize()
        return " ".join(words) + self.rng.choice([".", ".", ".", "?", "!"])

    def document(self, chars: int) -> str:
        paragraphs, size = [], 0
        while size < chars:
            paragraph = " ".join(self.sentence() for _ in range(self.rng.randint(1, 6)))
            paragraphs.append(paragraph)
            size += len(paragraph) + 2
        return "\n\n".join(paragraphs)

    def documents(self, n: int) -> list[str]:
        """Lengths spread like web text: mostly ~2,000 characters, some tiny, some ~6,000."""
        docs = []
        for _ in range(n):
            r = self.rng.random()
            chars = self.rng.randint(10, 200) if r < 0.1 else min(6000, int(self.rng.lognormvariate(7.6, 0.5)))
            docs.append(self.document(chars))
        return docs


def write_shard(path: Path, texts: list[str], row_group_size: int):
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """Two shards like ../shared/data/pretrain: shard_00000 (1,179 documents in row groups of 1,000
    and 179) for training and shard_00001 (131 documents, one row group), the validation split."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = TextGenerator(seed)
    write_shard(folder / "shard_00000.parquet", gen.documents(1179), 1000)
    write_shard(folder / "shard_00001.parquet", gen.documents(131), 1000)
    return folder


# ---------------------------------------------------------------------------
# The CORE bundle

# label, type, few-shot k, random baseline %, delimiter (None: the default " "), file
CORE_TASKS = [
    ("hellaswag_zeroshot", "multiple_choice", 0, 25, None, "language_understanding/hellaswag.jsonl"),
    ("jeopardy", "language_modeling", 10, 0, "\nAnswer: ", "world_knowledge/jeopardy_all.jsonl"),
    ("bigbench_qa_wikidata", "language_modeling", 10, 0, None, "world_knowledge/bigbench_qa_wikidata.jsonl"),
    ("arc_easy", "multiple_choice", 10, 25, "\nAnswer: ", "world_knowledge/arc_easy.jsonl"),
    ("arc_challenge", "multiple_choice", 10, 25, "\nAnswer: ", "world_knowledge/arc_challenge.jsonl"),
    ("copa", "multiple_choice", 0, 50, None, "commonsense_reasoning/copa.jsonl"),
    ("commonsense_qa", "multiple_choice", 10, 20, None, "commonsense_reasoning/commonsense_qa.jsonl"),
    ("piqa", "multiple_choice", 10, 50, "\nAnswer: ", "commonsense_reasoning/piqa.jsonl"),
    ("openbook_qa", "multiple_choice", 0, 25, None, "commonsense_reasoning/openbook_qa.jsonl"),
    ("lambada_openai", "language_modeling", 0, 0, None, "language_understanding/lambada_openai.jsonl"),
    ("hellaswag", "multiple_choice", 10, 25, None, "language_understanding/hellaswag.jsonl"),
    ("winograd", "schema", 0, 50, None, "language_understanding/winograd_wsc.jsonl"),
    ("winogrande", "schema", 0, 50, None, "language_understanding/winogrande.jsonl"),
    ("bigbench_dyck_languages", "language_modeling", 10, 0, None,
     "symbolic_problem_solving/bigbench_dyck_languages.jsonl"),
    ("agi_eval_lsat_ar", "multiple_choice", 3, 20, None, "symbolic_problem_solving/agi_eval_lsat_ar.jsonl"),
    ("bigbench_cs_algorithms", "language_modeling", 10, 0, None,
     "symbolic_problem_solving/bigbench_cs_algorithms.jsonl"),
    ("bigbench_operators", "language_modeling", 10, 0, None, "symbolic_problem_solving/bigbench_operators.jsonl"),
    ("bigbench_repeat_copy_logic", "language_modeling", 10, 0, None,
     "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl"),
    ("squad", "language_modeling", 10, 0, None, "reading_comprehension/squad.jsonl"),
    ("coqa", "language_modeling", 0, 0, None, "reading_comprehension/coqa.jsonl"),
    ("boolq", "multiple_choice", 10, 62, "\nAnswer: ", "reading_comprehension/boolq.jsonl"),
    ("bigbench_language_identification", "multiple_choice", 10, 9.1, None,
     "language_understanding/bigbench_language_identification.jsonl"),
]
# the tasks whose real prompts run to thousands of tokens: here a few hundred words
LONG = {"hellaswag", "agi_eval_lsat_ar", "coqa", "boolq", "bigbench_language_identification"}


def core_items(gen: TextGenerator, label: str, task_type: str, n: int) -> list[dict]:
    rng, items = gen.rng, []
    for _ in range(n):
        context = gen.document(1500 if label in LONG else 60)
        if task_type == "multiple_choice":
            k = 2 if label in ("copa", "piqa", "boolq") else 4
            choices = ["no", "yes"] if label == "boolq" else [gen.sentence() for _ in range(k)]
            items.append({"query": context, "choices": choices, "gold": rng.randrange(len(choices))})
        elif task_type == "schema":
            items.append({"context_options": [gen.sentence(), gen.sentence()], "continuation": gen.sentence(),
                          "gold": rng.randrange(2)})
        else:
            item = {"context": context, "continuation": gen.word().lower()}
            if label == "jeopardy":
                item["category"] = rng.choice(["science", "history", "literature"])
            items.append(item)
    return items


def write_core_bundle(folder: Path, examples_per_task: int = 12, seed: int = 1) -> Path:
    """Every task gets examples_per_task items (10-shot prompts need 11)."""
    gen = TextGenerator(seed)
    lines, meta = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,"
                                   "Centered Metric?,Description"]
    for label, task_type, k, baseline, delim, uri in CORE_TASKS:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{k}]",
                  f"  icl_task_type: {task_type}"]
        if delim is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
        meta.append(f"{label},test,{task_type.replace('_', ' ')},{k},{examples_per_task},{baseline},,generated")
        path = folder / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in core_items(gen, label, task_type,
                                                                                examples_per_task)))
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    (folder / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return folder
