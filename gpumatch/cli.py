"""The ``gpumatch`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .psf.parse import psf_forms_help

__all__ = ["main"]

log = logging.getLogger("gpumatch")


def _setup_logging(verbose, quiet):
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else
                                           logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("gpumatch")
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level)


def _check_backend(args):
    """``--backend cupy`` on a machine without CuPy: one line, before any work."""
    from .backends import backend_status

    if args.backend != "auto":
        usable, why = backend_status(args.backend)
        if not usable:
            raise ValueError(f"--backend {args.backend}: {why}; install its package (CuPy: "
                             "pip install 'gpumatch[cupy]' on a machine with an NVIDIA GPU), "
                             "or use --backend numpy (or auto)")


def _check_optional_dependencies(args):
    """Optional packages the options need, checked before any input is read."""
    if getattr(args, "plots", None) or getattr(args, "debug", None):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError(f"--{'plots' if getattr(args, 'plots', None) else 'debug'} needs "
                              "matplotlib: pip install matplotlib (or 'gpumatch[plots]'), or "
                              "leave the option out")


def _cmd_example(args):
    from .example import run_example

    _check_backend(args)
    _check_optional_dependencies(args)
    if args.output:
        from .io._atomic import check_output_path

        # Refuse an existing --output before the work, not after it.
        check_output_path(args.output, args.overwrite, "exposure")
        for given in (args.science, args.template):
            if given and os.path.exists(given) and os.path.exists(args.output) \
                    and os.path.samefile(given, args.output):
                raise FileExistsError(f"{args.output}: is an input; choose another --output")
    if args.science or args.template:
        from .example import run_fits_example

        if not (args.science and args.template):
            raise SystemExit("gpumatch example: give both --science and --template FITS files")
        result, lines = run_fits_example(args.science, args.template, backend=args.backend,
                                         psf_from_header=args.psf_from_header)
    else:
        result, lines = run_example(backend=args.backend)
    print("\n".join(lines))
    if args.debug:
        from .plots import save_diagnostic_figures

        paths = save_diagnostic_figures(result, args.debug)
        print(f"  figures       : {len(paths)} saved in {args.debug}")
    if args.output:
        result.psfMatchedExposure.write_fits(args.output, overwrite=args.overwrite)
        print(f"  output        : {args.output}")
    return 0


def _cmd_selftest(args):
    from .backends import backend_names, backend_status, resolve_backend_name
    from .selftest import run_self_check
    from .task import ModelPsfMatchTask

    backend = args.backend
    if backend == "auto":
        backend = resolve_backend_name("auto")
        for name in backend_names()[1:]:  # the ones "auto" passed over, and why
            usable, why = backend_status(name)
            if not usable:
                print(f"gpumatch selftest: backend '{name}' is not usable ({why}); checking "
                      f"backend '{backend}'")
    else:
        usable, why = backend_status(backend)
        if not usable:
            print(f"gpumatch selftest: error: backend '{backend}' is not usable: {why}; install "
                  "its package (CuPy: the 'cupy' extra on a machine with an NVIDIA GPU), or use "
                  "--backend numpy", file=sys.stderr)
            return 2
    report = run_self_check(ModelPsfMatchTask, backend, args.case)
    print(report.table())
    return 0 if report.passed else 1


#: Exit codes of ``gpumatch`` (also in ``gpumatch --help`` and the README).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_POOR = 0, 1, 2, 3
EXIT_CODES_HELP = """exit codes:
  0  every match is good (or an existing good output was skipped)
  1  at least one input failed with an error (its output is not written), or an
     existing output is not this run's (conflict: rerun with --overwrite)
  2  bad command line, configuration, model or input: nothing was matched
  3  no errors, but at least one match is POOR (does not reach the reference) or
     UNUSABLE (no valid output pixel); those outputs are written and the summary
     says why and how to fix it"""


def _counts(rows):
    """``"ok N, [skipped N, conflict N, ]failed N"`` (the middle two when they occur)."""
    statuses = [r["status"] for r in rows]
    return ", ".join(f"{s} {statuses.count(s)}" for s in ("ok", "skipped", "conflict", "failed")
                     if s in ("ok", "failed") or s in statuses)


def _n_bad(rows):
    return sum(r["status"] in ("failed", "conflict") for r in rows)


def _n_poor(rows):
    return sum(r["status"] not in ("failed", "conflict") and r.get("verdict") in ("poor", "failed")
               for r in rows)


def _exit_code(rows):
    """The exit code of a run with these rows, after saying what went wrong on stderr."""
    failed = sum(r["status"] == "failed" for r in rows)
    conflicts = sum(r["status"] == "conflict" for r in rows)
    n_poor = _n_poor(rows)
    if failed:
        print(f"gpumatch: {failed} of {len(rows)} inputs failed", file=sys.stderr)
    if conflicts:
        print(f"gpumatch: {conflicts} of {len(rows)} existing outputs are not this run's "
              "(conflict); pass --overwrite to recompute them", file=sys.stderr)
    if n_poor:
        print(f"gpumatch: {n_poor} of {len(rows)} matches are poor or unusable (outputs written; "
              "see the summary)", file=sys.stderr)
    return EXIT_FAILED if failed or conflicts else EXIT_POOR if n_poor else EXIT_OK


def _all_good(rows):
    return not _n_bad(rows) and not _n_poor(rows)


def _load_config(args):
    """``--config``/``--set``; without ``--config`` or ``--lsst-defaults``, the
    recommended settings are chosen per exposure with ``--set`` on top."""
    from .pipeline import load_config, parse_overrides
    from .recommend import recommended_per_exposure

    overrides = parse_overrides(args.set)
    config = load_config(args.config, overrides)
    if args.config or args.lsst_defaults:
        return config
    return recommended_per_exposure(config, overrides)


def _one_line(exc):
    """An exception as one line: its class and its message with whitespace collapsed."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) and not text:
        text = ("out of memory; lower kernelSize, spatialKernelOrder or alardDegGauss "
                "(--set FIELD=VALUE), or run fewer at once (fewer --workers)")
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _cmd_match_distributed(args):
    """``gpumatch match --scheduler ADDRESS`` / ``--workers N``: one Dask task per file."""
    from .distributed import SUMMARY_NAME, format_summary, match_files

    if args.output or not args.output_dir:
        raise ValueError("--scheduler/--workers write to --output-dir DIR (not -o FILE)")
    if getattr(args, "compress", False):
        raise ValueError("--compress is not available with --scheduler/--workers (outputs of "
                         "inputs named *.fz are compressed); run without them to compress")
    if args.scheduler and args.workers is not None:
        raise ValueError("give --scheduler ADDRESS (an existing cluster) or --workers N (a local "
                         "one), not both")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give a positive number of worker processes")
    config = _load_config(args)
    rows = match_files(args.exposures, args.reference, args.output_dir,
                       client=args.scheduler, psf=args.psf, config=config, backend=args.backend,
                       kernel_sum=args.kernel_sum, overwrite=args.overwrite,
                       n_workers=args.workers, progress=not args.quiet,
                       save_kernel=args.save_kernel, plots_dir=args.plots,
                       psf_from_header=args.psf_from_header, dashboard=args.dashboard,
                       task_timeout=args.task_timeout)
    if not args.quiet or not _all_good(rows):
        print(format_summary(rows))
        print(f"summary: {os.path.join(args.output_dir, SUMMARY_NAME)}")
    return _exit_code(rows)


