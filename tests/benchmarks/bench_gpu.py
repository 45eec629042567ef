"""Speed of the network on a CUDA GPU, and whether a GPU run finds the CPU's cells.

Run on demand on a machine with a CUDA GPU (never in CI)::

    python3 tests/benchmarks/bench_gpu.py [--size 8192x6144] [--repeats 3] [--write]

1. The benchmark slide of ``bench_network.py`` (generated infected lung, dpi 15, seed 3):
   decoding its full-resolution level once (the floor), then ``lungmets run`` screened on the
   GPU (the default: float16 autocast), screened with ``--precision float32``, dense
   (``--no-screen``) on the GPU, and screened on the same machine's CPU cores, each in its
   own process, `--repeats` times in a rotating order; medians. Throughput is megapixels of
   tissue (level 0) per second. While each GPU run goes, ``nvidia-smi`` samples the GPU's
   busy share (``utilization.gpu``, every 100 ms, process start and imports included) and
   its memory. Then the same slide analysed twice in this process (`analyze_slide`, as a
   batch does: CUDA started and the model loaded once), the second timed, on the GPU and
   the CPU.
2. The network alone on the GPU: 512-px tiles (4 channels) through the shipped network,
   batches of 4 and 16, float16 and float32, timed with CUDA events (megapixels of network
   input per second): what the GPU could take if the pipeline fed it without pause.
3. GPU against CPU: the cells of the benchmark slide (from the runs above) and of the
   held-out slides (``bench_network``'s seeds 90001+, analysed in this process) matched one
   to one within 0.5 um, the Ki67 calls of the matched cells, and the lesion table (cells
   and class of each lesion), for float16 and float32.

``--lines-out FILE`` writes the tables there as they come (so a run cut short leaves what
it measured); ``--write`` puts them into BENCHMARKS.md between the ``bench_gpu`` markers;
``--insert FILE`` puts a FILE written earlier (on another machine) there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    DECODE,
    HELD_OUT,
    held_out_slides,
    lesion_table,
    machine_line,
    measure,
    median_run,
    rotating,
    run_outputs,
    same_cells,
    synth_slide,
    write_section,
)

TITLE = "Network speed (GPU)"


class GpuSampler:
    """``nvidia-smi`` sampled every 100 ms in the background: busy share and memory."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._proc = None
        self._thread = None

    def __enter__(self):
        cmd = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=2)

    @property
    def busy(self) -> float:
        return float(np.mean([u for u, _ in self.samples])) if self.samples else float("nan")

    @property
    def peak_gb(self) -> float:
        return max((m for _, m in self.samples), default=float("nan")) / 1024


def _agreement_row(name: str, gpu, cpu) -> str:
    """One table row: the GPU run's (cells, lesions) against the CPU run's: cells matched one
    to one within 0.5 um, matched cells with another Ki67 call, and the lesion tables."""
    (cells_g, les_g), (cells_c, les_c) = gpu, cpu
    matched, n_g, n_c, ki67 = same_cells(cells_g, cells_c)
    same = lesion_table(les_g) == lesion_table(les_c)
    return (
        f"| {name} | {n_g} / {n_c} | {matched} ({matched / max(n_c, 1):.1%}) | {ki67} | "
        f"{len(les_g)} / {len(les_c)} | {'identical' if same else 'DIFFERENT'} |"
    )


