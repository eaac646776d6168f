"""Command line: ``onnxslim IN OUT [options]`` plus ``inspect``, ``validate``, ``passes``, ``sensitivity``.

Thin over onnxslim.api. Every failure is one line on stderr: exit 2 for bad input,
exit 1 for a failed gate or pass; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from typing import Any, Callable

import click

from onnxslim.errors import GateError, InputError, SlimError


def _parse_shape(values: tuple[str, ...], flag: str = "--input-shape") -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        if not sep or not name:
            raise InputError(f"{flag} '{v}': expected NAME:D1,D2,... (e.g. input:1,3,224,224)")
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise InputError(f"{flag} '{v}': dimensions must be integers") from None
        if any(d <= 0 for d in shape):
            raise InputError(f"{flag} '{v}': dimensions must be positive")
        shapes[name] = shape
    return shapes


def _parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--val-range '{text}': expected LOW,HIGH (e.g. 0,1)") from None
    if not lo < hi:
        raise InputError(f"--val-range '{text}': LOW must be below HIGH")
    return lo, hi


def _log_passes(report: Any) -> None:
    """--verbose: each pass run, what it changed and what it decided, in order (stderr)."""
    for p in report.passes:
        b, a = p["before"].get("nodes", 0), p["after"].get("nodes", 0)
        stats = ", ".join(f"{k} {v}" for k, v in p["stats"].items() if v)
        click.echo(f"onnxslim: pass {p['name']} round {p['round']}: {'changed' if p['changed'] else 'no change'}, "
                   f"nodes {b} -> {a}, {p['seconds']:.3f} s" + (f"; {stats}" if stats else ""), err=True)
        for n in p["notes"]:
            click.echo(f"onnxslim:   {n}", err=True)


_FORWARDED: list[str] = []  # the command line minus IN/OUT/--json/--jobs, for folder mode's children


def _forwarded_args(args: list[str]) -> list[str]:
    """``args`` without the subcommand, the two positional paths, and --json/--jobs with their values."""
    if args and args[0] == "optimize":
        args = args[1:]
    out, positional, i = [], 0, 0
    while i < len(args):
        a = args[i]
        if a in ("--json", "--jobs", "-j"):
            i += 2
            continue
        if a.startswith(("--json=", "--jobs=")):
            i += 1
            continue
        if a in _VALUE_FLAGS and i + 1 < len(args):
            out += [a, args[i + 1]]
            i += 2
            continue
        if not a.startswith("-") and positional < 2:
            positional += 1
        else:
            out.append(a)
        i += 1
    return out


_VALUE_FLAGS: set[str] = set()  # flags that take a value (filled from the optimize command)


def _load_plugins(args: list[str]) -> list[str]:
    """Import ``--plugin FILE.py`` modules (their @register passes join the registry, their options the
    CLI) and the 'onnxslim.passes' entry points; returns ``args`` without the --plugin pairs."""
    import importlib.util
    from importlib.metadata import entry_points
    from pathlib import Path

    from onnxslim.manager import load_passes

    load_passes()
    rest, i = [], 0
    files = []
    while i < len(args):
        if args[i] == "--plugin" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
        elif args[i].startswith("--plugin="):
            files.append(args[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(args[i])
            i += 1
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise InputError(f"--plugin '{f}': no such file")
        spec = importlib.util.spec_from_file_location(f"onnxslim_plugin_{p.stem}", p)
        try:
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming the file
            raise InputError(f"--plugin '{f}' failed to load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for ep in entry_points(group="onnxslim.passes"):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            raise InputError(f"entry point '{ep.name}' of group onnxslim.passes failed to load ({type(e).__name__})") from None
    cmd = cli.commands["optimize"]
    have = {o for prm in cmd.params for o in getattr(prm, "opts", [])}
    for opt in declared_options():  # options of plugin passes
        if opt.opts[0] not in have:
            cmd.params.append(opt)
    return rest


def check_report_path(path: str) -> None:
    """A ``--json`` target that can be written, checked before any work (``-`` is standard output)."""
    import os
    from pathlib import Path

    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise InputError(f"--json '{path}' is a folder; give a file path (or - for standard output)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--json '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--json '{path}': folder '{parent}' is not writable")


def _click_option(f: dataclasses.Field, cls: type, section: str) -> click.Option:
    """A click option for one options-dataclass field; click keeps None for "not given" so the
    dataclass default (shown in the help) applies and the manager knows what the user set."""
    from onnxslim import options as opts

    flag = opts.cli_flag(f)
    kind = opts.field_types(cls)[f.name]
    bits = [f.metadata.get("help", "")]
    if kind is bool and f.default is not None:
        bits.append(f"[default: {'on' if f.default else 'off'}]")
    elif f.default is not None:
        bits.append(f"[default: {f.default}]")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None or hi is not None:
        bits.append(f"[range: {'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'}]")
    help_text = " ".join(b for b in bits if b)
    if kind is bool:
        if "/" not in flag:  # every boolean can be set either way: --x / --no-x
            flag = f"{flag}/--no-{flag[2:]}"
        opt = click.Option([flag, f.name], default=None, help=help_text)
    else:
        choices = f.metadata.get("choices")
        ptype = click.Choice(list(choices)) if choices else {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
        metavar = None if choices else {int: "N", float: "X"}.get(kind, "PATH" if f.name == "calib" else "TEXT")
        opt = click.Option([flag, f.name], type=ptype, default=None, help=help_text, metavar=metavar)
    opt.section = section
    return opt


def declared_options() -> list[click.Option]:
    """Click options generated from RunOptions and every registered pass's Options (one per field name)."""
    from onnxslim.manager import load_passes, option_owners
    from onnxslim.options import RunOptions, fields_of

    out: list[click.Option] = []
    for f in fields_of(RunOptions):
        out.append(_click_option(f, RunOptions, "Calibration" if f.name.startswith("calib") else "Gates of lossy passes"))
    owners = option_owners()
    seen: set[str] = set()
    for name, cls in sorted(load_passes().items()):
        for f in fields_of(cls.Options) if cls.Options is not None else ():
            if f.name not in seen:
                seen.add(f.name)
                out.append(_click_option(f, cls.Options, "Pass " + " / ".join(owners[f.name])))
    return out


