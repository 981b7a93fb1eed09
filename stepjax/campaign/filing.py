"""File what a campaign command brought back (`stepjax.campaign.runner`'s output folder) into the
results tree and the local run directories.

- the records in ``records.tar.gz`` -> ``results/<group>/<run>/`` (`stepjax.records.file_run`:
  the record files only, an older copy replaced whole);
- each analysis's record (``analysis.json.gz``) -> ``results/analysis/<name>/`` (``make results`` draws the
  figures from it);
- the measurements -> ``results/measure/<item>.json``;
- ``campaign.json`` -> ``results/campaign/<stamp>-<item>.json`` (the device, the command, the wall
  time and every run's outcome);
- each ``run<k>.tar.gz`` -> ``runs/<group>/<run>/`` (the newest checkpoint, for evaluation and
  analysis on the CPU, or for `make campaign-stage` to carry back to resume the run).
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from stepjax.campaign import staging
from stepjax.records import ANALYSIS_RECORD, file_run


def file_returned(folder: str | Path, *, results: str | Path = "results", base: str | Path = ".") -> list[str]:
    """File a returned output folder.

    **Arguments:**

    - `folder`: the folder the device call brought back (it may be read-only).
    - `results`: the results tree.
    - `base`: the folder that receives ``runs/...`` from the checkpoint archives (the repository).

    **Returns:**

    One line per thing filed.
    """
    folder, results = Path(folder), Path(results)
    if not (folder / "campaign.json").is_file():
        raise FileNotFoundError(f"{folder} has no campaign.json: not the output of `python -m stepjax.campaign run`.")
    summary = json.loads((folder / "campaign.json").read_text())
    lines = []
    if (folder / "records.tar.gz").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(folder / "records.tar.gz", "r:gz") as tar:
                tar.extractall(tmp, filter="data")
            lines += file_tree(Path(tmp), results)
    log = results / "campaign" / f"{summary['stamp']}-{summary['item']}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "campaign.json", log)
    lines.append(f"campaign.json -> {log}")
    for archive in sorted(folder.glob("run*.tar.gz")):
        lines += [f"{archive.name} -> {Path(base) / run}" for run in staging.unbundle_run(archive, base)]
    return lines


def file_tree(tree: Path, results: Path) -> list[str]:
    """File the records, analyses and measurements of an unpacked ``records.tar.gz``."""
    lines = []
    for config in sorted(tree.rglob("config.json")):
        relative = config.parent.relative_to(tree)
        lines.append(f"{relative} -> {file_run(config.parent, results / relative)}")
    for analysis in sorted(tree.glob(f"analysis/*/{ANALYSIS_RECORD}")):
        target = results / "analysis" / analysis.parent.name / ANALYSIS_RECORD
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(analysis, target)
        lines.append(f"analysis {analysis.parent.name} -> {target}")
    for measured in sorted(tree.glob("measure/*.json")):
        target = results / "measure" / measured.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(measured, target)
        lines.append(f"measurements -> {target}")
    return lines
