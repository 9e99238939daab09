"""Many files on a Dask cluster: :func:`match_files`.

One Dask task per file reads the exposure, matches it and writes the result
atomically (:func:`gpumatch.pipeline.match_file`). The backend is resolved on
the worker, so workers with a GPU use it (``backend="auto"``) and a
``dask-cuda`` cluster, one worker per GPU, works unchanged.

Resuming and failures
---------------------
An output is *complete* (see :func:`output_complete`) when it is a FITS file
with the ``IMAGE``, ``MASK`` and ``VARIANCE`` extensions of one shape, the
completion card ``GPM_KSUM`` in its primary header (written by gpumatch with
the solved kernel) and, when ``verify_outputs`` is True, checksums that
verify. Outputs are written to a temporary file in the output directory and
renamed into place only when whole, so a file at an output path was finished
by gpumatch; the checks above guard against files put there by anything else.

- A complete output is skipped (``status "skipped"``) unless ``overwrite``,
  so a run that was interrupted resumes where it stopped, but only when its
  provenance says it is this run's result: the same input (SHA-256 of the
  file), reference PSF, configuration and kernel sum
  (:func:`gpumatch.pipeline.output_conflict`). Any other file at an output
  path (another input's output, one made with another reference or
  configuration, an incomplete or foreign file) is left alone and reported
  with the reason (``status "conflict"``); ``overwrite`` recomputes it.
- A worker killed mid-run loses only the file it was writing: Dask runs that
  task again on another worker, and no partial file appears at the output
  path. The killed writer's temporary file (``.NAME.*.tmp.fits`` beside the
  output) is removed by the task that next handles that output, and by a sweep
  at the end of the run.
- A failing file is reported with its error (``status "failed"``) and does not
  stop the others.

The summary of every file (status, error, seconds, kernel sum, condition
number, residual, worker, backend and, when the task reports them, the
verdict and the noise variance gain) is written atomically as JSON next to the
outputs (:data:`SUMMARY_NAME`). The client and the workers must see the
output directory at the same path (a shared file system). A run holds the
output directory's lock (:func:`gpumatch.io.rundir.run_lock`) from start to
end, so a second run into the same directory is refused, and inputs whose
outputs (or ``--save-kernel`` files, or the summary) would share a name are
refused before any work.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import math
import numbers
import os
import pickle
import socket
import sys
import time
import traceback

from ._warnings import recorded

log = logging.getLogger("gpumatch")

__all__ = ["match_files", "match_one", "local_cluster", "output_complete", "stale_temporaries",
           "SUMMARY_NAME", "COMPLETION_CARD", "format_summary", "write_run_summary"]

#: File name of the JSON summary written in the output directory.
SUMMARY_NAME = "gpumatch_summary.json"
#: Primary-header card that gpumatch writes with every matched exposure.
COMPLETION_CARD = "GPM_KSUM"
_PLANES = ("IMAGE", "MASK", "VARIANCE")
#: Statuses of a file in a run; the last two make the run's exit code non-zero.
_STATUSES = ("ok", "skipped", "conflict", "failed")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def _tune_malloc():
    """Undo the cost of Dask's ``MALLOC_TRIM_THRESHOLD_`` in this worker process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
    also freezes glibc's mmap threshold at 128 KiB: every large temporary array
    is then a fresh ``mmap`` whose pages fault in one by one, and applying a
    kernel to a 2048x2048 exposure takes 2.5x as long (measured: 7.0 s against
    2.7 s, most of it system time). Fixed thresholds (mmap 32 MiB, the largest
    glibc allows; trim 256 MiB) give the speed back and still return memory
    to the system beyond 256 MiB of free heap. Linux/glibc only; once per process.
    """
    global _malloc_tuned
    if _malloc_tuned or "MALLOC_TRIM_THRESHOLD_" not in os.environ \
            or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    except (OSError, AttributeError):  # not glibc
        pass


def _require_dask():
    try:
        import importlib

        importlib.import_module("distributed")
    except ImportError as exc:
        raise ImportError(
            "gpumatch.distributed needs Dask: pip install 'gpumatch[distributed]' "
            f"(or pip install 'dask[distributed]') ({exc})") from None


# -- outputs ------------------------------------------------------------------------


def output_complete(path, verify_checksums=True):
    """Whether ``path`` is a complete gpumatch output.

    Returns
    -------
    (bool, str)
        ``(True, "")``, or ``(False, reason)``.
    """
    ok, why, _ = _inspect_output(path, verify_checksums)
    return ok, why


def _inspect_output(path, verify):
    """:func:`output_complete` of ``path`` (checksums when ``verify``), reading it once.

    Returns
    -------
    (bool, str, astropy.io.fits.Header or None)
        As :func:`output_complete`, and the primary header when the file
        could be read.
    """
    from astropy.io import fits

    p = os.fspath(path)
    if not os.path.isfile(p):
        return False, "no such file", None
    size = os.path.getsize(p)
    try:
        # Only the headers are read under the process-wide warnings lock (astropy
        # reports a header it has to fix, or a file shorter than its headers say,
        # by warnings); the data are read after it, for the checksums, which are
        # checked by return value, so other threads of the worker are not held up.
        with recorded() as caught:
            hdul = fits.open(p, memmap=False, lazy_load_hdus=False)
        with hdul:
            roles = {}
            end = 0
            for i, hdu in enumerate(hdul):
                info = hdul.fileinfo(i)
                end = max(end, info["datLoc"] + info["datSpan"])
                name = str(hdu.header.get("EXTTYPE", hdu.header.get("EXTNAME", ""))).upper()
                if name in _PLANES:
                    roles[name] = tuple(hdu.header.get(f"NAXIS{j}", 0)
                                        for j in range(1, hdu.header.get("NAXIS", 0) + 1))
            primary = hdul[0].header
            has_card = COMPLETION_CARD in primary
            bad = [str(w.message).strip() for w in caught
                   if "verification failed" in str(w.message) or "truncated" in str(w.message)
                   or "Error validating header" in str(w.message)]
            if verify and not bad and end <= size:
                bad = [f"checksum verification failed for HDU {i}"
                       for i, hdu in enumerate(hdul)
                       if hdu.verify_checksum() == 0 or hdu.verify_datasum() == 0]
    except Exception as exc:
        return False, f"not a readable FITS file ({exc.__class__.__name__}: {exc})", None
    if bad:
        return False, bad[0].splitlines()[0], primary
    missing = [n for n in _PLANES if n not in roles]
    if missing:
        return False, f"no {', '.join(missing)} extension", primary
    shapes = set(roles.values())
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return False, f"planes of different or non-2-d shapes {roles}", primary
    if end > size:
        return False, f"truncated ({size} bytes, {end} expected)", primary
    if not has_card:
        return False, f"no {COMPLETION_CARD} card (not written by gpumatch match)", primary
    return True, "", primary


def stale_temporaries(output):
    """Temporary files that an interrupted atomic write of ``output`` left behind."""
    directory = os.path.dirname(os.path.abspath(output))
    stem = glob.escape(os.path.basename(output))
    found = glob.glob(os.path.join(directory, f".{stem}.*.tmp*"))
    kernel = os.path.splitext(os.path.basename(output))[0] + ".kernel.fits"
    found += glob.glob(os.path.join(directory, f".{glob.escape(kernel)}.*.tmp*"))
    return sorted(found)


def _remove_stale(output):
    """Remove the temporaries an interrupted write of ``output`` left, sparing those
    of a live writer on this host (its write may be in flight)."""
    from .io._atomic import owner_alive

    removed = []
    for p in stale_temporaries(output):
        if owner_alive(p):
            log.info("%s: temporary of a live process, left in place", p)
            continue
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d stale temporary file(s) of %s", len(removed), output)
    return removed


def _header_summary(header):
    """The summary fields gpumatch wrote in an output's primary ``header``."""
    out = {}
    for key, name in (("GPM_KSUM", "kernel_sum"), ("GPM_COND", "condition_number"),
                      ("GPM_RESL2", "residual_l2_max")):
        if key in header:
            out[name] = float(header[key])
    from .io.fits import header_to_meta
    from .pipeline import VERDICT_FIELDS

    cards = header_to_meta(header)  # decodes the JSON of structured values
    out.update({row: cards[card] for row, (_, card) in VERDICT_FIELDS.items() if card in cards})
    return out