def _with_declared_options(f: Callable) -> Callable:
    for opt in reversed(declared_options()):
        f.__click_params__ = getattr(f, "__click_params__", [])
        f.__click_params__.append(opt)
    return f


class _SectionedCommand(click.Command):
    """Help grouped by section (general, calibration, gates, one per pass), from the options' declarations."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx) if isinstance(p, click.Option) else None
            if rec:
                sections.setdefault(getattr(p, "section", "General options"), []).append(rec)
        for name, rows in sections.items():
            with formatter.section(name):
                formatter.write_dl(rows)


class _DefaultGroup(click.Group):
    """``onnxslim IN OUT`` runs the ``optimize`` command; subcommands are matched first."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # `onnxslim` alone: the help, and success
            click.echo(ctx.get_help())
            ctx.exit(0)
        if args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["optimize", *args]
        return super().parse_args(ctx, args)


def _version_message() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return (f"onnxslim {v('onnxslim-tool')} (onnx {v('onnx')}, onnxruntime {v('onnxruntime')}, "
            f"onnx-graphsurgeon {v('onnx-graphsurgeon')}, numpy {v('numpy')}, python {platform.python_version()})")


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit(0)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Main job: onnxslim IN.onnx OUT.onnx [options]  (see: onnxslim optimize --help). "
                    "Custom passes: --plugin FILE.py (repeatable) or the 'onnxslim.passes' entry point group.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version of onnxslim, onnx and onnxruntime, and exit.")
def cli() -> None:
    """onnxslim: optimize ONNX models (lossless cleanup, pruning, INT8) and prove the result in onnxruntime."""


