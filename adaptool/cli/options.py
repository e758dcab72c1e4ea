"""Options every writing command shares, declared once (``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Output = Annotated[str, typer.Option("-o", "--output", help="Output folder (written atomically).")]
OptionalOutput = Annotated[Optional[str], typer.Option("-o", "--output", help="Output folder (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output folder, once the new one is complete.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout instead of the summary "
                                                     "lines (progress, if any, goes to stderr).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success: no progress, no summary, no "
                                                             "warnings (with --json, only the JSON); errors still print "
                                                             "their one line.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Output dtype: float32, float16, bfloat16.")]
Device = Annotated[str, typer.Option("--device", help="Where the math runs: auto, cpu, cuda, cuda:N.")]
SmallMathDevice = Annotated[str, typer.Option("--device", help="Where the math runs: auto (here the CPU: r×r matrices "
                                                               "gain nothing from a GPU's transfers), cpu, cuda, "
                                                               "cuda:N.")]
OptionalDevice = Annotated[Optional[str], typer.Option("--device", help="Where the math runs: auto, cpu, cuda, cuda:N.")]
Base = Annotated[Optional[str], typer.Option("--base", help="Base model (folder or hub id org/name[@rev]).")]
Rank = Annotated[Optional[int], typer.Option("--rank", help="Keep min(R, rank of ΔW) singular values per module.")]
SvFro = Annotated[Optional[float], typer.Option("--sv-fro", help="Smallest rank keeping this share of ‖ΔW‖_F (0-1].")]
SvCumulative = Annotated[Optional[float], typer.Option("--sv-cumulative",
                                                       help="Smallest rank whose singular values sum to this share (0-1].")]
SvRatio = Annotated[Optional[float], typer.Option("--sv-ratio", help="Keep singular values >= σ₁ / X.")]
MaxRank = Annotated[Optional[int], typer.Option("--max-rank", help="Cap on every module's rank.")]
AlignRank = Annotated[Optional[int], typer.Option(
    "--rank", help="The common rank R (default: the largest input rank); inputs above it are cut to their best rank R.")]
Keep = Annotated[Optional[list[str]], typer.Option(
    "--keep", help="Keep only modules whose base name matches this regex (re.search; repeat for a union).")]
Drop = Annotated[Optional[list[str]], typer.Option(
    "--drop", help="Drop modules (and saved modules) whose base name matches this regex (repeatable).")]
Scale = Annotated[Optional[list[str]], typer.Option(
    "--scale", help="[REGEX=]X: multiply ΔW of matching modules by X (first match wins; split at the last '=').")]
PushToHub = Annotated[Optional[str], typer.Option(
    "--push-to-hub", metavar="ORG/NAME",
    help="Once the output is written and verified, commit it to this hub repo (created if missing; token from "
         "HF_TOKEN or hf auth login).")]
Private = Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")]
Revision = Annotated[Optional[str], typer.Option(
    "--revision", metavar="BRANCH", help="With --push-to-hub: commit to this branch (created if missing).")]
