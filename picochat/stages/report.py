"""`picochat report`: one markdown report of the run under $PICOCHAT_HOME (picochat/report.py says
what it gathers), written with its PNG plots to $PICOCHAT_HOME/report/, and a copy of the markdown
in --copy-to (the working directory by default) whose plot links point into that folder, so no
image files land among the user's own."""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from picochat.cli import HelpFormatter
from picochat.common import PicochatError, get_base_dir
from picochat.report import GPU_HOUR_USD, build_report, find_run, leaderboard


@dataclass
class ReportConfig:
    base_tag: str | None = None  # None: the latest tag of each stage
    sft_tag: str | None = None
    rl_tag: str | None = None
    copy_to: str = "."  # "" = no copy
    gpu_hour_usd: float = GPU_HOUR_USD


def run(c: ReportConfig) -> Path:
    given = os.environ.get("PICOCHAT_HOME")
    if given and not Path(given).is_dir():  # a mistyped path: not a report of nothing
        raise PicochatError(f"PICOCHAT_HOME={given} does not exist: no run to report on")
    home = get_base_dir()
    out_dir = home / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # plots of a stage that has since gone must not linger
        old.unlink()
    if c.gpu_hour_usd < 0:
        raise PicochatError(f"--gpu-hour-usd must be >= 0, got {c.gpu_hour_usd}")
    text = build_report(home, out_dir, {"base": c.base_tag, "sft": c.sft_tag, "rl": c.rl_tag}, None, c.gpu_hour_usd)
    path = out_dir / "report.md"
    path.write_text(text)
    print(f"report written to {path}")
    if c.copy_to:
        dest = Path(c.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != out_dir.resolve():
            for plot in out_dir.glob("*.png"):
                text = text.replace(f"]({plot.name})", f"]({plot.resolve()})")
            (dest / "report.md").write_text(text)
            print(f"copied to {dest / 'report.md'}")
    print(leaderboard(home, find_run("base", c.base_tag)))
    return path


def main(argv=None):
    d = ReportConfig()
    p = argparse.ArgumentParser(prog="picochat report", formatter_class=HelpFormatter,
                                description="Write the run report: environment, tokenizer, model, training time "
                                "and cost, val bpb, CORE, ChatCORE per stage, samples, and plots of the metrics.")
    p.add_argument("--base-tag", default=d.base_tag, help="base-train tag to report (if not given: the latest)")
    p.add_argument("--sft-tag", default=d.sft_tag, help="chat-sft tag (if not given: the latest)")
    p.add_argument("--rl-tag", default=d.rl_tag, help="chat-rl tag (if not given: the latest)")
    p.add_argument("--copy-to", default=d.copy_to, help="folder for a copy of the report, its plot links pointing into "
                   "$PICOCHAT_HOME/report ('' = none)")
    p.add_argument("--gpu-hour-usd", type=float, default=d.gpu_hour_usd,
                   help="price of one GPU-hour for the cost estimate (the default is the reference's H100 figure)")
    run(ReportConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
