"""``python -m stepjax.evaluate --workdir DIR [DIR ...] [--data-dir D]``: test accuracy of each run's
latest checkpoint, single view and with flip test-time augmentation, written to
``DIR/evaluation.json`` (read by ``python -m stepjax.results``).

The single-view figure is the one training logs at its last evaluation; the flip figure averages the
softmax probabilities of each test image and its mirror image. Flipping is part of the training
augmentation of every CIFAR experiment, so the mirror image is in the training distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from stepjax import errors, parallel

EVALUATION_FILE = "evaluation.json"


def evaluate_run(workdir: str | Path, *, data_dir: str | None = None) -> dict:
    """Evaluate the latest checkpoint of a run directory on the whole test split.

    **Arguments:**

    - `workdir`: a directory written by `stepjax.train.train`.
    - `data_dir`: read an npz copy from this directory instead of the run's data config
      (otherwise the run's config and ``STEPJAX_DATA_DIR`` decide, as in training).

    **Returns:**

    ``{"step", "accuracy", "loss", "flip_accuracy", "flip_loss", "data", "seconds"}``, also written to
    ``workdir/evaluation.json`` (under the workdir's lock: refused while another process writes there).
    """
    import jax

    from stepjax import data
    from stepjax.train import evaluate, hold_workdir, make_eval_step, restore_run

    start = time.time()
    with hold_workdir(workdir):
        config, graphdef, step, state, _ = restore_run(workdir)
        if data_dir:
            config.data.source, config.data.dir = "npz", str(data_dir)
        mesh = parallel.data_mesh()
        info = data.dataset_info(config.data)
        metrics = evaluate(make_eval_step(graphdef, config, info, mesh, flip=True), state, config, mesh)
        result = {"step": step, "data": f"{config.data.name} ({config.data.source})",
                  **{k: metrics[k] for k in ("accuracy", "loss", "flip_accuracy", "flip_loss")},
                  "seconds": round(time.time() - start, 1)}
        if jax.process_index() == 0:
            (Path(workdir) / EVALUATION_FILE).write_text(json.dumps(result, indent=2))
    return result


def read_evaluation(workdir: str | Path, step: int | None) -> dict | None:
    """The saved evaluation of a run directory if it is of checkpoint `step`, else None."""
    path = Path(workdir) / EVALUATION_FILE
    if step is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("step") == step else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", nargs="+", required=True, help="run directories")
    parser.add_argument("--data-dir", help="npz copy of the dataset (default: the run's data config)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return errors.run(lambda: _evaluate_all(args), debug=args.debug)


def _evaluate_all(args) -> int:
    parallel.configure_cpu_devices()
    for workdir in args.workdir:
        r = evaluate_run(workdir, data_dir=args.data_dir)
        print(f"{workdir}: step {r['step']}, test accuracy {100 * r['accuracy']:.2f} %, "
              f"with flip TTA {100 * r['flip_accuracy']:.2f} % ({r['seconds']:.0f} s)", flush=True)
    return errors.DONE


if __name__ == "__main__":
    parallel.restart_with_huge_pages()  # before any work: glibc reads its tunables at start-up
    errors.exit_process(main())
