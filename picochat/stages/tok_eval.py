"""`picochat tok-eval`: how well our tokenizer compresses text (bytes per token,
higher is better) next to GPT-2's and GPT-4's, on a few fixed samples and on the
first row group of the train and val splits of the pretraining data. The table is
also written to $PICOCHAT_HOME/tok_eval/tok_eval.md (for `picochat report`)."""

import argparse
from dataclasses import dataclass
from pathlib import Path

from picochat.common import PicochatError, get_base_dir
from picochat.dataset import DATASETS, DEFAULT_DATASET, data_dir_for, parquets_iter_batched
from picochat.tokenizer import Tokenizer, get_tokenizer

NEWS = """\
The city council voted 7 to 2 on Tuesday night to approve a new bus line connecting the northern suburbs with the \
downtown hospital district. Supporters said the route, which will run every twelve minutes during rush hour, would \
cut commutes for roughly 18,000 residents. Opponents questioned the $42.5 million price tag and asked why the plan \
had not been put to a public vote. Construction of the first stops is expected to begin in early spring, and the \
transit authority says service could start by the end of next year if the federal grant is approved."""

KOREAN = """\
오늘 아침 서울에는 올해 들어 처음으로 눈이 내렸습니다. 기상청은 오후부터 기온이 크게 떨어질 것으로 예상된다며 \
출근길 교통 안전에 각별히 유의해 달라고 당부했습니다. 시민들은 두꺼운 외투를 꺼내 입고 따뜻한 커피를 손에 든 채 \
하얗게 변한 거리를 걸었습니다."""

CODE = '''\
import heapq

def dijkstra(graph: dict[str, list[tuple[str, float]]], source: str) -> dict[str, float]:
    """Shortest distance from source to every reachable node (non-negative weights)."""
    dist = {source: 0.0}
    queue = [(0.0, source)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > dist.get(node, float("inf")):
            continue  # a stale entry: node was reached more cheaply already
        for neighbor, weight in graph.get(node, []):
            nd = d + weight
            if nd < dist.get(neighbor, float("inf")):
                dist[neighbor] = nd
                heapq.heappush(queue, (nd, neighbor))
    return dist
'''

MATH = r"""\begin{theorem}
For every integer $n \geq 1$, $\sum_{k=1}^{n} (2k - 1) = n^2$.
\end{theorem}
\begin{proof}
We argue by induction on $n$. For $n = 1$ both sides equal $1$. Suppose the identity holds for some $n \geq 1$. Then
\[
  \sum_{k=1}^{n+1} (2k - 1) = \sum_{k=1}^{n} (2k - 1) + (2n + 1) = n^2 + 2n + 1 = (n + 1)^2,
\]
which is the claim for $n + 1$. Hence it holds for all $n \geq 1$ by the principle of mathematical induction.
\end{proof}
"""

SCIENCE = """\
Photosynthesis converts light energy into chemical energy stored in sugars. In the thylakoid membranes of the \
chloroplast, chlorophyll absorbs photons and uses their energy to split water molecules, releasing oxygen as a \
by-product and producing ATP and NADPH. These energy carriers then power the Calvin cycle in the stroma, where the \
enzyme RuBisCO fixes carbon dioxide into three-carbon intermediates that are eventually assembled into glucose. \
Because RuBisCO also reacts with oxygen, some plants have evolved C4 and CAM pathways that concentrate CO2 around it."""

SAMPLES = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}
BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


@dataclass
class TokEvalConfig:
    dataset: str = DEFAULT_DATASET


def split_sample(dataset: str, split: str) -> str:
    """The texts of the first row group of the split's first file, joined."""
    batch = next(parquets_iter_batched(split, data_dir=data_dir_for(dataset)), None)
    if batch is None:
        raise PicochatError(f"the {split} split of {dataset} has no rows")
    return "\n".join(batch)


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(config: TokEvalConfig) -> str:
    """Print (and return) the comparison table."""
    tokenizers = {"ours": get_tokenizer()}
    notes = []
    for label, name in BASELINES.items():
        try:
            tokenizers[label] = Tokenizer.from_pretrained(name)
        except PicochatError as e:
            tokenizers[label] = None
            notes.append(f"{label}: {e}")

    texts = dict(SAMPLES)
    label = config.dataset if config.dataset in DATASETS else Path(config.dataset).name
    try:
        texts[f"{label}-train"] = split_sample(config.dataset, "train")
        texts[f"{label}-val"] = split_sample(config.dataset, "val")
    except PicochatError as e:
        texts = dict(SAMPLES)
        notes.append(f"train/val rows omitted: {e}")

    order = ["gpt2", "gpt4", "ours"]
    header = ["text", "bytes"] + [f"{label} {what}" for label in order for what in ("tokens", "bytes/tok")]
    header += ["ours vs gpt2", "ours vs gpt4"]
    rows = [header]
    for text_name, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        counts = {label: None if tok is None else len(tok.encode(text)) for label, tok in tokenizers.items()}
        row = [text_name, f"{n_bytes:,}"]
        for label in order:
            n = counts[label]
            row += ["unavailable", "unavailable"] if n is None else [f"{n:,}", f"{n_bytes / n:.2f}" if n else "-"]
        for label in ("gpt2", "gpt4"):
            n = counts[label]
            # positive: ours needs that many percent fewer tokens than the baseline
            if n is None:
                row.append("unavailable")
            else:
                row.append(f"{100 * (n - counts['ours']) / n:+.1f}%" if n else "-")
        rows.append(row)

    vocab = ", ".join(f"{label} {'unavailable' if tokenizers[label] is None else tokenizers[label].get_vocab_size()}"
                      for label in order)
    report = [f"bytes per token (higher compresses better); vocab sizes: {vocab}", format_table(rows)]
    report += [f"note: {note}" for note in notes]
    text = "\n".join(report)
    print(text)
    out = get_base_dir() / "tok_eval" / "tok_eval.md"  # for `picochat report`
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="picochat tok-eval",
        description="How well our tokenizer compresses text (bytes per token, "
                    "higher is better) next to GPT-2's and GPT-4's, on a few fixed samples and on "
                    "the first row group of the train and val splits of the pretraining data.")
    parser.add_argument("--dataset", default=TokEvalConfig.dataset,
                        help="fineweb-edu, climbmix, or the path of a folder of parquet files, for the train/val "
                             "rows (default: %(default)s)")
    args = parser.parse_args(argv)
    run(TokEvalConfig(dataset=args.dataset))


if __name__ == "__main__":
    from picochat import cli
    cli.run(main)
