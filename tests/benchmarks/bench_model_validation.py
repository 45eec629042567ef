"""The shipped models' validation, recomputed by the training code with the code of the day.

Run on demand (never in CI)::

    python3 tests/benchmarks/bench_model_validation.py [--models v1,v2,v4,v5] [--record] [--write]

For each shipped model, its own validation slides are generated again from the recipe in its
JSON (`models.train.revalidate`: same seeds, size and appearance families) and scored by
`models.train.validate_model` (the network and the classical detector, pooled cell F1, count
error, strict lesion F1 by class). ``--record`` writes the result into the model's JSON as
its ``validation`` block (the tensors are untouched), which the model cards quote;
``--write`` puts the tables into BENCHMARKS.md between the ``bench_model_validation`` markers.
``--slides N`` scores only the first N slides (a quick check; never recorded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, SHIPPED, machine_line, write_section  # noqa: E402

from histo.synthetic._appearance import FAMILY_PROBABILITY  # noqa: E402

MODELS = {
    "v1": ROOT / "models" / "weights" / "lungmets_unet_v1.pt",
    "v2": ROOT / "models" / "weights" / "lungmets_unet_v2.pt",
    "v4": ROOT / "models" / "weights" / "lungmets_unet_v4.pt",
    "v5": ROOT / "models" / "weights" / "lungmets_unet_v5.pt",
}


def validation_table(validation: dict) -> list[str]:
    """A validation block as a markdown table (the model cards quote the same)."""
    lines = [
        "| detector | HER2+ cells F1 | count error | single F1 | cluster F1 | focus F1 "
        "| all lesions F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in ("unet", "classical"):
        v = validation.get(method)
        if v is None:
            continue
        lines.append(
            f"| {method} | {v['cells_f1']:.3f} | {v['count_error']:+.1%} | "
            f"{v['lesions_single_f1']:.3f} | {v['lesions_cluster_f1']:.3f} | "
            f"{v['lesions_focus_f1']:.3f} | {v['lesions_all_f1']:.3f} |"
        )
    return lines


def main(argv=None) -> None:
    from models.train import make_slides, revalidate, validate_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default=f"v1,v2,v4,{SHIPPED}", help="comma-separated: " + ", ".join(MODELS)
    )
    ap.add_argument("--data", type=Path, default=Path("/tmp/lungmets_train"))
    ap.add_argument("--slides", type=int, default=0, help="only the first N slides")
    ap.add_argument("--record", action="store_true", help="write the models' JSON")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.record and args.slides:
        ap.error("--slides N is a quick check: it is never recorded (drop --record)")
    lines = [machine_line()]
    for name in args.models.split(","):
        model = MODELS[name]
        if args.slides:
            tr = json.loads(model.with_suffix(".json").read_text())["training"]
            paths = make_slides(
                args.data,
                range(5000, 5000 + args.slides),
                int(tr["slide_size_px"]),
                families=bool(tr.get("families", False)),
                exclude_families=tuple(tr.get("exclude_families", ())),
                family_probability=float(tr.get("family_probability", FAMILY_PROBABILITY)),
            )
            validation = validate_model(model, paths)
        elif args.record:
            validation = revalidate(model, args.data)
        else:  # the same, on a copy: the shipped JSON is left as it is
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / model.name
                copy.write_bytes(model.read_bytes())
                copy.with_suffix(".json").write_text(model.with_suffix(".json").read_text())
                validation = revalidate(copy, args.data)
        lines += [
            "",
            f"{model.name}, validation slides {', '.join(validation['slides'])}:",
            "",
            *validation_table(validation),
        ]
        print("\n".join(lines[-len(validation_table(validation)) - 4 :]), flush=True)
    command = (
        f"Command: `python3 tests/benchmarks/bench_model_validation.py --models {args.models}"
        + (f" --slides {args.slides}" if args.slides else "")
        + (" --record" if args.record else "")
        + " --write` (`models.train.revalidate`; the shipped models, default settings, CPU)."
    )
    lines.insert(1, command)
    print("\n".join(lines))
    if args.write:
        write_section("bench_model_validation", "The shipped models' validation", lines)


if __name__ == "__main__":
    main()