def _existing_output(path, output, reference, psf, config, kernel_sum, verify):
    """``(status, error, header)`` for an existing ``output``: may this run keep it?

    ``("skipped", None, header)`` when it is a complete gpumatch output whose
    provenance matches this run, else ``("conflict", one line, header)``.
    """
    from .pipeline import output_conflict

    complete, why, header = _inspect_output(output, verify)
    if not complete:
        return ("conflict", f"{output}: exists but is not a complete gpumatch output ({why}); "
                "remove it or pass overwrite=True (--overwrite) to replace it", header)
    reason = output_conflict(output, path, reference, config, kernel_sum, psf)
    if reason:
        return ("conflict", f"{output}: exists but {reason}; pass overwrite=True (--overwrite) "
                "to recompute it", header)
    return "skipped", None, header


# -- one file (runs on a worker) -------------------------------------------------------


def match_one(path, reference, output, psf=None, config=None, backend="auto", kernel_sum=1.0,
              overwrite=False, save_kernel=False, plots_dir=None, verify_outputs=True,
              tune_malloc=False, task=None, compress=None, psf_from_header=False):
    """Match one file unless its output is this run's already; never raises.

    This is the task :func:`match_files` runs on the workers, and what the
    serial ``gpumatch match`` runs per file (with its ``task``, whose
    configuration and backend then stand for ``config`` and ``backend``).

    Returns
    -------
    dict
        ``input``, ``output``, ``status`` (``"ok"``, ``"skipped"``,
        ``"conflict"`` or ``"failed"``), ``error`` (None or one line),
        ``seconds``, ``worker``, ``backend`` and, when known, ``kernel_sum``, ``condition_number``,
        ``residual_l2_max`` and the other fields of
        :func:`gpumatch.pipeline.match_file`'s summary.
    """
    from .pipeline import check_output, match_file

    if tune_malloc:
        _tune_malloc()
    t0 = time.perf_counter()
    row = {"input": path, "output": output, "status": "failed", "error": None,
           "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        from .backend import resolve_backend

        if task is not None:
            config, backend = task.config, task.backend
        row["backend"] = resolve_backend(backend)
        check_output(path, output, overwrite=True)  # not the input itself; directory exists
        _remove_stale(output)
        if os.path.lexists(output) and not overwrite:
            row["status"], row["error"], header = _existing_output(
                path, output, reference, psf, config, kernel_sum, verify_outputs)
            if row["status"] == "skipped":
                row.update(_header_summary(header))
        else:
            # The verdict goes into the row (and the summary), not a worker's warning.
            summary = match_file(path, reference, output, psf=psf, config=config,
                                 backend=row["backend"], kernel_sum=kernel_sum,
                                 save_kernel=save_kernel, plots_dir=plots_dir,
                                 overwrite=overwrite, task=task, compress=compress,
                                 on_poor_match="ignore", psf_from_header=psf_from_header)
            row.update(summary)
            row["status"] = "ok"
    except Exception as exc:
        row["status"] = "failed"
        text = " ".join(str(exc).split())  # one line
        row["error"] = f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
        row["traceback"] = traceback.format_exc(limit=8)
    row["seconds"] = time.perf_counter() - t0
    return row


# -- many files ---------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "nan": keep the JSON standard
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


def _write_summary(path, document):
    from .io._atomic import atomic_write

    text = json.dumps(_jsonable(document), indent=2, allow_nan=False)

    def writer(tmp):
        with open(tmp, "w") as fh:
            fh.write(text + "\n")

    atomic_write(path, writer, overwrite=True, what="summary")
    return path


def format_summary(rows, fwhm_ratio=False):
    """A plain-text table of :func:`match_files` rows, then one line per failure.

    ``fwhm_ratio`` adds a column of the median matched/reference FWHM ratio
    (``fwhm_ratio_median``, known for files matched in this run). A match
    whose verdict is not good is shown ``POOR`` or ``UNUSABLE`` and its
    reason is listed after the failures.
    """
    psf_col = any(r.get("psf_source") for r in rows)  # where each file's PSF came from
    head = ("input", "status", "kernel sum", "cond", "resid L2 max") \
        + (("FWHM ratio",) if fwhm_ratio else ()) + ("s",) + (("PSF",) if psf_col else ())
    data = []
    for r in rows:
        def num(key, fmt, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, numbers.Real) and not isinstance(v, bool) \
                else ""
        data.append((os.path.basename(r["input"]), _shown_status(r),
                     num("kernel_sum", ".5f"), num("condition_number", ".3g"),
                     num("residual_l2_max", ".2e"))
                    + ((num("fwhm_ratio_median", ".4f"),) if fwhm_ratio else ())
                    + (num("seconds", ".2f"),)
                    + ((str(r.get("psf_source") or ""),) if psf_col else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *data)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines.extend(fmt.format(*d) for d in data)
    lines.extend(f"{r['status'].upper()} {r['input']}: {r['error']}" for r in rows
                 if r["status"] in ("failed", "conflict"))
    lines.extend(f"{_shown_status(r)} {r['input']}: {r['verdict_reason']}" for r in rows
                 if r["status"] not in ("failed", "conflict") and r.get("verdict") in VERDICT_WORDS
                 and r.get("verdict_reason"))
    return "\n".join(lines)


#: How a row whose match is not good is shown: ``FAILED`` stays for errors
#: (nothing written), so a written output with no valid pixel is ``UNUSABLE``.
VERDICT_WORDS = {"poor": "POOR", "failed": "UNUSABLE"}


def _shown_status(row):
    """The status column of ``row``: FAILED (an error), POOR, UNUSABLE, ok or skipped."""
    if row["status"] == "failed":
        return "FAILED"
    return VERDICT_WORDS.get(row.get("verdict"), row["status"])


def _progress_bar(total, enabled):
    """A tqdm bar on stderr, or None when disabled (or tqdm is missing)."""
    if not enabled or not sys.stderr.isatty():  # no carriage returns in log files
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="file", dynamic_ncols=True, file=sys.stderr)


#: Where a local cluster's dashboard listens when asked for (loopback only).
LOCAL_DASHBOARD = "127.0.0.1:8787"


def local_cluster(n_workers=None, threads_per_worker=1, memory_limit="auto", dashboard=False):
    """A Dask ``LocalCluster`` that only this user can reach.

    Every server (scheduler, nannies, workers and their HTTP endpoints)
    listens on 127.0.0.1 only, and all Dask traffic uses TLS with a temporary
    certificate made for this cluster (``distributed.security.Security.temporary``),
    so another user of a shared machine can neither attach a client (and
    run code as this user) nor read the cluster's state. The dashboard (which
    shows file names, logs and call stacks) is off unless ``dashboard``, and
    then on :data:`LOCAL_DASHBOARD`.

    Raises
    ------
    ImportError
        The ``cryptography`` package (for the certificate) is missing.
    """
    from distributed import LocalCluster
    from distributed.security import Security

    try:
        security = Security.temporary()
    except ImportError:
        raise ImportError(
            "a local Dask cluster is secured with TLS, which needs the cryptography package: "
            "pip install 'gpumatch[distributed]' (or pip install cryptography)") from None
    import dask

    # Every server also runs an HTTP server, without TLS or authentication, that
    # any local user can reach on the loopback; its pages (worker information,
    # call stacks, metrics) are turned off unless the dashboard is asked for,
    # and it listens at a free port, not 0.0.0.0:8787. A fresh list: the
    # scheduler appends to the configured one.
    routes = {"distributed.worker.http.routes": []}
    if not dashboard:
        routes["distributed.scheduler.http.routes"] = []
    with dask.config.set(routes):
        return LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
            env=worker_environment(n_workers, threads_per_worker),
            memory_limit=memory_limit, host="127.0.0.1", protocol="tls://", security=security,
            dashboard_address=LOCAL_DASHBOARD if dashboard else None,
            scheduler_kwargs={"dashboard": bool(dashboard),
                              "dashboard_address": LOCAL_DASHBOARD if dashboard else "127.0.0.1:0"})


