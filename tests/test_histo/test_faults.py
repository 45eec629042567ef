"""Faults around a run rather than in its input: cancelling, Ctrl-C, output folders that
cannot hold results, a disk that fills up while results are written."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from dask.callbacks import Callback

from histo.batch import run_batch
from histo.config import AnalysisConfig
from histo.errors import Cancelled
from histo.pipeline import iter_analyze_slide
from histo.synthetic import generate_slide

# Small chunks: many of them, so that a cancel has pending chunks to stop.
MANY_CHUNKS = AnalysisConfig(method="classical", chunk_size_px=256)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "lung_a.ome.tif"
    return generate_slide(out, size_px=(3072, 3072), group="IAV", dpi=15, seed=31, labels=False)


class _ChunkStarts(Callback):
    """Counts the chunk tasks Dask's local scheduler starts (Dask's own callback API)."""

    def __init__(self):
        super().__init__()
        self.started = 0

    def _pretask(self, key, dsk, state):
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith("_chunk_task"):
            self.started += 1


def test_cancel_starts_no_further_chunk(slide):
    cancel = threading.Event()
    gen = iter_analyze_slide(slide.path, MANY_CHUNKS, threads=2, cancel=cancel)
    with _ChunkStarts() as starts:
        total = None
        with pytest.raises(Cancelled):
            while True:
                done, total, _ = next(gen)
                if done >= 1:
                    cancel.set()
                    at_cancel = starts.started
        time.sleep(1.0)  # chunks still running when it was cancelled may finish
    assert total >= 60
    # At most the chunks already handed to the 2 threads (and one the count may have seen
    # just before the scheduler refused it) start after the cancel.
    assert starts.started - at_cancel <= 3
    assert starts.started < total / 2


def test_closing_the_batch_generator_cancels_and_writes_nothing(slide, tmp_path):
    from histo.batch import iter_run_batch

    gen = iter_run_batch([slide.path], tmp_path / "out", MANY_CHUNKS)
    with _ChunkStarts() as starts:
        for event in gen:
            if event.kind == "chunks" and event.done >= 1:
                break
        at_close = starts.started
        gen.close()  # what napari's Cancel and Ctrl-C do to the batch
        time.sleep(1.5)
    assert starts.started - at_close <= 3
    assert not (tmp_path / "out" / "lung_a" / "summary.json").exists()


def test_a_failure_after_cancelling_is_a_cancelled_slide_not_an_error(slide, tmp_path, caplog):
    """Ctrl-C ends the interpreter while a chunk may still be computing in the slide's thread;
    what then fails there (Dask: "cannot schedule new futures after interpreter shutdown") is
    a consequence of stopping: the slide is cancelled, nothing is written, and no traceback
    is logged. The consumer's callback stands in for the interpreter going away."""
    from histo.batch import _run_one

    cancel = threading.Event()

    def emit(event):
        cancel.set()  # the user stopped the run ...
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    out = tmp_path / "out"
    with caplog.at_level("ERROR", logger="histo.batch"):
        outcome = _run_one(0, slide.path, out, MANY_CHUNKS, True, {}, emit=emit, cancel=cancel)
    assert not outcome.ok and "cancelled; nothing written" in outcome.message
    assert not caplog.records
    assert not (out / "lung_a" / "summary.json").exists()
    # The same failure in a run nobody cancelled is an error, reported with its traceback.
    with caplog.at_level("ERROR", logger="histo.batch"):
        failed = _run_one(
            0, slide.path, out, MANY_CHUNKS, True, {}, emit=emit, cancel=threading.Event()
        )
    assert not failed.ok and "RuntimeError" in failed.message
    assert any("unexpected error" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cancel_releases_the_pending_chunks_of_an_external_cluster(slide):
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        cancel = threading.Event()
        gen = iter_analyze_slide(
            slide.path, MANY_CHUNKS, scheduler=cluster.scheduler_address, cancel=cancel
        )
        with pytest.raises(Cancelled):
            while True:
                done, total, _ = next(gen)
                if done >= 1:
                    cancel.set()
        with Client(cluster) as client:
            left = None
            for _ in range(50):  # the scheduler forgets cancelled tasks within moments
                left = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
                if left == 0:
                    break
                time.sleep(0.2)
    assert total >= 60
    assert left == 0


def test_ctrl_c_stops_the_cli_and_leaves_nothing_that_looks_complete(slide, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histo",
            "run",
            str(slide.path),
            "--out",
            str(out),
            "--method",
            "classical",
            "--chunk-size",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: pytest-xdist workers ignore SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Wait until chunks are being analysed (their progress bar appears).
    seen = ""
    while "chunk" not in seen and proc.poll() is None:
        seen += proc.stderr.read(1)
    assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "lung_a" / "summary.json").exists()


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "histo", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_out_that_cannot_be_a_folder_is_one_line_naming_it(slide, tmp_path, where):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    out = afile if where == "file" else afile / "results"
    proc = _run_cli("run", slide.path, "--out", out, "--method", "classical")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--out" in lines[0], proc.stderr
    assert afile.read_text() == "not a folder"


def test_a_full_disk_leaves_no_summary_and_the_batch_goes_on(slide, tmp_path, monkeypatch):
    second = generate_slide(
        tmp_path / "lung_b.ome.tif", size_px=(1024, 1024), group="PBS", dpi=15, seed=32
    )
    real_to_csv = pd.DataFrame.to_csv

    def to_csv_on_a_full_disk(self, path, *args, **kwargs):
        # The disk holding lung_a's results fills up while its lesion table is written.
        if "lung_a" in str(path) and ".lesions.csv" in str(path):
            with open(path, "w") as f:
                f.write("lesion_id,")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv_on_a_full_disk)
    out = tmp_path / "out"
    config = AnalysisConfig(method="classical", chunk_size_px=2048)
    first, after = run_batch([slide.path, second.path], out, config)
    assert not first.ok
    assert str(out / "lung_a") in first.message and "No space left" in first.message
    assert "--out" in first.message
    assert not (out / "lung_a" / "summary.json").exists()
    assert not [p.name for p in (out / "lung_a").iterdir() if p.name.endswith(".tmp")]
    assert after.ok and (out / "lung_b" / "summary.json").exists()


