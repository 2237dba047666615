"""The ``deepfm`` command: train, evaluate, predict, inspect (serve, export, explain and tune register here too).

Errors deepfm expects (bad config, bad data, bad model directory) print one clear message and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepfm.errors import DeepFMError
from deepfm.process import tune_openmp


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from deepfm.config import load_config
    from deepfm.pipeline import default_output, metrics_table, train
    from deepfm.process import reuse_freed_memory
    from deepfm.runtime import resolve_device

    overrides = list(args.set or [])
    if args.skip_bad_rows:
        overrides.append("data.skip_bad_rows=true")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.nproc and args.nproc > 1:
        return _launch_torchrun(args)
    cfg = load_config(args.config, overrides)
    if cfg.train.reuse_freed_memory and resolve_device(cfg.train.device).type == "cpu":
        reuse_freed_memory()  # process-wide, so the command does it, not the Trainer (deepfm.process)
    output = Path(args.output or cfg.output or default_output(args.config))
    if not (args.output or cfg.output):
        _log(f"Output: {output} (named after {args.config}; choose with --output DIR)")
    result = train(cfg, output, resume=args.resume, log=_log, init_from=args.init_from,
                   reset_optimizer=args.reset_optimizer)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(metrics_table(result.metrics))
    print(f"\nModel written to {output}\n"
          f"Next: deepfm predict {output} DATA --output predictions.csv   |   deepfm inspect {output}")
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``deepfm train --nproc N``: the same command under torchrun on this machine (gloo on CPU, NCCL on GPU)."""
    import subprocess

    argv = list(args.argv)
    i = argv.index("--nproc") if "--nproc" in argv else None
    if i is not None:
        del argv[i:i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "deepfm", *argv]
    _log("Launching: " + " ".join(cmd))
    return subprocess.call(cmd)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deepfm.predict import Predictor

    pred = Predictor(args.model_dir, device=args.device)
    m = pred.evaluate_file(args.data, skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
    if args.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:12s} {v:,}" if isinstance(v, int) else f"{k:12s} {v:.6f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deepfm.predict import Predictor, output_format

    output_format(args.output)  # an unknown extension fails before the model loads
    pred = Predictor(args.model_dir, device=args.device)
    rows = pred.predict_file(args.data, args.output, id_columns=args.id_column,
                             skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress, explain=args.explain)
    _log(f"Wrote {rows:,} predictions to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from deepfm.artifact import load_model
    from deepfm.config import config_to_dict

    m = load_model(Path(args.model_dir))
    fields = m.encoder.describe()
    report = {"path": str(m.path), "versions": m.info.get("versions"), "created": m.info.get("created"),
              "format_version": m.info.get("format_version"), "embedding_rows": m.layout.num_rows,
              "parameters": sum(p.numel() for p in m.model.parameters()), "fields": fields,
              "metrics": m.metrics, "config": config_to_dict(m.config)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"deepfm model {m.path}  (format {report['format_version']}, created {report['created']})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in (report["versions"] or {}).items()))
    print(f"embedding table: {m.layout.num_rows:,} rows x {m.config.model.embed_dim} (+1 linear); "
          f"{report['parameters']:,} parameters")
    mc = m.config.model
    print(f"model: head={mc.head} linear={mc.use_linear} fm={mc.use_fm} deep={mc.use_deep} "
          f"hidden={mc.hidden_units} dropout={mc.dropout} batch_norm={mc.batch_norm}")
    print(f"\n{'field':16s} {'kind':18s} {'vocab':16s} {'size':>10s}")
    for f in fields:
        kind = "/".join([f["kind"]] + [str(f[k]) for k in ("numeric", "combiner") if k in f])
        print(f"{f['name']:16s} {kind:18s} {f.get('vocab', '-'):16s} {f.get('vocab_size', 2):>10,}")
    print("\nmetrics:")
    for split, vals in m.metrics.items():
        print(f"  {split}: " + ", ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in vals.items()))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from deepfm.artifact import load_model
    from deepfm.explain import explain_data
    from deepfm.explain.report import format_tables, write_output
    from deepfm.runtime import resolve_device

    device = resolve_device(args.device)
    given = {k: v for k, v in (("seeds", args.seeds), ("max_rows", args.max_rows)) if v is not None}
    report = explain_data(load_model(Path(args.model_dir), device), args.data, device=str(device), **given)
    if args.output:
        for path in write_output(report, Path(args.output)):
            _log(f"Wrote {path}")
    print(json.dumps(report) if args.json else format_tables(report))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _scoring_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that score a data file with a model (evaluate, predict)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows, count them and write them to a side file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless the help text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from deepfm import __version__

    p = Parser(prog="deepfm", description="DeepFM for click-through-rate prediction.")
    p.add_argument("--version", action="version", version=f"deepfm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="prepare data, train, early-stop and write a model directory")
    t.add_argument("config", help="YAML config (see README: config reference)")
    t.add_argument("--output", "-o", help="model directory to write (default: runs/<config name>)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this output")
    t.add_argument("--init-from", metavar="MODEL_DIR",
                   help="train further from this model on new data: its vocabularies grow by the new data's "
                        "values, known ids keep their rows, weights and optimiser state")
    t.add_argument("--reset-optimizer", action="store_true",
                   help="with --init-from: start the optimiser state afresh (weights still carry over)")
    t.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows, count them and write them to a side file")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (torchrun + DistributedDataParallel)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="AUC, log loss, calibration (and gAUC) of a model on a labelled file")
    e.add_argument("model_dir")
    e.add_argument("data")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _scoring_args(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="write probabilities (with id columns) for every row of a file")
    r.add_argument("model_dir")
    r.add_argument("data")
    r.add_argument("--output", "-o", required=True, help="output .csv or .parquet")
    r.add_argument("--id-column", action="append", metavar="NAME",
                   help="column to carry through unchanged (repeatable; default: data.id_columns)")
    r.add_argument("--explain", action="store_true",
                   help="add attr_bias and attr_<field> per field: each row's logit split by field (they sum to it)")
    _scoring_args(r)
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("explain", help="field importance, field-pair interactions and the logit's parts on a "
                                       "labelled file (README: Explaining a model)")
    x.add_argument("model_dir")
    x.add_argument("data", help="labelled file (the format follows its extension, as for evaluate)")
    x.add_argument("--output", "-o", metavar="DIR", help="write importance.png, pairs.png and explain.json here")
    x.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    x.add_argument("--seeds", type=_positive_int, help="shuffles of each field (default: 5)")
    x.add_argument("--max-rows", type=_positive_int, help="rows of DATA to read, its first ones (default: 100,000)")
    x.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    x.set_defaults(func=cmd_explain)

    i = sub.add_parser("inspect", help="config, fields, vocabulary sizes, metrics and versions of a model")
    i.add_argument("model_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    from deepfm.serve.cli import register  # deepfm serve, deepfm export

    register(sub)
    from deepfm.tune import register as register_tune  # deepfm tune (optuna, optional extra [tune])
    register_tune(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``deepfm`` command. It applies ``deepfm.process.tune_openmp`` first, before anything loads torch
    (every subcommand, ``deepfm serve``'s workers and ``torchrun``'s ranks come through here)."""
    tune_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except DeepFMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted. `deepfm train CONFIG --resume` continues from the last checkpoint.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
