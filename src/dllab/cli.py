"""The ``dllab`` command line: a thin layer that parses flags and calls the package's functions.

Commands: ``train``, ``eval``, ``datasets``, ``sweep``, ``ablate``, ``demo``, ``report``,
``compare``. Every bad value is reported on one line with exit code 2; runtime failures (corrupt
checkpoint, data missing offline, non-finite loss) on one line with exit code 1; an interrupted run
saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dllab.config import (DEVICES, EXIT_USAGE, PRECISIONS, Parser, dataset_name, nonnegative_int, path_text,
                          positive_int)


class UsageError(Exception):
    """A bad command-line value found after parsing (exit code 2)."""


# ---- parsers ---------------------------------------------------------------------------------
def build_parser() -> Parser:
    from dllab import __version__
    from dllab.train import KINDS, add_train_arguments, kind_module

    parser = Parser(prog="dllab", description="Deep learning on images: from-scratch layers, "
                    "ResNet-18, VAE and DCGAN, with run folders, reports and one CLI.")
    parser.add_argument("--version", action="version", version=f"dllab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    train = sub.add_parser("train", help="train a model", description="Train a model; each run "
                           "writes a folder with config, metrics, checkpoints and figures.")
    train_kinds = train.add_subparsers(dest="kind", metavar="KIND", parser_class=Parser)
    train_kinds.required = True
    parser.command_parsers = {("train",): train}
    for kind in KINDS:
        module = kind_module(kind)
        kp = train_kinds.add_parser(kind, help=module.__doc__.strip().splitlines()[0],
                                    description=module.__doc__)
        add_train_arguments(kp, kind)
        parser.command_parsers[("train", kind)] = kp

    ev = sub.add_parser("eval", help="evaluate a run from its checkpoint",
                        description="Recompute a run's test metrics and figures from a checkpoint; "
                        "writes eval.json and figures/ in the run folder.")
    ev.add_argument("run", help="run folder", type=path_text)
    ev.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="which checkpoint to evaluate")
    ev.add_argument("--device", choices=DEVICES, default="auto", help="where to evaluate")
    ev.add_argument("--data-dir", default=None, type=path_text,
                    help="where datasets live (default: as trained)")
    ev.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size")
    ev.add_argument("--tta", action="store_true", default=None,
                    help="classifier: test-time horizontal-flip averaging (default: off)")
    ev.add_argument("--precision", choices=("run", *PRECISIONS), default=None,
                    help="classifier: autocast for the evaluation; run (default): the run's own --precision "
                    "(from config.json, resolved on this device), so eval.json agrees with summary.json. "
                    "The VAE and the DCGAN evaluate in fp32")
    ev.add_argument("--iw-samples", type=nonnegative_int, default=None,
                    help="vae: importance samples for the log-likelihood estimate (e.g. 5000; 0, the "
                    "default: skip)")
    ev.add_argument("--classifier", default=None, type=path_text,
                    help="dcgan: run folder of a classifier trained on the same dataset, whose features "
                    "give the offline FID/precision/recall and class coverage")
    ev.add_argument("--inception-weights", default=None, type=path_text,
                    help="dcgan: local path of torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                    "for real FID/IS (default: $DLLAB_INCEPTION_WEIGHTS; never downloaded)")
    ev.add_argument("--num-samples", type=positive_int, default=None,
                    help="dcgan: generated samples for the quality metrics (default: 5000)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    ds = sub.add_parser("datasets", help="list datasets and whether each is available here",
                        description="List the datasets dllab knows, whether each is on this machine, "
                        "where, and how to get the missing ones (nothing is downloaded).")
    ds.add_argument("--data-dir", default=None, type=path_text,
                    help="where datasets live (default: $DLLAB_DATA or "
                    "~/.cache/dllab/data)")

    sw = sub.add_parser("sweep", help="train one run per value of any train flag", add_help=True,
                        description="Any `dllab train KIND` flag may be given several values; one run "
                        "is trained per combination and a table (Markdown + CSV) is written. Example: "
                        "dllab sweep vae --beta 0.1 0.5 1 2 4 --epochs 5")
    sw.add_argument("kind", choices=KINDS)
    sw.add_argument("--sweep-out", default=None, type=path_text, help="folder for the runs and the table "
                    "(default: runs/sweep-KIND-TIMESTAMP)")

    ab = sub.add_parser("ablate", help="train the classifier ablations {BN on/off} x {max-pool on/off}",
                        description="Train the four ResNet-18 variants {BN on/off} x {max-pool on/off} "
                        "(optionally also scratch vs torch layers) with the same seed and budget; writes "
                        "a table (Markdown + CSV) and overlaid curves. Other train flags pass through.")
    ab.add_argument("kind", choices=("classifier",))
    ab.add_argument("--ablate-out", default=None, type=path_text, help="folder for the runs and the table "
                    "(default: runs/ablate-classifier-TIMESTAMP)")
    ab.add_argument("--both-layers", action="store_true",
                    help="also train each variant with the from-scratch layers")
    ab.add_argument("--seeds", type=nonnegative_int, nargs="+", default=None, metavar="SEED",
                    help="train every variant once per seed and add a mean +- std table over the seeds "
                    "(default: one run per variant with the train --seed)")

    dm = sub.add_parser("demo", help="the main job: train a classifier, a VAE and a DCGAN on bundled "
                        "data and write one report",
                        description="Train a ResNet-18 classifier, a VAE and a DCGAN (scored by that "
                        "classifier) on bundled data and write one HTML report. Finished runs in the "
                        "folder are reused when their settings match; an interrupted one continues.")
    dm.add_argument("--dataset", type=dataset_name, default="mnist5k",
                    help="dataset of the three runs (see `dllab datasets`)")
    dm.add_argument("--epochs", type=positive_int, default=None, help="epochs per model (default: per model)")
    dm.add_argument("--full", action="store_true", help="full-size models and longer training")
    dm.add_argument("--out", default=None, type=path_text, help="folder for the runs and the report (default: "
                    "runs/demo for the quick demo on mnist5k, else e.g. runs/demo-fashion-mnist-full)")
    dm.add_argument("--device", choices=DEVICES, default="auto", help="where to train")
    dm.add_argument("--data-dir", default=None, type=path_text,
                    help="where datasets live (default: $DLLAB_DATA or "
                    "~/.cache/dllab/data)")
    dm.add_argument("--quiet", action="store_true", help="no progress bars")

    rr = sub.add_parser("reproduce", help="train the studies behind dllab's claims and check them",
                        description="Train (or reuse) the runs of each study and check them against "
                        "the expected ranges in dllab's claims file, each with its source; print a "
                        "pass/fail table, write claims.md and an HTML report.")
    rr.add_argument("studies", nargs="*", help="studies to run (default: demo; see --list)")
    rr.add_argument("--list", action="store_true", help="print the studies named (or all) and their claims, and exit")
    rr.add_argument("--quick", action="store_true", help="smoke-test size (256 images, 1 epoch): checks "
                    "that a study runs; nothing is judged")
    rr.add_argument("--seeds", type=positive_int, default=1, help="seeds per study (runs seed 0..N-1)")
    rr.add_argument("--out", default="runs/reproduce", type=path_text,
                    help="folder of the studies' runs and the report")
    rr.add_argument("--quiet", action="store_true", help="no progress bars")

    rp = sub.add_parser("report", help="write a self-contained HTML (and Markdown) report of runs",
                        description="Write one HTML file (figures embedded, no scripts) and a Markdown "
                        "twin describing one or more runs, with comparison tables and curves.")
    rp.add_argument("runs", nargs="+", type=path_text, help="run folders")
    rp.add_argument("--out", default=None, type=path_text,
                    help="HTML file, or a folder (any name without a suffix) "
                    "that gets report.html (default: RUN/report.html, or report.html for several "
                    "runs); the Markdown goes beside it; an existing file is written over only "
                    "when it is a dllab report")

    cp = sub.add_parser("compare", help="print a table of runs' summary metrics",
                        description="Print the runs' scalar summary metrics as an aligned table.")
    cp.add_argument("runs", nargs="+", type=path_text, help="run folders")
    cp.add_argument("--sort", default=None, help="sort by this metric (default: the order given)")
    cp.add_argument("--desc", action="store_true", help="sort descending")
    parser.command_parsers.update({(name,): p for name, p in sub.choices.items()})
    return parser


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "train":
        from dllab.train import command_line_config, train

        resume = bool(args.resume)
        config = command_line_config(args.kind, args, argv[2:], resume=resume)
        run = train(args.kind, config, resume=resume, quiet=bool(args.quiet))
        from dllab.utils import dist_info

        if dist_info()[0] == 0:  # under torchrun, rank 0 speaks for all
            _print_summary({**run.summary(), "run": str(run.path)})
        return 0
    if args.command == "datasets":
        from dllab.data import list_datasets

        _print_datasets(list_datasets(args.data_dir))
        return 0
    if args.command == "eval":
        from dllab.evaluate import evaluate_run

        result = evaluate_run(args.run, vars(args))
        _print_summary(result)
        return 0
    if args.command == "sweep":
        from dllab.sweep import sweep_main

        return sweep_main(args, argv)
    if args.command == "ablate":
        from dllab.sweep import ablate_main

        return ablate_main(args, argv)
    if args.command == "reproduce":
        from dllab.reproduce import STUDIES, list_studies, reproduce, verdict_rows

        unknown = [s for s in args.studies if s not in STUDIES]
        if unknown:
            raise UsageError(f"unknown study {', '.join(unknown)}; choose from {', '.join(STUDIES)}")
        if args.list:  # the studies named, or all of them
            print(list_studies(names=list(dict.fromkeys(args.studies))))
            return 0
        outcomes, html = reproduce(args.studies or ["demo"], Path(args.out), seeds=args.seeds,
                                   quick=args.quick, quiet=args.quiet)
        rows = verdict_rows(outcomes)
        for row in rows:
            print("  ".join(row[:5]))
        print(f"report: {html}")
        return 1 if any("FAIL" in row[4] for row in rows) else 0
    if args.command == "demo":
        from dllab.demo import demo

        path = demo(dataset=args.dataset, epochs=args.epochs, full=args.full, out=args.out,
                    device=args.device, data_dir=args.data_dir, quiet=args.quiet)
        print(f"report: {path}")
        return 0
    if args.command == "report":
        from dllab.report import write_report

        html, md = write_report(args.runs, args.out)
        print(f"report: {html}\nmarkdown: {md}")
        return 0
    if args.command == "compare":
        from dllab.report import compare_table

        print(compare_table(args.runs, sort=args.sort, descending=args.desc))
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def _print_summary(summary: dict) -> None:
    """Scalars one per line; a protocol card (how a metric was measured) after them, flattened."""
    cards = {k: v for k, v in summary.items() if k.endswith("protocol") and isinstance(v, dict)}
    rows = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    rows.update({f"{card}.{k}": v for card, entries in cards.items() for k, v in entries.items()})
    width = max((len(k) for k in rows), default=0)
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        print(f"{key:<{width}}  {value}")


def _print_datasets(rows: list[dict]) -> None:
    for row in rows:
        mark = "available" if row["available"] else "missing"
        print(f"{row['name']:<14} {mark:<10} {row['description']}")
        print(f"{'':<14} {'':<10} location: {row['location']}")
        if not row["available"]:
            print(f"{'':<14} {'':<10} to get it: {row['how_to_get']}")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a trainer's own handler: stops the command as Ctrl-C does (exit code 143)."""

    signum = signal.SIGTERM


