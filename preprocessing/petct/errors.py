"""One error type for everything that is wrong with one study's input.

A `StudyError` never stops a cohort: the pipeline records it in the manifest under the study's id and goes on.
`kind` is a short stable tag (used in the manifest and QC summary); the message says what a person must fix.
"""

from __future__ import annotations

# Stable tags; documented in README "Bad input".
KINDS = (
    "read_error",  # unreadable, truncated or not an image
    "missing_modality",  # CT or PET path empty or absent
    "missing_suv_tag",  # DICOM PET lacks a tag needed for SUV
    "bad_suv_tag",  # a tag is present but unusable (units, negative decay time ...)
    "non_finite",  # NaN / inf voxels
    "geometry",  # geometry we will not guess at: 4-D/dynamic/gated, single slice or localizer, unresampleable shear
    "not_corrected",  # PET without attenuation or decay correction (CorrectedImage lacks ATTN / DECY)
    "implausible_value",  # a value no patient has: dose in MBq where Bq is due, weight in g, SUV out of range
    "too_large",  # a volume above the memory budget, refused before it is allocated
    "ambiguous",  # several candidate series for one role; the message lists them
    "no_overlap",  # CT and PET fields of view do not intersect
    "label_grid",  # label geometry differs from the PET grid
    "label_values",  # a label value that is not in the label set (`prepare --labels`, default the 12 PSMA classes)
    "duplicate_id",  # two input rows share a study id
    "bad_id",  # a study id that cannot name a file (allowed: letters, digits, '.', '_', '-')
    "not_dicom",  # `predict`: a DICOM-SEG was asked for but the PET is not a single-frame DICOM series (note only)
    "prepare_mismatch",  # `predict`: a prepared study whose windows differ from the ones the model was trained on
    "internal",  # anything unexpected (a bug, not bad input): message carries the traceback summary
)


class StudyError(Exception):
    """Bad input for one study: `StudyError(study_id, kind, message)`."""

    def __init__(self, study_id: str, kind: str, message: str):
        if kind not in KINDS:
            raise ValueError(f"unknown StudyError kind {kind!r}")
        self.study_id, self.kind, self.message = study_id, kind, message
        super().__init__(f"study {study_id!r}: {kind}: {message}")


def too_large(study_id: str, where: str, size_xyz: tuple[int, int, int], max_bytes: int) -> StudyError:
    """The size guard's refusal of a volume of `size_xyz` voxels (float32) above `max_bytes`, found from headers."""
    nbytes = 4 * size_xyz[0] * size_xyz[1] * size_xyz[2]
    return StudyError(study_id, "too_large", f"{where}: {size_xyz[0]}x{size_xyz[1]}x{size_xyz[2]} voxels = "
                      f"{nbytes / 2**20:.0f} MiB as float32, above the budget of {max_bytes / 2**20:.0f} MiB; raise "
                      "PrepareConfig.max_volume_mib (`swinssl prepare --max-volume-mib`) if the machine has the memory")


def failure_fields(exc: BaseException) -> dict[str, str]:
    """`status`/`error_kind`/`error` of a record for a study whose processing raised `exc`: a StudyError's own kind
    and message, anything else 'internal' with the exception and where it happened (a bug must not take the cohort
    down, and the record must say where to look)."""
    if isinstance(exc, StudyError):
        return {"status": "failed", "error_kind": exc.kind, "error": exc.message}
    import traceback
    from pathlib import Path

    where = traceback.extract_tb(exc.__traceback__)[-1]
    return {"status": "failed", "error_kind": "internal",
            "error": f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"[:500]}