# -- fallbacks: whatever ran otherwise than asked is recorded and shown ---------------------


def test_a_gpu_out_of_memory_fallback_is_in_the_summary_and_the_cli_table(
    tmp_path, monkeypatch, capsys
):
    import torch

    from histo.cli import main

    small = generate_slide(
        tmp_path / "lung_c.ome.tif", size_px=(768, 768), group="IAV", dpi=15, seed=33
    )
    real_sigmoid = torch.sigmoid
    calls = {"n": 0}

    def sigmoid_out_of_memory_once(x, *args, **kwargs):
        # The first batch of the network does not fit on the (simulated) GPU.
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sigmoid(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sigmoid", sigmoid_out_of_memory_once)
    out = tmp_path / "out"
    # PyTorch's path: the one a GPU runs (on the CPU ONNX Runtime runs by default).
    args = ["run", str(small.path), "--out", str(out), "--chunk-size", "512"]
    assert main([*args, "--runtime", "torch"]) == 0
    summary = json.loads((out / "lung_c" / "summary.json").read_text())
    (note,) = summary["fallbacks"]
    assert note.startswith("GPU out of memory with batch") and "(1 of" in note
    shown = capsys.readouterr().out
    assert f"lung_c.ome.tif: ran otherwise than asked: {note}" in shown


def test_a_memory_guess_is_recorded_for_every_slide_of_the_batch(
    slide, tmp_path, monkeypatch, capsys
):
    import builtins
    import os

    from histo.cohort import analyze_cohort

    second = generate_slide(
        tmp_path / "lung_d.ome.tif", size_px=(1024, 1024), group="PBS", dpi=15, seed=34
    )
    real_open = builtins.open

    def open_without_meminfo(file, *args, **kwargs):
        if str(file) == "/proc/meminfo":
            raise OSError("not mounted (simulated)")
        return real_open(file, *args, **kwargs)

    def no_sysconf(name):
        raise ValueError(f"unknown {name} (simulated)")

    monkeypatch.setattr(builtins, "open", open_without_meminfo)
    monkeypatch.setattr(os, "sysconf", no_sysconf)
    out = tmp_path / "out"
    outcomes = run_batch(
        [slide.path, second.path], out, AnalysisConfig(method="classical"), parallel=2
    )
    for o in outcomes:
        assert o.ok
        summary = json.loads((o.out_dir / "summary.json").read_text())
        assert any("free memory could not be read" in f for f in summary["fallbacks"])
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "slide,mouse,group,dpi,section\n"
        f"{slide.path.name},m1,IAV,15,1\n{second.path.name},m2,PBS,15,1\n"
    )
    cohort = analyze_cohort(sheet, out, n_boot=100)
    flagged = [w for w in cohort.warnings if "free memory could not be read" in w]
    assert len(flagged) == 2  # one per section, in the report's warnings