def _terminate(signum, frame):  # noqa: ARG001
    raise Terminated


class _PipeSafe:
    """The process's stdout or stderr, which drops what is written once its reader has gone.

    ``dllab train ... | head -1`` closes the pipe after one line, and the next progress line
    raised BrokenPipeError, which failed the run. From then on the stream's file descriptor
    points at /dev/null (Python's advice for EPIPE), so the run goes on and finishes.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 runtime failure, 2 bad usage, 128+N on signal N).

    SIGINT and SIGTERM stop every phase with one line: a trainer saves a checkpoint first
    (:class:`dllab.engine.Interrupted`), anything else (loading modules or data, building models,
    writing reports) stops where it is.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ignored = signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # started so: stays so (the trainer agrees)
        previous = None if ignored else signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    streams = sys.stdout, sys.stderr
    if sys.stdout is sys.__stdout__ and sys.stdout is not None:  # the process's own (not a test's capture)
        sys.stdout = _PipeSafe(sys.stdout)
    if sys.stderr is sys.__stderr__ and sys.stderr is not None:
        sys.stderr = _PipeSafe(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Record SIGINT and SIGTERM while the heavy modules import, and stop once they have.

    torch imports numpy from C, and drops a KeyboardInterrupt raised in there: a Ctrl-C that
    landed while torch loaded was lost, and the command ran on. A second signal stops at once (an
    import that hangs can still be stopped); a signal started ignored stays ignored.
    """
    arrived: list[int] = []

    def record(signum, frame):  # noqa: ARG001
        if arrived:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        arrived.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_IGN, None):
            continue
        try:
            previous[sig] = signal.signal(sig, record)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        raise Terminated if arrived[0] == signal.SIGTERM else KeyboardInterrupt