def _plan_serial_outputs(args):
    """Outputs of a serial run, refused up front if they collide; the run's lock, not yet held.

    Temporary files that an earlier, interrupted run left for these outputs
    are removed once the lock is held (no other run can own them then).
    """
    import contextlib

    from .distributed import _remove_stale
    from .io.rundir import check_output_names, run_lock
    from .pipeline import kernel_path_for, output_path_for

    outputs = [output_path_for(p, args.output_dir, args.output) for p in args.exposures]
    check_output_names(args.exposures, outputs,
                       [kernel_path_for(o) for o in outputs] if args.save_kernel else ())
    directory = args.output_dir or os.path.dirname(os.path.abspath(args.output))

    @contextlib.contextmanager
    def locked():
        with run_lock(directory):
            for out in outputs:
                _remove_stale(out)
            yield

    return outputs, locked()


def _cmd_match(args):
    _check_optional_dependencies(args)
    if getattr(args, "scheduler", None) or getattr(args, "workers", None) is not None:
        return _cmd_match_distributed(args)
    _check_backend(args)
    import contextlib
    import time

    from .distributed import (SUMMARY_NAME, _progress_bar, format_summary, match_one,
                              write_run_summary)
    from .pipeline import resolve_psf
    from .task import ModelPsfMatchTask

    if args.task_timeout is not None:
        raise ValueError("--task-timeout works with --workers N or --scheduler ADDRESS; add one "
                         "of them, or leave --task-timeout out")
    if args.output and len(args.exposures) > 1:
        raise ValueError("-o/--output takes one input; use --output-dir DIR for several")
    if not args.output and not args.output_dir:
        raise ValueError("give --output-dir DIR (or -o FILE for a single input)")
    # Everything that can be checked before touching the disk is checked first,
    # so a bad configuration or model string leaves nothing behind.
    config = _load_config(args)
    reference = resolve_psf(args.reference)
    psf = resolve_psf(args.psf) if args.psf else None
    task = ModelPsfMatchTask(config, backend=args.backend)
    if args.output_dir and not os.path.isdir(args.output_dir):
        os.makedirs(args.output_dir, exist_ok=True)
    outputs, lock = _plan_serial_outputs(args)
    rows = []
    t_start = time.perf_counter()
    bar = _progress_bar(len(args.exposures), not args.quiet and len(args.exposures) > 1)
    if bar is not None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines go above the bar instead of through it.
        redirect = logging_redirect_tqdm(loggers=[log])
    else:
        redirect = contextlib.nullcontext()

    def report(line):
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    with lock, redirect:
        for path, out in zip(args.exposures, outputs):
            if bar is not None:
                bar.set_postfix_str(f"{os.path.basename(path)} ({_counts(rows)})")
            # As on a Dask worker: never raises; skips an output that is this run's,
            # reports any other existing one as a conflict.
            row = match_one(path, reference, out, psf=psf, kernel_sum=args.kernel_sum,
                            save_kernel=args.save_kernel, plots_dir=args.plots,
                            overwrite=args.overwrite, task=task,
                            compress=args.compress or None,
                            psf_from_header=args.psf_from_header)
            if row["status"] in ("failed", "conflict"):
                log.debug("%s on %s:\n%s", row["status"], path, row.pop("traceback", ""))
                report(f"gpumatch: {path}: {row['status']}: {row['error']}")
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_postfix_str(_counts(rows))
            bar.close()
    if args.output_dir:
        write_run_summary(os.path.join(args.output_dir, SUMMARY_NAME), rows,
                          reference=args.reference, psf=args.psf, backend=task.backend,
                          kernel_sum=args.kernel_sum, config=config,
                          seconds=time.perf_counter() - t_start)
    if not args.quiet or not _all_good(rows):
        print(format_summary(rows, fwhm_ratio=True))
    return _exit_code(rows)


