"""Registration accuracy (TRE) per validation set: our registration against the true transform and identity.

    python benchmarks/registration.py [--studies 6] [--sets head_pelvis,trunk,synth] [--out bench_out/registration]

Sets: `head_pelvis` and `trunk` from `petct.validation.sets` (independent of our generator), `synth` = our own
synthetic cohort at small scale (`petct.synth`). Per study: TRE mean/max (mm) over its CT-only markers for the
registration `swinssl prepare` runs (one ITK thread), the true transform (0 by construction: the check that the
markers and the truth agree) and identity (no registration), the registration status and seconds. Writes
OUT/result.json and OUT/tre.png (mean TRE per study, per set) and prints a table.
Goal (issue #11): mean <= 1.0 mm and max <= 2.0 mm on every study of every set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "preprocessing")]

from petct.validation.sets import SETS, ValidationStudy  # noqa: E402
from petct.validation.tre import pet_body_markers, register, summary, tre_mm  # noqa: E402


def synth_studies(n: int, tmp: Path) -> list[ValidationStudy]:
    """Small-scale studies of our own generator, with markers on the PET body mapped to the CT frame."""
    from petct.synth import load_motion, synth_study

    out = []
    for i in range(n):
        synth_study(f"syn_{i:03d}", tmp, labeled=False, seed=1000 + i, scale="small")
        folder = tmp / f"syn_{i:03d}"
        ct, pet = sitk.ReadImage(str(folder / "ct.nii.gz")), sitk.ReadImage(str(folder / "pet.nii.gz"))
        truth = load_motion(folder)
        out.append(ValidationStudy(folder.name, ct, pet, truth, pet_body_markers(pet, ct, truth)))
    return out


def evaluate(study: ValidationStudy) -> dict:
    result, seconds = register(study.ct, study.pet)
    return {"study_id": study.study_id, "status": result.status, "reason": result.reason, "seconds": seconds,
            "registration": summary(tre_mm(result.transform, study.truth, study.markers)),
            "truth": summary(tre_mm(study.truth, study.truth, study.markers)),
            "identity": summary(tre_mm(sitk.Euler3DTransform(), study.truth, study.markers)),
            "markers": len(study.markers)}


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["registration"]["mean"] for r in rows], 0.4, label="registration mean")
        ax.bar([i + 0.2 for i in x], [r["registration"]["max"] for r in rows], 0.4, label="registration max")
        ax.plot(list(x), [r["identity"]["mean"] for r in rows], "kx", label="identity mean")
        ax.axhline(1.0, color="g", ls="--", lw=1)
        ax.axhline(2.0, color="r", ls="--", lw=1)
        ax.set(title=name, xlabel="study", ylabel="TRE (mm)", yscale="log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| set | studies | reg. mean (worst study) | reg. max (worst) | truth | identity mean | s/study | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        means, maxes = [r["registration"]["mean"] for r in rows], [r["registration"]["max"] for r in rows]
        ok = sum(m <= 1.0 and x <= 2.0 for m, x in zip(means, maxes))
        lines.append(f"| {name} | {len(rows)} | {statistics.mean(means):.2f} ({max(means):.2f}) | "
                     f"{statistics.mean(maxes):.2f} ({max(maxes):.2f}) | "
                     f"{max(r['truth']['max'] for r in rows):.2f} | "
                     f"{statistics.mean(r['identity']['mean'] for r in rows):.1f} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.2f} | {ok}/{len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--sets", default="head_pelvis,trunk,synth")
    parser.add_argument("--out", default="bench_out/registration")
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the per-task setting of `prepare`
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name in args.sets.split(","):
        if name == "synth":
            with tempfile.TemporaryDirectory() as tmp:
                studies = synth_studies(args.studies, Path(tmp))
        else:
            studies = [SETS[name](seed) for seed in range(args.studies)]
        results[name] = [evaluate(s) for s in studies]
        print(name, [f"{r['registration']['mean']:.2f}/{r['registration']['max']:.2f}" for r in results[name]],
              flush=True)
    (out / "result.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "tre.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
