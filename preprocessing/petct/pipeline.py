"""`prepare`: a cohort in, aligned 2-channel Parquet shards + manifest + QC out (one Ray task per study).

Input: a cohort CSV (`study_id,ct,pet,label,cohort[,patient_id,ct_series,pet_series,label_map,...]`, paths relative
to the CSV) or a folder in one of the layouts of petct.layouts (study folders, autoPET, nnU-Net v2 raw, a DICOM
tree), found by discovery. Row order is curation order.
Output (OUT): `shards/<id>.parquet` (see shards.py), `records/<id>.json`, `manifest.jsonl` (one row per input row,
in input order), `qc/<id>.png`, `qc/summary.{csv,md}`, `qc/registration.png`, `prepare_config.json`, `labels.json`
(the cohort's label set, see labels.py; also part of the settings digest).
Resume: a study whose record says ok for the same source hashes and settings is skipped; everything else is
(re)done. Temp files live in `OUT/.tmp` and only renames publish results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import PrepareConfig
from .labels import write_label_set
from .layouts import discover, sources_from_csv
from .shards import atomic_write_json, atomic_write_text
from .study import VALID_ID, OutputLayout, StudySource, run_study

__all__ = ["PrepareSummary", "load_sources", "prepare_cohort", "sources_from_csv"]

EXIT_OK = 0
EXIT_STUDIES_FAILED = 3
"""`swinssl prepare` exit code when at least one study failed (the good ones are still written)."""


@dataclass
class PrepareSummary:
    records: list[dict]
    report: str

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def exit_code(self) -> int:
        return EXIT_STUDIES_FAILED if self.failed else EXIT_OK


def load_sources(input_path: Path | str) -> list[StudySource]:
    """Cohort CSV or a folder in any registered layout (petct.layouts) -> sources in curation order."""
    input_path = Path(input_path).resolve()
    found = discover(input_path)
    if not found.sources:  # a run that prepares nothing is a usage error, not a success
        raise ValueError(f"no studies found in {input_path}: looked at {found.looked}")
    return found.sources


def _id_problems(sources: list[StudySource]) -> dict[int, tuple[str, str]]:
    """Rows that cannot be prepared because of their id or a problem found by discovery: order -> (kind, message).
    They fail without being read."""
    counts = Counter(s.study_id for s in sources)
    problems = {}
    for s in sources:
        if counts[s.study_id] > 1:
            rows = [t.order for t in sources if t.study_id == s.study_id]
            problems[s.order] = ("duplicate_id", f"study id appears in input rows {rows}; ids must be unique")
        elif not VALID_ID.match(s.study_id):
            problems[s.order] = ("bad_id", "ids may contain letters, digits, '.', '_' and '-' only")
        elif s.problem:
            problems[s.order] = s.problem
    return problems


def config_digest(cfg: PrepareConfig) -> str:
    """Settings that change the output; QC and threading do not."""
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in ("itk_threads", "qc_png", "max_volume_mib")}
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=8).hexdigest()


def _id_failure(source: StudySource, kind: str, message: str) -> dict:
    return {"order": source.order, "study_id": source.study_id, "cohort": source.cohort,
            "patient_id": source.patient_id or source.study_id, "layout": source.layout, "status": "failed",
            "error_kind": kind, "error": message, "ct_path": str(source.ct or ""), "pet_path": str(source.pet or ""),
            "label_path": str(source.label or ""), "skipped": False}


def prepare_cohort(input_path: Path | str, out: Path | str, cfg: PrepareConfig | None = None, workers: int = 2,
                   progress: bool = True, on_record: Callable[[dict], None] | None = None) -> PrepareSummary:
    """Prepare every study of the cohort. `workers` = studies in flight (Ray tasks); 0 runs in this process."""
    cfg = cfg or PrepareConfig()
    layout = OutputLayout(Path(out).resolve())
    for folder in (layout.shards, layout.records, layout.qc):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(layout.tmp, ignore_errors=True)  # leftovers of an interrupted run: never published
    sources = load_sources(input_path)
    digest = config_digest(cfg)
    atomic_write_json(layout.root / "prepare_config.json", {**cfg.to_dict(), "digest": digest}, layout.tmp)
    write_label_set(cfg.labels, layout.root)
    problems = _id_problems(sources)
    runnable = [s for s in sources if s.order not in problems]
    records = {o: _id_failure(next(s for s in sources if s.order == o), *p) for o, p in problems.items()}
    runner = _run_inline if workers <= 0 else _run_ray
    for record in runner(runnable, layout, cfg, digest, workers, progress):
        records[record["order"]] = record
        if on_record:
            on_record(record)
    ordered = [records[s.order] for s in sources]
    _write_manifest(ordered, layout)
    from .qc import write_summary

    return PrepareSummary(ordered, write_summary(ordered, layout.qc, layout.tmp))


def _write_manifest(records: list[dict], layout: OutputLayout) -> None:
    lines = [json.dumps({k: v for k, v in r.items() if k != "skipped"}) for r in records]
    atomic_write_text(layout.root / "manifest.jsonl", "\n".join(lines) + "\n", layout.tmp)


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prepare", unit="study", disable=not progress)


def _run_inline(sources, layout, cfg, digest, workers, progress):
    with _bar(len(sources), progress) as bar:
        for source in sources:
            yield run_study(source, layout, cfg, digest)
            bar.update()


def _run_ray(sources, layout, cfg, digest, workers, progress):
    """At most `workers` studies in flight: memory is bounded by a few volumes, not by the cohort size."""
    import ray

    from .raylocal import ensure_ray

    ensure_ray(num_cpus=workers)
    task = ray.remote(num_cpus=1, max_retries=1)(run_study)
    pending, queue = {}, list(sources)
    with _bar(len(sources), progress) as bar:
        while queue or pending:
            while queue and len(pending) < workers:
                source = queue.pop(0)
                pending[task.remote(source, layout, cfg, digest)] = source
            done, _ = ray.wait(list(pending), num_returns=1)
            source = pending.pop(done[0])
            try:
                yield ray.get(done[0])
            except Exception as exc:  # the worker died (OOM kill, segfault in ITK): record and go on
                yield _id_failure(source, "internal", f"worker failed: {type(exc).__name__}: {exc}"[:500])
            bar.update()
