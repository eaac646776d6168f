"""Command line: ``onnxslim IN OUT [options]`` plus ``inspect``, ``validate``, ``passes``, ``sensitivity``.

Thin over onnxslim.api. Every failure is one line on stderr: exit 2 for bad input,
exit 1 for a failed gate or pass; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable

import click

from onnxslim.errors import GateError, InputError, SlimError


def _parse_shape(values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        if not sep or not name:
            raise InputError(f"--input-shape '{v}': expected NAME:D1,D2,... (e.g. input:1,3,224,224)")
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise InputError(f"--input-shape '{v}': dimensions must be integers") from None
        if any(d <= 0 for d in shape):
            raise InputError(f"--input-shape '{v}': dimensions must be positive")
        shapes[name] = shape
    return shapes


def _options(opts: list[Callable]) -> Callable:
    def deco(f: Callable) -> Callable:
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


# Options of the lossy features, grouped so each feature's options read in one place.
# Their values reach the passes as ctx.options[<python name>].
CALIB_OPTIONS = [
    click.option("--calib", type=str, help="Calibration data: FILE.npz (keys = input names, optional 'labels'), "
                 "a folder of .npy/.npz or images, or 'random'."),
    click.option("--calib-size", type=click.IntRange(min=1), help="Use at most N calibration samples."),
    click.option("--calib-batch", type=click.IntRange(min=1), help="Calibration batch size."),
    click.option("--mean", "calib_mean", type=str, help="Image calibration: per-channel mean, e.g. 0.485,0.456,0.406."),
    click.option("--std", "calib_std", type=str, help="Image calibration: per-channel std."),
    click.option("--layout", "calib_layout", type=click.Choice(["nchw", "nhwc"]), help="Image calibration layout."),
    click.option("--color", "calib_color", type=click.Choice(["rgb", "bgr"]), help="Image calibration channel order."),
    click.option("--random-range", "calib_random_range", type=str, help="'random' calibration: LOW,HIGH (default 0,1)."),
]
GATE_OPTIONS = [
    click.option("--min-cosine", type=float, help="Lossy gate without labels: minimum mean cosine (default 0.99)."),
    click.option("--max-acc-drop", type=float, help="Lossy gate with labels: maximum accuracy drop in points (default 1.0)."),
    click.option("--min-top1", type=float, help="Lossy gate: minimum top-1 agreement with the original (0-1)."),
    click.option("--min-speedup", type=float, help="Quantization gate: minimum speedup over the float model (geometric mean of batch 1 and 64; default 1.0)."),
    click.option("--objective", type=click.Choice(["speed", "size"]), help="'size' turns the speed gate off."),
    click.option("--latency/--no-latency", default=None, help="Measure latency before/after (default: on for lossy pipelines)."),
]
PRUNE_OPTIONS = [
    click.option("--prune-ratio", type=click.FloatRange(0.0, 0.95), help="Fraction of channels removed per group."),
    click.option("--prune-importance", type=click.Choice(["l1", "l2", "recon"]),
                 help="Channel ranking: weight norm l1/l2, or recon (what the refit can rebuild; default with --calib)."),
    click.option("--round-to", type=click.IntRange(min=1),
                 help="Keep channel counts multiples of N (default: onnxruntime's conv block, 16 with AVX-512, else 8)."),
    click.option("--prune-min-channels", type=click.IntRange(min=1), help="Minimum channels kept per layer."),
    click.option("--prune-target", type=str, help="Global target instead of a ratio: params=0.5 or macs=0.5."),
    click.option("--prune-refit/--no-prune-refit", default=None, help="Least-squares refit of consumers on --calib (default on with --calib)."),
]
QUANT_OPTIONS = [
    click.option("--quant-format", type=click.Choice(["qdq", "qoperator"]), help="Static quantization format (default qdq)."),
    click.option("--quant-method", type=click.Choice(["minmax", "entropy", "percentile"]), help="Calibration method (default minmax)."),
    click.option("--per-channel/--no-per-channel", default=None, help="Per-channel weight quantization."),
    click.option("--activation-type", type=click.Choice(["uint8", "int8"]), help="Activation type."),
    click.option("--weight-type", type=click.Choice(["int8", "uint8"]), help="Weight type."),
    click.option("--symmetric/--asymmetric", "quant_symmetric", default=None, help="Symmetric activations."),
    click.option("--quant-op-types", type=str, help="Comma-separated op types to quantize."),
    click.option("--quant-exclude", type=str, help="Comma-separated node names kept in float."),
    click.option("--fp16-keep-io/--no-fp16-keep-io", default=None, help="fp16: keep float32 inputs/outputs (default on)."),
    click.option("--fp16-block-ops", type=str, help="fp16: comma-separated op types kept in float32."),
]


# Until the CLI options are generated from the passes' option dataclasses (passes/distill.py DistillOptions).
DISTILL_OPTIONS = [
    click.option("--distill-steps", type=click.IntRange(min=1), help="distill: training steps (default 300)."),
    click.option("--distill-time", type=click.FloatRange(min=0.0), help="distill: time limit in seconds (0 = none)."),
    click.option("--distill-lr", type=click.FloatRange(min=0.0), help="distill: Adam learning rate (default 3e-3)."),
    click.option("--distill-batch", type=click.IntRange(min=1), help="distill: batch size (default 32)."),
    click.option("--distill-seed", type=click.IntRange(min=0), help="distill: seed (default 0)."),
    click.option("--distill-temperature", type=click.FloatRange(min=0.0), help="distill: KD temperature (default 2)."),
    click.option("--distill-holdout", type=click.FloatRange(0.0, 0.9), help="distill: held-out fraction (default 0.2)."),
    click.option("--distill-loss", type=click.Choice(["auto", "kl", "mse"]), help="distill: output loss (default auto)."),
    click.option("--distill-feature-weight", type=click.FloatRange(min=0.0), help="distill: feature-matching weight (default 0.5)."),
    click.option("--distill-label-weight", type=click.FloatRange(min=0.0), help="distill: label cross-entropy weight (default 0.5)."),
    click.option("--distill-augment/--no-distill-augment", default=None, help="distill: augmentation (default on)."),
    click.option("--distill-patience", type=click.IntRange(min=1), help="distill: evaluations without improvement before stopping (default 5)."),
    click.option("--distill-threads", type=click.IntRange(min=1), help="distill: torch threads (default 1)."),
]


class _DefaultGroup(click.Group):
    """``onnxslim IN OUT`` runs the ``optimize`` command; subcommands are matched first."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["optimize", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Main job: onnxslim IN.onnx OUT.onnx [options]  (see: onnxslim optimize --help)")