def _main(argv: list[str]) -> int:
    try:
        with _signals_held():
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if extra and args.command not in ("sweep", "ablate"):
                # their extra flags belong to `dllab train KIND` and are checked there, run by run;
                # elsewhere the command's own parser names them (and its own --help)
                command = parser.command_parsers[(args.command, getattr(args, "kind", None))
                                                 if args.command == "train" else (args.command,)]
                command.error(f"unrecognized arguments: {' '.join(extra)}")
            from dllab.checkpoint import CheckpointError
            from dllab.data import CorruptDatasetError
            from dllab.engine import AlarmStop, Interrupted, NonFiniteLossError
            from dllab.runs import CorruptRunFileError, RunFolderError
    except KeyboardInterrupt as e:  # Ctrl-C while the modules load: one line, no traceback
        print(f"dllab: {_stopped_by(e)}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)

    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt as e:  # outside a trainer's own handler (loading data, building, reports)
        print(f"dllab {args.command}: {_stopped_by(e)}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (CorruptDatasetError, CorruptRunFileError) as e:  # bad data, not bad usage
        print(f"dllab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (UsageError, RunFolderError, ValueError) as e:
        print(f"dllab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, NonFiniteLossError, AlarmStop, FileNotFoundError, OSError) as e:
        print(f"dllab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"dllab {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum


def _stopped_by(error: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"


if __name__ == "__main__":
    raise SystemExit(main())