def build_parser():
    from . import __version__
    from .backends import backend_names

    p = argparse.ArgumentParser(
        prog="gpumatch",
        description="PSF-match astronomical exposures to a reference PSF model "
                    "(Alard-Lupton spatial kernels, GPU or CPU).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gpumatch {__version__}")
    # -v/-q are accepted before the subcommand as well as after it; the
    # subcommand's copies use other names so that neither overwrites the other.
    p.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_top",
                   help="more log output (repeat for debug output and tracebacks)")
    p.add_argument("-q", "--quiet", action="store_true", dest="quiet_top",
                   help="only warnings and errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", parents=[common], help="run the documented example on built-in fake data")
    ex.add_argument("--backend", default="auto", choices=backend_names())
    ex.add_argument("--science", help="science exposure FITS (its PSF is matched)")
    ex.add_argument("--template", help="template exposure FITS (its PSF is the reference)")
    ex.add_argument("--debug", metavar="DIR", help="save diagnostic figures in DIR")
    ex.add_argument("--output", metavar="FILE", help="write the matched exposure (FITS)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ex.add_argument("--psf-from-header", action="store_true",
                    help="read the PSF file a PSF_FILE card of --science/--template names")
    ex.set_defaults(func=_cmd_example)

    m = sub.add_parser("match", parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="PSF-match FITS exposures to a reference PSF model")
    m.add_argument("exposures", nargs="+", metavar="EXPOSURE.fits", help="input exposures")
    m.add_argument("--reference", required=True, metavar="MODEL",
                   help="reference PSF: e.g. 'gaussian:fwhm=7.7,size=23', "
                        "'doublegaussian:sigma1=3.27,sigma2=8.175,b=0.1,size=23', "
                        "'psfex:FILE.psf' or a PSF file")
    m.add_argument("--psf", metavar="MODEL",
                   help="PSF of the exposures (same forms); default: the PSF archived in an "
                        "LSST file, else the file lying next to each exposure (<stem>.psf)")
    m.add_argument("--psf-from-header", action="store_true",
                   help="read the PSF file named by each exposure's PSF_FILE/PSFFILE/PSFMODEL "
                        "card (relative paths inside the exposure's directory only)")
    m.add_argument("--output-dir", metavar="DIR", help="write outputs here (same file names)")
    m.add_argument("-o", "--output", metavar="FILE", help="output file for a single input")
    m.add_argument("--config", metavar="FILE.toml",
                   help="configuration: ModelPsfMatchConfig field names (see the README), at "
                        "top level or in a [config] table")
    m.add_argument("--lsst-defaults", action="store_true",
                   help="use LSST's default configuration (and --set) instead of the settings "
                        "recommended for each exposure's PSF and the reference (the default "
                        "without --config)")
    m.add_argument("--set", action="append", metavar="FIELD=VALUE", default=[],
                   help="override one configuration field (repeatable)")
    m.add_argument("--backend", default="auto", choices=backend_names())
    m.add_argument("--kernel-sum", type=float, default=1.0, help="kernel sum (default 1)")
    m.add_argument("--save-kernel", action="store_true",
                   help="also write each solved kernel as <output>.kernel.fits")
    m.add_argument("--plots", metavar="DIR", help="save diagnostic figures in DIR")
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.add_argument("--compress", action="store_true",
                   help="tile-compress the outputs losslessly (the default for names ending .fz)")
    m.add_argument("--scheduler", metavar="ADDRESS",
                   help="run one Dask task per file on this scheduler (e.g. tcp://host:8786); "
                        "outputs whose provenance is this run's are skipped, other existing "
                        "ones are conflicts; a JSON summary is written in --output-dir")
    m.add_argument("--workers", type=int, metavar="N",
                   help="run on a local Dask cluster of N worker processes (as --scheduler; "
                        "it listens on 127.0.0.1 only, with TLS)")
    m.add_argument("--task-timeout", type=float, metavar="SECONDS",
                   help="with --workers/--scheduler: report a file as failed when it runs longer "
                        "than this, and go on with the others")
    m.add_argument("--dashboard", action="store_true",
                   help="with --workers: serve the Dask dashboard on 127.0.0.1:8787")
    m.set_defaults(func=_cmd_match)

    st = sub.add_parser(
        "selftest", parents=[common],
        help="check a backend against NumPy and brute-force answers (run first on a new GPU node)",
        description="Match a known exposure on the backend and on NumPy, compare every stage at "
                    "1e-5 relative, print the device, the agreement per stage and the timings; "
                    "exit 0 when all agree, 1 on a disagreement, 2 when the backend is unusable.")
    st.add_argument("--backend", default="auto", choices=backend_names(),
                    help="backend to check (auto: the GPU when usable, else NumPy)")
    st.add_argument("--case", default="large", choices=("small", "large"),
                    help="workload: small (256 px, the automatic check) or large (1024 px, "
                         "production configuration; default)")
    st.set_defaults(func=_cmd_selftest)
    return p