@cli.command("optimize", cls=_SectionedCommand,
             epilog="Exit codes: 0 written; 1 the result missed its gate or a pass failed (nothing written); "
                    "2 bad input (one line on stderr, nothing written).")
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
@click.option("--no-auto-lossless", is_flag=True,
              help="Do not run the lossless preset before the first lossy pass when --passes starts lossy.")
@click.option("--val-shape", multiple=True,
              help="Shape of generated validation inputs, NAME:1,3,224,224 (the model is not changed; repeatable).")
@click.option("--val-samples", type=click.IntRange(min=1), help="Generated validation samples (batch size).")
@click.option("--val-seed", type=int, default=0, show_default=True, help="Seed of generated validation inputs.")
@click.option("--val-range", type=str,
              help="Generated float validation inputs uniform in LOW,HIGH (e.g. 0,1 for images; default: standard normal).")
@click.option("--verbose", "-v", is_flag=True, help="Log what each pass did and decided, on stderr.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Folder mode (IN and OUT folders): models optimized at once, one process each.")
@_with_declared_options
def optimize_cmd(input_path: str, output_path: str, passes: str, input_shape: tuple[str, ...], inputs: str | None,
                 atol: float, rtol: float, no_validate: bool, check_each_pass: bool, force: bool,
                 json_path: str | None, custom_op_library: str | None, quiet: bool, debug: bool,
                 val_shape: tuple[str, ...], val_samples: int | None, val_seed: int, val_range: str | None,
                 verbose: bool, jobs: int,
                 **options: Any) -> None:
    """Optimize IN and write OUT (default passes: lossless). IN and OUT may be folders (every .onnx in IN)."""
    from pathlib import Path

    from onnxslim.api import optimize
    from onnxslim.report import Progress, format_report, format_warnings

    if Path(input_path).is_dir() and not input_path.rstrip("/").endswith(".onnx"):
        from onnxslim.folder import run_folder

        if json_path:
            check_report_path(json_path)
        code = run_folder(Path(input_path), Path(output_path), _FORWARDED, jobs=jobs, json_path=json_path,
                          quiet=quiet)
        sys.exit(code)

    if output_path == "-":
        raise InputError("OUT '-': a model cannot be written to standard output; give a file path")
    if json_path:
        check_report_path(json_path)
    to_stdout = json_path == "-"
    echo = (lambda text: click.echo(text, err=True)) if to_stdout else click.echo  # stdout carries the JSON
    progress = Progress(enabled=not quiet)
    auto_lossless = not options.pop("no_auto_lossless")
    latency = options.pop("latency")
    report = None
    try:
        _, report = optimize(
            input_path, output_path, passes=passes, input_shapes=_parse_shape(input_shape), inputs=inputs,
            validate=not no_validate, atol=atol, rtol=rtol, check_each_pass=check_each_pass, force=force,
            latency=latency, options={k: v for k, v in options.items() if v is not None},
            custom_op_library=custom_op_library, progress=progress, keep_model=False, auto_lossless=auto_lossless,
            val_shapes=_parse_shape(val_shape, "--val-shape"), val_samples=val_samples, val_seed=val_seed,
            val_range=_parse_range(val_range),
        )
    except GateError as e:
        progress.done()
        report = e.report
        if report is not None and not quiet:
            echo(format_report(report, warnings=False))
            if report.warnings:
                click.echo(format_warnings(report), err=True)
        raise
    finally:
        progress.done()
        if verbose and report is not None:
            _log_passes(report)
        if json_path and report is not None:
            if to_stdout:
                click.echo(report.to_json())
            else:
                report.write_json(json_path)
    if not quiet:
        echo(format_report(report, warnings=False))
        if report.warnings:  # on stderr: stdout carries the table (or the JSON), warnings are for a person
            click.echo(format_warnings(report), err=True)
        echo(f"wrote {output_path}")


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
    from onnxslim.report import Report, format_report, strict_json

    if json_path:
        check_report_path(json_path)
    res = validate_files(original, optimized, inputs=inputs, input_shapes=_parse_shape(input_shape), atol=atol,
                         rtol=rtol, lossy=lossy, min_cosine=min_cosine, max_acc_drop=max_acc_drop,
                         custom_op_library=custom_op_library)
    click.echo(format_report(Report(validation=res.to_dict()), totals=False))
    if json_path:
        text = json.dumps(strict_json(res.to_dict()), indent=2, allow_nan=False)
        if json_path == "-":
            click.echo(text)
        else:
            with open(json_path, "w") as f:
                f.write(text)
    if not res.passed:
        raise GateError(f"models differ: {res.reason}")


