"""The commands: parse arguments, call the Python API, render the summary. No math here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from adaptool.version import __version__
from adaptool.cli.options import (AsJson, Base, Device, Dtype, Force, MaxRank, OptionalDevice, OptionalOutput, Output,
                                  Quiet, Rank, SmallMathDevice, SvCumulative, SvFro, SvRatio)
from adaptool.cli.options import Private, PushToHub, Revision
from adaptool.cli.render import report, report_inspect, run_with_progress
from adaptool.cli.help_format import HELP_SETTINGS, PlainHelpGroup

app = typer.Typer(
    name="adaptool",
    help="Merge LoRA-family adapters and fold them into base checkpoints: streaming, exact, PEFT-compatible.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help strings print literally ([@rev] stays), flags show no <bool>: see help_format.py
    cls=PlainHelpGroup,
    context_settings=HELP_SETTINGS,
)


def _version(value: bool):
    if value:
        typer.echo(f"adaptool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback above an error (also after the command: "
                                                      "adaptool merge r.yaml --debug)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """``--debug`` is read by :func:`adaptool.cli.main.main` before the command runs."""


@app.command(
    epilog="Examples:\n\n"
    "  adaptool unload ./Llama-3.2-1B+./my-lora -o merged/\n\n"
    "  adaptool unload meta-llama/Llama-3.2-1B+me/lora-a+me/lora-b -o merged/ --dtype bfloat16\n\n"
    "  adaptool unload ./my-lora -o merged/      # base from the adapter's base_model_name_or_path"
)
def unload(
    sources: str = typer.Argument(..., metavar="BASE+ADAPTER[+ADAPTER…]",
                                  help="Base model and adapters (folders or hub ids org/name[@rev]) joined by '+'."),
    output: Output = ...,
    dtype: Dtype = None,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """Fold adapters into a base checkpoint and write a plain model (streamed, one tensor at a time)."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.unload import split_sources
    from adaptool.commands.unload import unload as run_unload

    def work(on_start, on_progress):
        base, adapters = split_sources(sources)
        return run_unload(base, adapters, output, dtype=dtype, device=device, force=force,
                          on_start=on_start, on_progress=on_progress)

    _report(_published(run_with_progress(work, "Writing", quiet), push_to_hub, private, revision), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool merge recipes/ties.yaml\n\n"
    "  adaptool merge recipe.yaml -o out/merged --device cuda --json\n\n"
    "  adaptool merge recipe.yaml --dry-run"
)
def merge(
    recipe: Path = typer.Argument(..., help="YAML recipe (see docs/recipes.md)."),
    output: OptionalOutput = None,
    device: OptionalDevice = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything a real run checks, print the plan, write nothing."),
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """Combine adapters with a strategy from a YAML recipe, into one adapter or into the base."""
    _check_push(push_to_hub, private, revision, dry_run)
    from adaptool.commands.merge import merge as run_merge
    from adaptool.recipe import load_recipe

    parsed = load_recipe(recipe, output)  # -o is applied here, once; --device by merge, once

    def work(on_start, on_progress):
        return run_merge(parsed, device=device, dry_run=dry_run, force=force,
                         on_start=on_start, on_progress=on_progress)

    _report(_published(run_with_progress(work, "Merging", quiet), push_to_hub, private, revision), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool inspect ./my-lora\n\n"
    "  adaptool inspect ./my_lora.safetensors --base ./Llama-3.2-1B --json\n\n"
    "  adaptool inspect ./Llama-3.2-1B"
)
def inspect(
    path: str = typer.Argument(..., help="An adapter (PEFT folder, kohya/LyCORIS file) or a model folder; or a hub id."),
    base: Base = None,
    as_json: AsJson = False,
):
    """Look inside an adapter (type, per-module rank, alpha, scale, shape, ‖ΔW‖, spectrum) or a model."""
    from adaptool.commands.inspect import inspect as run_inspect

    report_inspect(run_inspect(path, base=base), as_json)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool resize ./my-lora -o lora-r8/ --rank 8\n\n"
    "  adaptool resize ./my-lora -o lora-90/ --sv-fro 0.9 --max-rank 32 --dtype bfloat16"
)
def resize(
    adapter: str = typer.Argument(..., help="The adapter to resize (PEFT folder, kohya/LyCORIS file, hub id)."),
    output: Output = ...,
    rank: Rank = None,
    sv_fro: SvFro = None,
    sv_cumulative: SvCumulative = None,
    sv_ratio: SvRatio = None,
    max_rank: MaxRank = None,
    base: Base = None,
    dtype: Dtype = None,
    device: SmallMathDevice = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """A PEFT LoRA whose ΔW per module is the best approximation of the input's at a rank chosen by the rule."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.resize import resize as run_resize
    from adaptool.strategies.rank_rules import RankRule

    rule = RankRule.from_options(rank, sv_fro, sv_cumulative, sv_ratio, max_rank)

    def work(on_start, on_progress):
        return run_resize(adapter, output, rule, base=base, dtype=dtype, device=device, force=force,
                          on_start=on_start, on_progress=on_progress)

    _report(_published(run_with_progress(work, "Resizing", quiet), push_to_hub, private, revision), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool extract ./Llama-3.2-1B ./my-finetune -o lora/ --rank 16\n\n"
    "  adaptool extract meta-llama/Llama-3.2-1B me/finetune -o lora/ --sv-fro 0.95 --max-rank 64 --modules 'mlp'"
)
def extract(
    base: str = typer.Argument(..., help="The base model (folder or hub id)."),
    tuned: str = typer.Argument(..., help="The fine-tuned model (folder or hub id)."),
    output: Output = ...,
    rank: Rank = None,
    sv_fro: SvFro = None,
    sv_cumulative: SvCumulative = None,
    sv_ratio: SvRatio = None,
    max_rank: MaxRank = None,
    modules: str = typer.Option(None, "--modules", help="Only modules whose name matches this regex (re.search)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip (and list) tensors found on one side only."),
    dtype: Dtype = None,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """A PEFT LoRA carrying a full fine-tune: ΔW = W_tuned − W_base per Linear weight, truncated by the rule."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.extract import extract as run_extract
    from adaptool.strategies.rank_rules import RankRule

    rule = RankRule.from_options(rank, sv_fro, sv_cumulative, sv_ratio, max_rank)

    def work(on_start, on_progress):
        return run_extract(base, tuned, output, rule, modules=modules, skip_missing=skip_missing, dtype=dtype,
                           device=device, force=force, on_start=on_start, on_progress=on_progress)

    _report(_published(run_with_progress(work, "Extracting", quiet), push_to_hub, private, revision), as_json, quiet)


# ---------------------------------------------------------------------------------------------------- align
from adaptool.cli.options import AlignRank  # noqa: E402


@app.command(
    epilog="Examples:\n\n"
    "  adaptool align ./lora-style-a ./lora-style-b ./lora-style-c -o aligned/\n\n"
    "  adaptool align runs/*/final -o aligned/ --rank 32 --json\n\n"
    "then: model.load_adapter('aligned/lora-style-a', adapter_name='default'); "
    "model.load_adapter('aligned/lora-style-b', adapter_name='default', hotswap=True)"
)
def align(
    adapters: list[str] = typer.Argument(..., metavar="ADAPTER ADAPTER…",
                                         help="Two or more PEFT LoRA folders (or hub ids) of one base model."),
    output: Output = ...,
    rank: AlignRank = None,
    dtype: Dtype = None,
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """Rewrite LoRAs to one rank, one config and one set of modules, so that hotswap swaps them plainly."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.align import align as run_align

    def work(on_start, on_progress):
        return run_align(adapters, output, rank=rank, dtype=dtype, force=force, on_start=on_start,
                         on_progress=on_progress)

    _report(_published(run_with_progress(work, "Aligning", quiet), push_to_hub, private, revision), as_json, quiet)


# ----------------------------------------------------------------------------------------------------- edit
from adaptool.cli.options import Drop, Keep, Scale  # noqa: E402


@app.command(
    epilog="Examples:\n\n"
    "  adaptool edit ./my-lora -o lora-attn/ --keep 'self_attn'\n\n"
    "  adaptool edit ./my-lora -o lora-blocks/ --scale 'layers\\.0\\.=0.5' --scale 'layers\\.1\\.=0.8'\n\n"
    "  adaptool edit ./my-lora -o negated/ --scale=-1 --drop 'lm_head'"
)
def edit(
    adapter: str = typer.Argument(..., help="The adapter to edit (PEFT folder or hub id)."),
    output: Output = ...,
    keep: Keep = None,
    drop: Drop = None,
    scale: Scale = None,
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """Keep or drop modules and scale their ΔW; the factors are copied bit for bit, scales go in the config."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.edit import edit as run_edit

    def work(on_start, on_progress):
        return run_edit(adapter, output, keep=keep or [], drop=drop or [], scale=scale or [], force=force,
                        on_start=on_start, on_progress=on_progress)

    _report(_published(run_with_progress(work, "Editing", quiet), push_to_hub, private, revision), as_json, quiet)


# -------------------------------------------------------------------------------------------------- convert
from typing import Optional  # noqa: E402


@app.command(
    epilog="Examples:\n\n"
    "  adaptool convert ./my-lora -o my_lora.safetensors --to kohya\n\n"
    "  adaptool convert ./my_lora.safetensors -o my-lora/ --to peft --base ./Llama-3.2-1B\n\n"
    "  adaptool convert ./pissa-trained -o plain-lora/ --to peft --initial ./pissa-init"
)
def convert(
    source: str = typer.Argument(..., metavar="INPUT",
                                 help="A PEFT adapter folder, a kohya/LyCORIS .safetensors file, or a hub id."),
    output: str = typer.Option(..., "-o", "--output",
                               help="Output: a folder for --to peft, a .safetensors file for --to kohya (written atomically)."),
    to: str = typer.Option(..., "--to", help="Output format: peft or kohya."),
    base: Base = None,
    initial: Optional[str] = typer.Option(None, "--initial", metavar="INITIAL_ADAPTER",
                                          help="The adapter as saved at initialisation (PiSSA, OLoRA …): write the "
                                               "plain LoRA for the original base."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="kohya name prefix (lora_, lora_unet_, lycoris_ …); "
                                                                "default: the recorded one, else lora_."),
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    push_to_hub: PushToHub = None,
    private: Private = False,
    revision: Revision = None,
):
    """Convert between PEFT and kohya/LyCORIS (factors bit for bit), or a PiSSA/OLoRA adapter into a plain LoRA."""
    _check_push(push_to_hub, private, revision)
    from adaptool.commands.convert import convert as run_convert

    def work(on_start, on_progress):
        return run_convert(source, output, to, base=base, initial=initial, prefix=prefix, force=force,
                           on_start=on_start, on_progress=on_progress)

    summary = _published(run_with_progress(work, "Converting", quiet), push_to_hub, private, revision)
    if as_json or quiet:
        report(summary, as_json, quiet)
        return
    ranks = summary["ranks"]
    typer.echo(f"wrote {summary['output']} ({summary['peft_type']} → {summary['to']}): "
               f"{summary['modules']} modules, rank {ranks[0] if ranks[0] == ranks[1] else f'{ranks[0]}–{ranks[1]}'}, "
               f"{summary['tensors_written']} tensors in {summary['seconds']:.2f} s")
    for note in summary["notes"]:
        typer.echo(f"note: {note}")
    _report_push(summary)


# ------------------------------------------------------------------------------------------- verify, push
def _check_push(push_to_hub, private: bool, revision, dry_run: bool = False) -> None:
    """``--push-to-hub`` and its companions, checked before any work (no network, no hub client)."""
    from adaptool.commands.push import check_push_options
    from adaptool.errors import AdaptoolError

    if dry_run and push_to_hub:
        raise AdaptoolError("--push-to-hub with --dry-run: a dry run writes nothing to push", "leave one of them out")
    check_push_options(push_to_hub, private, revision)


def _published(summary: dict, push_to_hub, private: bool, revision) -> dict:
    """The summary, with ``push`` added once the output is verified and committed to ``push_to_hub`` (if given)."""
    if not push_to_hub or summary.get("dry_run"):
        return summary
    from adaptool.commands.push import push as run_push
    from adaptool.errors import AdaptoolError

    try:
        summary["push"] = run_push(summary["output"], push_to_hub, private=private, revision=revision)
    except AdaptoolError as e:
        raise AdaptoolError(f"{summary['output']} is written, but {e.message}",
                            f"{e.hint + '; then ' if e.hint else ''}push it with adaptool push {summary['output']} "
                            f"{push_to_hub}") from None
    return summary


def _report_push(summary: dict) -> None:
    pushed = summary.get("push")
    if pushed:
        typer.echo(f"pushed {pushed['files']} files to {pushed['repo_id']} ({pushed['revision']}): {pushed['url']}")


def _report(summary: dict, as_json: bool, quiet: bool) -> None:
    report(summary, as_json, quiet)
    if not as_json and not quiet:
        _report_push(summary)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool verify out/merged\n\n"
    "  adaptool verify out/lora.safetensors --json\n\n"
    "Exit 0: intact. Exit 2: one line naming the first problem (manifest missing or not adaptool's; then, in path "
    "order, a missing, extra, symlinked or resized file; then the first file whose sha256 differs)."
)
def verify(
    path: str = typer.Argument(..., metavar="OUT", help="An output folder (it holds adaptool-manifest.json) or a "
                                                       "single .safetensors file adaptool wrote."),
    as_json: AsJson = False,
):
    """Check that an output is byte for byte what adaptool wrote (its manifest, or a file's own digests)."""
    from adaptool.commands.verify import verify as run_verify
    from adaptool.output.manifest import VerifyError

    try:
        summary = run_verify(path)
    except VerifyError as e:
        if as_json:
            typer.echo(json.dumps({"output": path, "command": "verify", "intact": False, "problem": e.problem}))
        raise
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    made = summary["made_by"]
    by = f" (adaptool {made['command']}, recipe {made['recipe_sha256'][:16]})" if made.get("recipe_sha256") else ""
    typer.echo(f"{path}: intact, {summary['files']} file{'s' if summary['files'] != 1 else ''}, "
               f"{summary['bytes'] / (1 << 20):,.1f} MiB{by}")


@app.command(
    epilog="Examples:\n\n"
    "  adaptool push out/merged my-org/llama-merged\n\n"
    "  adaptool push out/lora my-org/lora --private --revision experiments\n\n"
    "The output is verified first (a folder that fails is refused); the token comes from HF_TOKEN or hf auth login."
)
def push(
    output: str = typer.Argument(..., metavar="OUT", help="An output folder or file adaptool wrote."),
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="The hub repo (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its "
                                                          "visibility)."),
    revision: str = typer.Option(None, "--revision", metavar="BRANCH",
                                 help="Commit to this branch (created from the default branch if missing)."),
    as_json: AsJson = False,
    quiet: Quiet = False,
):
    """Verify an output and commit it to a Hugging Face Hub repo (one commit naming the command and recipe hash)."""
    from adaptool.commands.push import push as run_push

    summary = run_push(output, repo_id, private=private, revision=revision)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif not quiet:
        typer.echo(f"pushed {summary['files']} files of {output} to {summary['repo_id']} ({summary['revision']}): "
                   f"{summary['message']}; {summary['url']}")