EPILOG = """\
examples:
  gpumatch match visit/*.fits --reference "gaussian:fwhm=7.7,size=23" --output-dir matched/
  gpumatch match calexp.fits --reference "gaussian:fwhm=6,size=25" -o matched.fits
  gpumatch match calexp.fits --psf calexp.psf --reference "gaussian:fwhm=7.7" -o matched.fits
  gpumatch match exposures/*.fits --psf model.psf --reference ref.fits \\
      --output-dir matched/ --workers 8 --task-timeout 600
  gpumatch selftest --backend cupy
  gpumatch example --backend numpy

PSF models (--psf, --reference), or a file named by its extension: FILE.psf
(PSFEx), FILE.fits (PSF image), FILE.piff (Piff):
""" + psf_forms_help() + "\n\n" + EXIT_CODES_HELP + """
  130  interrupted (Ctrl-C); finished outputs are complete, rerun to resume
"""


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose + args.verbose_top
    _setup_logging(verbose, args.quiet or args.quiet_top)
    args.verbose, args.quiet = verbose, args.quiet or args.quiet_top
    from .errors import GpumatchError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("gpumatch: interrupted; outputs already written are complete (rerun to resume)",
              file=sys.stderr)
        return 130
    except (GpumatchError, OSError, ValueError, ImportError) as exc:
        print(f"gpumatch: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a failure the checks above did not foresee: still one line
        log.debug("unexpected error", exc_info=True)
        print(f"gpumatch: error: {_one_line(exc)} (run with -vv for the traceback)",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
