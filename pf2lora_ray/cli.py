"""The ``pf2lora`` command line (DESIGN.md, Command line).

    pf2lora run CONFIG.yaml [--set key=value ...] [--out DIR] [--address ADDR] [--resume]
    pf2lora tune CONFIG.yaml --space SPACE.yaml [--samples N] [--out DIR]
    pf2lora report DIR [--compact DEST]
    pf2lora export DIR --client K --to OUT [--shared-only]
    pf2lora predict OUT --text "..." | --triple S P O [--triple ...]
    pf2lora bench NAME [--quick] [--out DIR] [--model M] [--eval-budget-s S]

Bad input (config, data, checkpoint, arguments) prints one line ``error: ...``
naming what is wrong and exits with status 2, without a traceback. ``run`` and
``tune`` check the whole job first (every sweep variant, registry names, the data
and their partition; :mod:`pf2lora_ray.validate`), so such an error leaves no
``--out`` folder; one that still comes back from a Ray actor is unwrapped to
the same line. Every folder argument (``--out``, ``report DIR``, ``export DIR``,
``--to``) may be a local path or an ``s3://`` / ``gs://`` / ``file://`` URI
(:mod:`pf2lora_ray.storage`); one that cannot be reached, a missing bucket or a
file where a folder is expected is such a line too, before any actor starts.
A Ray ``--address`` where nothing answers fails within seconds the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def _extra(args: argparse.Namespace) -> dict:
    extra = {}
    if getattr(args, "address", None):
        extra["runtime.address"] = args.address
    if getattr(args, "quiet", False):
        extra["runtime.quiet"] = True
    return extra


def _load(args: argparse.Namespace):
    from pf2lora_ray.config import load_config

    return load_config(args.config, args.set or [], _extra(args))


def cmd_run(args: argparse.Namespace) -> int:
    """One run, or one per ``sweep:`` variant and ``seeds:`` entry (OUT/<folder>/)."""
    from pf2lora_ray.config import read_yaml
    from pf2lora_ray.experiment import holds_run, preflight, run_experiment
    from pf2lora_ray.validate import UsageError, validate_job

    # Check every run (config, names, data, partition), where results go and the
    # Ray address before the first run starts, so bad input writes nothing.
    runs = validate_job(read_yaml(args.config), args.set or [], _extra(args))
    out = preflight(runs[0][1], args.out or Path("results") / Path(args.config).stem)
    if args.resume and not any(holds_run(out / v.folder if v.folder else out) for v, *_ in runs):
        raise UsageError(
            f"--resume: {out} holds no run of this job to resume (no runs.parquet there); "
            "drop --resume to start it"
        )
    for variant, cfg, data in runs:
        folder = out / variant.folder if variant.folder else out
        run_experiment(cfg, folder, args.resume, variant=variant.label, data_check=data)
    print(f"results in {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pf2lora_ray.tune import run_tune

    cfg = _load(args)
    out = args.out or str(Path("results") / f"{Path(args.config).stem}-tune")
    run_tune(cfg, args.space, out, samples=args.samples, resume=args.resume)
    print(f"tune results in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    from pf2lora_ray.storage import check_folder, location
    from pf2lora_ray.validate import UsageError

    folder = location(args.dir)
    if not folder.is_dir():
        raise UsageError(f"{args.dir}: no such results folder")
    if args.compact:
        from analysis.compact import write_compact

        dest = location(args.compact)
        check_folder(dest, "--compact")  # a file in the way, an unreachable store, no bucket
        for path in write_compact(folder, dest):
            print(path)
        return 0
    for path in write_report(folder):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pf2lora_ray.export import export_peft

    out = export_peft(args.dir, args.client, args.to, shared_only=args.shared_only)
    print(f"PEFT adapter written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pf2lora_ray.export import predict_many
    from pf2lora_ray.export.predict import triples_source
    from pf2lora_ray.validate import UsageError

    texts = list(args.text or [])
    if args.triple:
        texts.append(triples_source(args.adapter, args.triple))  # one source: the triple set
    if not texts:
        raise UsageError("predict: give --text TEXT or, for a WebNLG export, --triple S P O")
    for line in predict_many(args.adapter, texts, args.max_new_tokens):  # loads the model once
        print(line)
    return 0


def seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type: anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from pf2lora_ray.bench import run_bench

    run_bench(
        args.name,
        quick=args.quick,
        out=args.out,
        model=args.model,
        eval_budget_s=args.eval_budget_s,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pf2lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML file of overrides of the defaults")
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one config key (repeatable), e.g. fed.rounds=5",
        )
        sp.add_argument("--out", help="results folder")
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
        sp.add_argument("--resume", action="store_true", help="continue the run in --out")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.set_defaults(fn=fn)
        return sp

    with_config("run", cmd_run, "run one federated simulation")
    tune = with_config("tune", cmd_tune, "Ray Tune search over config keys")
    tune.add_argument("--space", required=True, help="YAML search space")
    tune.add_argument("--samples", type=int, default=4, help="number of trials")

    rep = sub.add_parser("report", help="report.md and PNG plots for a results folder")
    rep.add_argument("dir")
    rep.add_argument(
        "--compact",
        metavar="DEST",
        help="write the study's compact results (evaluations, ranks, searches) to DEST instead",
    )
    rep.set_defaults(fn=cmd_report)

    exp = sub.add_parser("export", help="a client's personalized adapter in PEFT format")
    exp.add_argument("dir")
    exp.add_argument("--client", type=int, default=0)
    exp.add_argument("--to", required=True)
    exp.add_argument("--shared-only", action="store_true", help="export the global adapter")
    exp.set_defaults(fn=cmd_export)

    pred = sub.add_parser("predict", help="run an exported adapter on text")
    pred.add_argument("adapter")
    pred.add_argument("--text", action="append", help="an input or source (repeatable)")
    pred.add_argument(
        "--triple", action="append", nargs=3, metavar=("S", "P", "O"),
        help="one triple of a WebNLG source (repeat for a set; all form one input)",
    )
    pred.add_argument("--max-new-tokens", type=int, help="default: the run's data.max_new_tokens")
    pred.set_defaults(fn=cmd_predict)

    bench = sub.add_parser("bench", help="benchmarks (overhead, flower, scaling, cost)")
    bench.add_argument("name")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--out")
    bench.add_argument("--model", help="cost only: minilm (default) or smollm2 (./setup.sh nlg)")
    bench.add_argument(
        "--eval-budget-s",
        type=seconds,
        help="scaling only: seconds the evaluation of every client may take "
        "(default 600, --quick none; 0: no limit)",
    )
    bench.set_defaults(fn=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as err:
        from pf2lora_ray.validate import one_line, unwrap

        bad = unwrap(err)  # the project's error, also when a Ray actor raised it
        if bad is None:
            raise
        print(f"error: {one_line(bad)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