def network_alone() -> list[str]:
    """Forward passes of the shipped network on the GPU alone, timed with CUDA events."""
    import torch

    from models import load_model

    model = load_model(None, "cuda")
    net = model.fast_net
    rows = []
    for batch in (4, 16):
        for amp in (True, False):
            x = torch.randn(batch, 4, 512, 512, device="cuda").contiguous(
                memory_format=torch.channels_last
            )
            flags = torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
            with torch.inference_mode(), flags, torch.autocast("cuda", enabled=amp):
                for _ in range(5):
                    net(x)
                torch.cuda.synchronize()
                times = []
                for _ in range(20):
                    s, e = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    s.record()
                    net(x)
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e) / 1000)
            sec = statistics.median(times)
            mpx = batch * 512 * 512 / 1e6 / sec
            rows.append(
                f"| {batch} | {'float16 (autocast)' if amp else 'float32'} | "
                f"{1000 * sec:.2f} | {mpx:.0f} |"
            )
    return [
        "",
        "The network alone on the GPU (512-px tiles of 4 channels, channels-last, fused; "
        "median of 20 passes timed with CUDA events after 5 warm-up passes):",
        "",
        "| batch | arithmetic | ms per pass | network-input Mpx/s |",
        "| --- | --- | ---: | ---: |",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--held-out-size", default="4096x3072")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--lines-out", type=Path, default=None)
    ap.add_argument("--insert", type=Path, default=None)
    # A dry run of the script's own code on a machine without a GPU ("cpu": every "GPU"
    # figure is then the CPU's, and the network-alone timing is left out).
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.insert is not None:
        write_section("bench_gpu", TITLE, args.insert.read_text().splitlines())
        return

    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if args.lines_out is not None:
            with open(args.lines_out, "a") as f:
                f.write(line + "\n")

    import torch

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "none (dry run on the CPU)"
    if args.lines_out is not None:
        args.lines_out.write_text("")
    py = sys.executable
    methods = [
        ("GPU screened (default)", ["--device", dev]),
        ("GPU screened, --precision float32", ["--device", dev, "--precision", "float32"]),
        ("GPU dense (--no-screen)", ["--device", dev, "--no-screen"]),
        ("CPU screened (this machine's cores)", ["--device", "cpu"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "lung.ome.tif"
        held_dir = tmp / "held"
        held_dir.mkdir()
        t = time.perf_counter()
        # The large slide in another process while this one draws the held-out ones.
        gen = threading.Thread(target=synth_slide, args=(slide, args.size, 3))
        gen.start()
        held = list(held_out_slides(held_dir, args.held_out_size))
        gen.join()
        if not slide.exists():
            raise SystemExit("generating the benchmark slide failed")
        print(f"slides generated in {time.perf_counter() - t:.0f} s", flush=True)
        # One run that shows its errors, and warms the disk cache and CUDA's caches.
        subprocess.run(
            [py, "-m", "histo", "run", str(slide), "--out", str(tmp / "warm"), "--device", dev],
            check=True,
        )
        emit(machine_line() + f" GPU: {gpu}, PyTorch {torch.__version__}.")
        emit(
            f"Command: `python3 tests/benchmarks/bench_gpu.py --size {args.size} --repeats "
            f"{args.repeats} --write` (the benchmark slide of `bench_network.py`; medians of "
            f"{args.repeats} runs in rotating order, each `lungmets run` a fresh process, so "
            "CUDA's start and the model's load are in every GPU time)."
        )
        times: dict[str, list] = {"decode": []}
        gpu_use: dict[str, list] = {}
        runs = {}
        order = rotating([("decode", None), *methods], args.repeats)
        for k, (rep, (name, extra)) in enumerate(order):
            if name == "decode":
                times["decode"].append(measure([py, "-c", DECODE, str(slide)])[:2])
                continue
            out = tmp / f"run{k}"
            cmd = [py, "-m", "histo", "run", str(slide), "--out", str(out), *extra]
            with GpuSampler() as sampler:
                m = measure(cmd)
            if m[2] != 0:
                raise SystemExit(f"{name}: lungmets run failed (exit {m[2]})")
            times.setdefault(name, []).append(m[:2])
            gpu_use.setdefault(name, []).append((sampler.busy, sampler.peak_gb))
            runs[name] = run_outputs(out, slide)
            print(name, rep, m, gpu_use[name][-1], flush=True)

        def med(name):
            return median_run(times[name])

        dec = med("decode")
        summary0 = runs[methods[0][0]][0]
        tissue_mpx = summary0["tissue_area_mm2"] * 1e6 / 0.25 / 1e6
        emit("")
        emit(
            f"Benchmark slide {args.size}: {tissue_mpx:.0f} Mpx of tissue at level 0, "
            f"{summary0['counts']['her2_cells']} HER2+ cells."
        )
        emit("")
        emit(
            "| | wall time (s) | peak memory, host (GB) | tissue Mpx/s | time / decode "
            "| GPU busy (mean of samples) | GPU memory peak (GB) | lesions |"
        )
        emit("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        emit(f"| decode level 0 once | {dec[0]:.2f} | {dec[1]:.2f} | | 1.0x | | | |")
        for name, _ in methods:
            sec, gb = med(name)
            busy = statistics.median(u for u, _ in gpu_use[name])
            peak = max(p for _, p in gpu_use[name])
            on_gpu = name.startswith("GPU")
            emit(
                f"| `lungmets run` {name} | {sec:.1f} | {gb:.2f} | {tissue_mpx / sec:.1f} | "
                f"{sec / dec[0]:.1f}x | {f'{busy:.0f}%' if on_gpu else ''} | "
                f"{f'{peak:.1f}' if on_gpu else ''} | {len(runs[name][2])} |"
            )
        # As in a batch: the process started, CUDA up and the model loaded once.
        from histo.config import AnalysisConfig
        from histo.pipeline import analyze_slide

        base = AnalysisConfig(method="unet")
        warm = {}
        for label, cfg in (
            ("GPU screened", base.replace(device=dev)),
            ("CPU screened", base.replace(device="cpu")),
        ):
            analyze_slide(slide, cfg)
            t = time.perf_counter()
            analyze_slide(slide, cfg)
            warm[label] = time.perf_counter() - t
        emit("")
        emit(
            "As in a batch of slides (`analyze_slide` in one process, timed on its second slide: "
            "CUDA started and the model loaded once): "
            + "; ".join(
                f"{k} {v:.1f} s = {v / dec[0]:.1f}x the decode, {tissue_mpx / v:.1f} tissue Mpx/s"
                for k, v in warm.items()
            )
            + "."
        )
        if dev == "cuda":
            for line in network_alone():
                emit(line)
        # GPU against CPU, cell by cell.
        emit("")
        emit(
            "GPU against CPU (ONNX Runtime, float32), cell by cell: cells matched one to one "
            "within 0.5 um, matched cells whose Ki67 call differs, and the lesion table (cells "
            f"and class of each lesion). Held-out slides {args.held_out_size}, seeds "
            f"90001-{90000 + len(HELD_OUT)}, `analyze_slide` in this process:"
        )
        emit("")
        emit(
            "| slide, GPU arithmetic | cells GPU / CPU | CPU cells the GPU run found "
            "| Ki67 calls differing | lesions GPU / CPU | lesion table |"
        )
        emit("| --- | ---: | ---: | ---: | ---: | --- |")
        cpu8k = runs[methods[3][0]]
        for label, name in (("float16", methods[0][0]), ("float32", methods[1][0])):
            g = runs[name]
            emit(_agreement_row(f"benchmark slide ({args.size}), {label}", g[1:], cpu8k[1:]))
        for seed, (group, dpi, ki67), s in held:
            cpu = analyze_slide(s.path, base.replace(device="cpu"))
            for label, cfg in (
                ("float16", base.replace(device=dev)),
                ("float32", base.replace(device=dev, precision="float32")),
            ):
                g = analyze_slide(s.path, cfg)
                name = f"{seed}: {group} d{dpi}{'' if ki67 else ' no Ki67'}, {label}"
                emit(_agreement_row(name, (g.cells, g.lesions), (cpu.cells, cpu.lesions)))
    if args.write:
        write_section("bench_gpu", TITLE, lines)


if __name__ == "__main__":
    main()