@cli.command("sensitivity")
@click.argument("model", type=str)
@click.option("--calib", required=True, type=str, help="Calibration data (FILE.npz with optional 'labels', folder, ...).")
@click.option("--calib-size", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--calib-batch", type=click.IntRange(min=1), help="Batch size for running the model.")
@click.option("--input-shape", multiple=True, help="NAME:1,3,224,224 for dynamic inputs of image calibration.")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", show_default=True, help="Ratios to try per group.")
@click.option("--prune-importance", type=click.Choice(["l1", "l2", "recon"]),
              help="Channel ranking: weight norm l1/l2, or recon (default with --refit).")
@click.option("--round-to", type=click.IntRange(min=1), help="Keep channel counts multiples of N (default as in optimize).")
@click.option("--prune-min-channels", type=click.IntRange(min=1), help="Minimum channels kept per layer.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Refit each group's readers before measuring (what the prune pass does).")
@click.option("--raw", is_flag=True, help="Analyse the model as given (default: after the lossless preset, as prune sees it).")
@click.option("--json", "json_path", type=str, help="Write the table as JSON to this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sensitivity_cmd(model: str, calib: str, calib_size: int | None, calib_batch: int | None,
                    input_shape: tuple[str, ...], ratios: str, prune_importance: str | None, round_to: int | None,
                    prune_min_channels: int | None, refit: bool, raw: bool, json_path: str | None,
                    debug: bool) -> None:
    """Per prunable group: channels, share of params/MACs, output drift (and accuracy) at each ratio."""
    from onnxslim.api import optimize
    from onnxslim.model import load_model
    from onnxslim.options import RunOptions
    from onnxslim.passes.prune import PruneOptions
    from onnxslim.report import Progress
    from onnxslim.prune.sensitivity import format_sensitivity, run_sensitivity, write_json

    try:
        rs = tuple(float(r) for r in ratios.split(",") if r.strip())
    except ValueError:
        rs = ()
    if not rs or not all(0.0 < r < 1.0 for r in rs):
        raise InputError(f"--ratios '{ratios}': expected comma-separated fractions between 0 and 1")
    if json_path:
        check_report_path(json_path)
    settings = RunOptions(calib=calib, calib_size=calib_size, calib_batch=calib_batch)
    defaults = PruneOptions()
    shapes = _parse_shape(input_shape)
    progress = Progress()
    try:
        if raw:
            proto = load_model(model).proto
        else:  # the graph the prune pass works on: raw exports hide channel structure behind unfolded shapes
            progress("lossless preset")
            proto, _ = optimize(model, None, passes="lossless", validate=False, input_shapes=shapes)
        res = run_sensitivity(proto, calib, settings=settings, importance=prune_importance,
                              round_to=round_to or defaults.round_to,
                              min_channels=prune_min_channels or defaults.prune_min_channels, refit=refit,
                              ratios=rs, input_shapes=shapes, progress=progress)
    finally:
        progress.done()
    res["model"] = model
    res["lossless_first"] = not raw
    click.echo(format_sensitivity(res))
    for w in res.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
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


def _plugin_args(args: list[str]) -> list[tuple[str, str]]:
    return [("--plugin", args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--plugin"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs click without its own error handling so that every error is one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        args = _load_plugins(args)
        _VALUE_FLAGS.update(o for prm in cli.commands["optimize"].params if isinstance(prm, click.Option)
                            and not prm.is_flag for o in prm.opts)
        _FORWARDED[:] = [a for f in _plugin_args(sys.argv[1:] if argv is None else argv) for a in f] + \
            _forwarded_args(args)
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