@click.version_option(package_name="onnxslim-tool", prog_name="onnxslim")
def cli() -> None:
    """onnxslim: optimize ONNX models (lossless cleanup, pruning, INT8) and prove the result in onnxruntime."""


@cli.command("optimize")
@click.argument("input_path", metavar="IN", type=str)
@click.argument("output_path", metavar="OUT", type=str)
@click.option("--passes", default="lossless", show_default=True,
              help="Comma-separated passes or presets (see 'onnxslim passes').")
@click.option("--input-shape", multiple=True, help="Fix an input's shape: NAME:1,3,224,224 (repeatable).")
@click.option("--inputs", type=str, help="Validation inputs: .npz with one array per input name (optional 'labels').")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Lossless validation: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Lossless validation: relative tolerance.")
@click.option("--no-validate", is_flag=True, help="Do not compare outputs with the original.")
@click.option("--check-each-pass", is_flag=True, help="Verify (checker + outputs) after every pass; name the first that breaks.")
@click.option("--force", is_flag=True, help="Write the result even if it misses its gate.")
@click.option("--json", "json_path", type=str, help="Write the report as JSON to this file.")
@click.option("--custom-op-library", type=str, help="Shared library of custom ops to register in onnxruntime.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--fold-size-limit", type=str,
              help="Constant folding: largest tensor a fold may add, e.g. 4MB (default); folds that do not grow the model always run.")
@_options(CALIB_OPTIONS + GATE_OPTIONS + PRUNE_OPTIONS + QUANT_OPTIONS + DISTILL_OPTIONS)
def optimize_cmd(input_path: str, output_path: str, passes: str, input_shape: tuple[str, ...], inputs: str | None,
                 atol: float, rtol: float, no_validate: bool, check_each_pass: bool, force: bool,
                 json_path: str | None, custom_op_library: str | None, quiet: bool, debug: bool,
                 **options: Any) -> None:
    """Optimize IN and write OUT (default passes: lossless)."""
    from onnxslim.api import optimize
    from onnxslim.report import Progress, format_report

    progress = Progress(enabled=not quiet)
    latency = options.pop("latency")
    min_cosine = options.pop("min_cosine")
    max_acc_drop = options.pop("max_acc_drop")
    report = None
    try:
        _, report = optimize(
            input_path, output_path, passes=passes, input_shapes=_parse_shape(input_shape), inputs=inputs,
            validate=not no_validate, atol=atol, rtol=rtol, min_cosine=min_cosine, max_acc_drop=max_acc_drop,
            check_each_pass=check_each_pass, force=force, latency=latency,
            options={k: v for k, v in options.items() if v is not None},
            custom_op_library=custom_op_library, progress=progress, keep_model=False,
        )
    except GateError as e:
        progress.done()
        report = e.report
        if report is not None and not quiet:
            click.echo(format_report(report))
        raise
    finally:
        progress.done()
        if json_path and report is not None:
            report.write_json(json_path)
    if not quiet:
        click.echo(format_report(report))
        click.echo(f"wrote {output_path}")


