"""Quality control: a fused CT/PET PNG per study (before vs after registration) and a cohort summary."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # QC runs in Ray workers and CI: never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .shards import PreparedStudy, atomic_write_bytes, atomic_write_text  # noqa: E402

SUMMARY_COLUMNS = ("order", "study_id", "cohort", "status", "registration_status", "metric_before", "metric_after",
                   "rotation_deg", "translation_mm", "error_kind", "error")


def _planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of a (Z, Y, X) volume through `centre`; head up in the last two."""
    z, y, x = centre
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _aspects(spacing: tuple[float, float, float]) -> list[float]:
    sx, sy, sz = spacing
    return [sy / sx, sz / sx, sz / sy]


def body_centre(ct: np.ndarray) -> tuple[int, int, int]:
    body = np.argwhere(ct > 0.3)  # normalised CT above ~-400 HU with the default window
    return tuple(int(v) for v in (np.median(body, axis=0) if len(body) else np.array(ct.shape) // 2))


def study_png(path: Path, study: PreparedStudy, ct_before: np.ndarray, record: dict, tmp_dir: Path) -> None:
    """2 x 3 panel: rows = before / after registration, columns = axial / coronal / sagittal; PET over CT."""
    ct_after, pet = study.image[0], study.image[1]
    centre = body_centre(ct_after)
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.5), facecolor="black")
    pet_max = max(float(np.percentile(pet, 99.9)), 1e-3)
    for row, (ct, name) in enumerate([(ct_before, "before (scanner frame)"), (ct_after, "after registration")]):
        for col, (ct_plane, pet_plane, aspect) in enumerate(zip(_planes(ct, centre), _planes(pet, centre),
                                                                  _aspects(study.spacing))):
            ax = axes[row, col]
            ax.imshow(ct_plane, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
            ax.imshow(np.ma.masked_less(pet_plane, 0.02 * pet_max), cmap="hot", vmin=0, vmax=pet_max, alpha=0.55,
                      aspect=aspect, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{name}: {('axial', 'coronal', 'sagittal')[col]}", color="white", fontsize=9)
    fig.suptitle(f"{study.study_id}  {record['registration_status']}  MI {record['metric_before']:.3f} -> "
                 f"{record['metric_after']:.3f}  |t| {record['translation_mm']:.1f} mm  rot "
                 f"{record['rotation_deg']:.2f} deg", color="white", fontsize=10)
    _save(fig, path, tmp_dir)


def _save(fig, path: Path, tmp_dir: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue(), tmp_dir)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")


def write_summary(records: list[dict], qc_dir: Path, tmp_dir: Path) -> str:
    """Write qc/summary.csv, qc/summary.md and qc/registration.png; return the text to print."""
    qc_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: _fmt(r.get(k)) for k in SUMMARY_COLUMNS} for r in records]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(qc_dir / "summary.csv", text.getvalue(), tmp_dir)
    report = summary_text(records)
    table = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    table += ["| " + " | ".join(row[k].replace("|", "/") for k in SUMMARY_COLUMNS) + " |" for row in rows]
    atomic_write_text(qc_dir / "summary.md", report + "\n\n" + "\n".join(table) + "\n", tmp_dir)
    _registration_plot(records, qc_dir / "registration.png", tmp_dir)
    return report


def summary_text(records: list[dict]) -> str:
    """A few lines a person reads after a run: counts, registration statistics, flagged and failed studies."""
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    flagged = [r for r in ok if r.get("registration_status") == "identity_fallback"]
    lines = [f"studies: {len(records)}  ok: {len(ok)}  failed: {len(failed)}  registration flagged: {len(flagged)}"]
    moved = [r for r in ok if r.get("registration_status") == "registered"]
    if moved:
        shifts = np.array([r["translation_mm"] for r in moved])
        angles = np.array([r["rotation_deg"] for r in moved])
        gain = np.array([r["metric_before"] - r["metric_after"] for r in moved])
        lines.append(f"registration: |t| median {np.median(shifts):.1f} mm (max {shifts.max():.1f}), rotation median "
                     f"{np.median(angles):.2f} deg (max {angles.max():.2f}), MI gain median {np.median(gain):.3f}")
    lines += [f"  flagged {r['study_id']}: {r.get('registration_reason', '')}" for r in flagged]
    lines += [f"  FAILED  {r['study_id']}: {r.get('error_kind')}: {r.get('error')}" for r in failed]
    return "\n".join(lines)


def _registration_plot(records: list[dict], path: Path, tmp_dir: Path) -> None:
    ok = [r for r in records if r.get("status") == "ok" and r.get("registration_status") != "disabled"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for status, colour in (("registered", "tab:blue"), ("identity_fallback", "tab:red")):
        group = [r for r in ok if r.get("registration_status") == status]
        left.scatter([r["translation_mm"] for r in group], [r["rotation_deg"] for r in group], c=colour, label=status)
        right.scatter([r["metric_before"] for r in group], [r["metric_after"] for r in group], c=colour, label=status)
    left.set(xlabel="translation (mm)", ylabel="rotation (deg)", title="recovered patient motion")
    right.set(xlabel="MI before", ylabel="MI after", title="Mattes MI (lower is better)")
    lims = [r[m] for r in ok for m in ("metric_before", "metric_after")]
    if lims:
        right.plot([min(lims), max(lims)], [min(lims), max(lims)], "k--", lw=0.8)
    left.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, tmp_dir)