def worker_environment(n_workers, threads_per_worker=1):
    """Environment of a local cluster's worker processes: ``GPUMATCH_THREADS``
    shares the cores among them (each task's host stages would otherwise start
    a thread per core in every process: workers x cores threads), unless the
    user set it.

    Parameters
    ----------
    n_workers : int or None
        Worker processes (None: as many as Dask starts, one per core with
        one thread each).
    threads_per_worker : int
        Dask threads (tasks at once) per worker.

    Returns
    -------
    dict
        Variables to set in each worker process.
    """
    if os.environ.get("GPUMATCH_THREADS", "").strip():
        return {}
    from .threads import host_threads

    tasks = max(1, (n_workers or host_threads()) * max(1, int(threads_per_worker)))
    return {"GPUMATCH_THREADS": str(max(1, host_threads() // tasks))}


def _open_client(client, n_workers, threads_per_worker, memory_limit, dashboard=False):
    """``(client, owned)``: the given client, one for an address, or a new local cluster."""
    from distributed import Client

    if client is None:
        cluster = local_cluster(n_workers, threads_per_worker, memory_limit, dashboard)
        log.info("local Dask cluster: %d workers at %s%s", len(cluster.workers),
                 cluster.scheduler_address,
                 f", dashboard {cluster.dashboard_link}" if dashboard else "")
        return Client(cluster, security=cluster.security), True
    if isinstance(client, str):
        return Client(client), True
    return client, False


def _for_workers(spec):
    """``spec`` parsed (a PSF model), to send to the workers instead of its string.

    A string that names a file (``psfex:PATH``) is then read once, here, not
    once per task. A model that does not pickle is sent as ``spec`` itself and
    parsed again on each worker.
    """
    from .pipeline import resolve_psf

    model = resolve_psf(spec)  # fails here, once, for a spec that cannot be parsed
    if model is spec:
        return spec
    try:
        pickle.dumps(model)
    except Exception as exc:
        log.debug("PSF model %r does not pickle (%s); each task parses it", spec, exc)
        return spec
    return model


def _completed(client, futures, task_timeout=None, poll=None):
    """Yield ``(future, timed_out)`` as ``futures`` finish, or run past ``task_timeout``.

    A task's time counts from when the scheduler first reports it processing
    on a worker (seen by polling, every ``poll`` seconds), so tasks waiting
    for a free worker are not timed out. A timed-out task is cancelled; a
    worker thread stuck in a system call may stay stuck, but the batch ends.
    """
    import asyncio

    from distributed import as_completed, wait

    if not task_timeout:
        for fut in as_completed(list(futures)):
            yield fut, False
        return
    poll = poll or min(1.0, task_timeout / 4)
    pending = set(futures)
    started = {}
    while pending:
        try:
            done, _ = wait(list(pending), timeout=poll, return_when="FIRST_COMPLETED")
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            done = set()
        for fut in done:
            pending.discard(fut)
            yield fut, False
        now = time.monotonic()
        processing = {k for keys in client.processing().values() for k in keys}
        for fut in list(pending):
            if fut.key in processing:
                started.setdefault(fut.key, now)
            if fut.key in started and now - started[fut.key] > task_timeout \
                    and fut.status not in ("finished", "error"):
                pending.discard(fut)
                fut.cancel()
                yield fut, True


def _close_client(client):
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def match_files(paths, reference, output_dir, client=None, psf=None, config=None,
                backend="auto", kernel_sum=1.0, overwrite=False, *, n_workers=None,
                threads_per_worker=1, memory_limit="auto", progress=True, save_kernel=False,
                plots_dir=None, verify_outputs=True, summary_name=SUMMARY_NAME,
                tune_malloc=True, psf_from_header=False, dashboard=False, task_timeout=None):
    """PSF-match many FITS files on a Dask cluster, one task per file.

    Parameters
    ----------
    paths : sequence of path
        Input exposures (FITS). Each output is ``output_dir/<file name>``.
    reference : Psf or str
        Reference PSF model or its string form (``"gaussian:fwhm=7.7,size=23"``).
    output_dir : path
        Created if needed; must be visible to the workers at the same path.
    client : distributed.Client or str, optional
        A client, or a scheduler address (``"tcp://host:8786"``). Default: a
        ``LocalCluster`` of ``n_workers`` processes, closed afterwards, that
        listens on 127.0.0.1 only and speaks TLS (see :func:`local_cluster`).
    psf : Psf or str, optional
        PSF of every exposure; default: the file lying next to each exposure
        (``<stem>.psf``) or, with ``psf_from_header``, named by its header.
    config : ModelPsfMatchConfig, optional
    backend : str
        ``"auto"`` or a registered backend (:func:`gpumatch.backend.backend_names`).
        Resolved on each worker: ``"auto"`` uses the worker's GPU if it has one.
    kernel_sum : float
    overwrite : bool
        Recompute and replace existing outputs. Default: an output whose
        provenance matches this run is skipped; any other existing file is
        reported as a conflict and left alone.
    n_workers, threads_per_worker, memory_limit :
        The local cluster's, when ``client`` is None (``n_workers`` None: one
        per core).
    progress : bool
        Show a progress bar (tqdm, on stderr).
    save_kernel, plots_dir :
        As ``gpumatch match --save-kernel`` and ``--plots``.
    verify_outputs : bool
        Verify the checksums of existing outputs before skipping them (reads
        them whole); False checks their headers and sizes only.
    summary_name : str or None
        JSON summary file in ``output_dir``; None writes none.
    tune_malloc : bool
        On workers started by a Dask nanny (Linux), raise glibc's mmap and trim
        thresholds once per worker process: Dask's ``MALLOC_TRIM_THRESHOLD_``
        otherwise makes matching 2.5x slower (see ``_tune_malloc``).
    task_timeout : float, optional
        Seconds a file may take once it has started on a worker; a file that
        takes longer is reported as failed (``TimeoutError``) and cancelled,
        and the batch goes on. Default: no limit.
    dashboard : bool
        Serve the local cluster's dashboard on 127.0.0.1:8787 (default: none).
    psf_from_header : bool
        Read the PSF file that an exposure's ``PSF_FILE``/``PSFFILE``/``PSFMODEL``
        card names (a relative path inside its directory only; see
        :func:`gpumatch.pipeline.find_psf`). Off by default: a header is data.

    Returns
    -------
    list of dict
        One row per input, in input order (see :func:`match_one`).
    """
    _require_dask()
    if task_timeout is not None and not float(task_timeout) > 0:
        raise ValueError(f"task_timeout={task_timeout!r} (--task-timeout): give a positive number "
                         "of seconds")

    from .config import ModelPsfMatchConfig
    from .io._atomic import check_output_path
    from .io.rundir import check_output_names, run_lock
    from .pipeline import kernel_path_for, output_path_for

    t_start = time.perf_counter()
    paths = [os.fspath(p) for p in paths]
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(config, dict):
        config = ModelPsfMatchConfig.from_dict(config)
    # Parsed on the client, once: a reference or PSF that cannot be parsed fails
    # here, and the tasks get the models (the summary keeps the given strings).
    reference_model = _for_workers(reference)
    psf_model = None if psf is None else _for_workers(psf)

    rows = [None] * len(paths)
    outputs = [output_path_for(p, output_dir) for p in paths]
    check_output_names(paths, outputs, [kernel_path_for(o) for o in outputs] if save_kernel else (),
                       os.path.join(output_dir, summary_name) if summary_name else None)
    if summary_name:  # a summary path that cannot be written is refused before the work
        check_output_path(os.path.join(output_dir, summary_name), True, "summary")
    jobs = list(range(len(paths)))
    with run_lock(output_dir):
        owned = False
        if jobs:
            client, owned = _open_client(client, n_workers, threads_per_worker, memory_limit,
                                         dashboard)
        bar = _progress_bar(len(paths), progress)
        futures = {}
        try:
            for i in jobs:
                fut = client.submit(match_one, paths[i], reference_model, outputs[i], psf=psf_model,
                                    config=config, backend=backend, kernel_sum=kernel_sum,
                                    overwrite=overwrite, save_kernel=save_kernel,
                                    plots_dir=plots_dir, verify_outputs=verify_outputs,
                                    tune_malloc=tune_malloc, psf_from_header=psf_from_header,
                                    pure=False, key=f"gpumatch-{os.path.basename(paths[i])}-{i}-"
                                                    f"{os.urandom(4).hex()}")
                futures[fut] = i
            for fut, timed_out in _completed(client, futures, task_timeout):
                i = futures[fut]
                try:
                    if timed_out:
                        raise TimeoutError(
                            f"{paths[i]}: not finished {task_timeout:g} s after it started "
                            "(--task-timeout); the input may be a FIFO, on a hung file system or "
                            "too large; check it, or raise --task-timeout")
                    row = fut.result()
                except Exception as exc:  # KilledWorker, a lost scheduler, ...
                    row = {"input": paths[i], "output": outputs[i], "status": "failed",
                           "error": f"{exc.__class__.__name__}: {exc}", "seconds": None}
                rows[i] = row
                if row["status"] in ("failed", "conflict"):
                    log.warning("%s: %s: %s", paths[i], row["status"], row["error"])
                if bar is not None:
                    done = [r["status"] for r in rows if r is not None]
                    bar.set_postfix_str(f"{os.path.basename(paths[i])} (ok {done.count('ok')}, "
                                        f"skipped {done.count('skipped')}, "
                                        f"conflict {done.count('conflict')}, "
                                        f"failed {done.count('failed')})")
                    bar.update(1)
                fut.release()
        except BaseException:
            # Interrupted (Ctrl-C): do not leave tasks running on someone else's cluster.
            if futures:
                client.cancel(list(futures))
            raise
        finally:
            if bar is not None:
                bar.close()
            if owned:
                _close_client(client)
        # Every task has ended: what temporary files remain belong to dead writers.
        for i in jobs:
            _remove_stale(outputs[i])

        if summary_name:
            write_run_summary(os.path.join(output_dir, summary_name), rows, reference=reference,
                              psf=psf, backend=backend, kernel_sum=kernel_sum, config=config,
                              seconds=time.perf_counter() - t_start)
        return rows


def write_run_summary(path, rows, *, reference, psf, backend, kernel_sum, config, seconds):
    """Write the JSON summary of a run (serial or Dask) atomically at ``path``.

    It holds the run's reference, PSF, backend, kernel sum and configuration,
    the number of files of each status (``files_ok``, ``files_skipped``,
    ``files_conflict``, ``files_failed``), the run's seconds and the
    ``rows`` (``files``).
    """
    from .config import ModelPsfMatchConfig

    counts = {s: sum(r["status"] == s for r in rows) for s in _STATUSES}
    return _write_summary(path, {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "reference": reference if isinstance(reference, str) else repr(reference),
        "psf": None if psf is None else (psf if isinstance(psf, str) else repr(psf)),
        "backend": backend,
        "kernel_sum": kernel_sum,
        "config": (config or ModelPsfMatchConfig()).to_dict(),
        "files_total": len(rows),
        **{f"files_{s}": counts[s] for s in _STATUSES},
        "seconds": seconds,
        "files": rows,
    })