@cli.command("inspect")
@click.argument("model", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_cmd(model: str, as_json: bool, debug: bool) -> None:
    """Opsets, inputs/outputs, op histogram, parameters, size, subgraphs, custom domains, external data."""
    from onnxslim.api import inspect_model
    from onnxslim.report import human_bytes

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"model:      {info['path']}  (IR {info['ir_version']}, producer '{info['producer']}')")
    click.echo("opsets:     " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            click.echo(f"{kind[:-1]:<11} {v['name']}: {v['dtype']} {v['shape']}")
    click.echo(f"nodes:      {info['nodes']}  initializers: {info['initializers']}  parameters: {info['params']:,}")
    click.echo(f"size:       {human_bytes(info['size'])}  subgraphs: {info['subgraphs']}  functions: {info['functions']}")
    click.echo("custom:     " + (", ".join(info["custom_domains"]) or "none"))
    click.echo("ext. data:  " + (", ".join(info["external_data"]) or "none"))
    click.echo("ops:        " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))


@cli.command("validate")
@click.argument("original", type=str)
@click.argument("optimized", type=str)
@click.option("--inputs", type=str, help=".npz with one array per input name (optional 'labels').")
@click.option("--input-shape", multiple=True, help="NAME:1,3,224,224 for dynamic inputs (repeatable).")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--lossy", is_flag=True, help="Judge by cosine/accuracy instead of element-wise tolerance.")
@click.option("--min-cosine", type=float, default=0.99, show_default=True)
@click.option("--max-acc-drop", type=float, default=1.0, show_default=True)
@click.option("--json", "json_path", type=str, help="Write the result as JSON.")
@click.option("--custom-op-library", type=str)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def validate_cmd(original: str, optimized: str, inputs: str | None, input_shape: tuple[str, ...], atol: float,
                 rtol: float, lossy: bool, min_cosine: float, max_acc_drop: float, json_path: str | None,
                 custom_op_library: str | None, debug: bool) -> None:
    """Compare ORIGINAL and OPTIMIZED in onnxruntime on the same inputs (exit 1 if they differ)."""
    from onnxslim.api import validate_files
    from onnxslim.report import Report, format_report

    res = validate_files(original, optimized, inputs=inputs, input_shapes=_parse_shape(input_shape), atol=atol,
                         rtol=rtol, lossy=lossy, min_cosine=min_cosine, max_acc_drop=max_acc_drop,
                         custom_op_library=custom_op_library)
    click.echo(format_report(Report(validation=res.to_dict()), totals=False))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
    if not res.passed:
        raise GateError(f"models differ: {res.reason}")


@cli.command("sensitivity")
@click.argument("model", type=str)
@click.option("--calib", required=True, type=str, help="Calibration data (FILE.npz with optional 'labels', folder, ...).")
@click.option("--calib-size", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--calib-batch", type=click.IntRange(min=1), help="Batch size for running the model.")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", show_default=True, help="Ratios to try per group.")
@click.option("--prune-importance", type=click.Choice(["l1", "l2", "recon"]),
              help="Channel ranking: weight norm l1/l2, or recon (default with --refit).")
@click.option("--round-to", type=click.IntRange(min=1), help="Keep channel counts multiples of N (default as in optimize).")
@click.option("--prune-min-channels", type=click.IntRange(min=1), help="Minimum channels kept per layer.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Refit each group's readers before measuring (what the prune pass does).")
@click.option("--json", "json_path", type=str, help="Write the table as JSON to this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sensitivity_cmd(model: str, calib: str, ratios: str, json_path: str | None, debug: bool, **options: Any) -> None:
    """Per prunable group: channels, share of params/MACs, output drift (and accuracy) at each ratio."""
    from onnxslim.report import Progress
    from onnxslim.sensitivity import format_sensitivity, run_sensitivity, write_json

    try:
        rs = tuple(float(r) for r in ratios.split(",") if r.strip())
    except ValueError:
        rs = ()
    if not rs or not all(0.0 < r < 1.0 for r in rs):
        raise InputError(f"--ratios '{ratios}': expected comma-separated fractions between 0 and 1")
    progress = Progress()
    try:
        res = run_sensitivity(model, calib, {k: v for k, v in options.items() if v is not None}, ratios=rs,
                              progress=progress)
    finally:
        progress.done()
    click.echo(format_sensitivity(res))
    if json_path:
        write_json(res, json_path)


@cli.command("passes")
def passes_cmd() -> None:
    """List the registered passes and presets."""
    from onnxslim.manager import PRESETS, describe_passes

    rows = describe_passes()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        kind = "lossless" if r["lossless"] else "lossy   "
        click.echo(f"{r['name']:<{width}}  {kind}  {r['description']}")
    for name, items in PRESETS.items():
        click.echo(f"preset '{name}': {','.join(items)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs click without its own error handling so that every error is one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="onnxslim", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("onnxslim: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"onnxslim: error: {e.format_message()}", err=True)
        sys.exit(2)
    except SlimError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"onnxslim: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("onnxslim: interrupted; nothing written", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("onnxslim: error: out of memory", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"onnxslim: internal error: {type(e).__name__}: {msg} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
