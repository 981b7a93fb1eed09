"""``python -m stepjax.campaign``: the GPU campaign (docs/GPU.md).

    python -m stepjax.campaign status                 # the plan: each item's state and estimate, the next one
    python -m stepjax.campaign wheels                 # CPU side, once: .whl/, the packages the device image lacks
    python -m stepjax.campaign stage --data DIR       # CPU side: stage/call<k>/ for the next item, and the calls
    python -m stepjax.campaign run --out $OUT         # device side: run the next unfinished item (or --item KEY)
    python -m stepjax.campaign file DIR               # CPU side: file a returned output folder into results/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stepjax.campaign import plan as planning
from stepjax.campaign import slot, staging
from stepjax.data.sources import DATA_DIR_ENV
from stepjax.records import code_version

REPO = Path(__file__).resolve().parents[2]


def cmd_status(args) -> int:
    nxt = planning.next_item(planning.PLAN, args.results)
    for item in planning.PLAN + planning.EXTRA:
        todo = planning.pending(item, args.results)
        left = len(todo["trainings"]) + len(todo["analyses"]) + int(todo["measure"])
        parts = len(item.trainings) + len(item.analyses) + int(item.measure)
        state = "done" if not left else f"{parts - left} of {parts} done"
        mark = "->" if item is nxt else "  "
        print(f"{mark} {item.key:14s} {item.est_s / 60:6.1f} min{'*' if item.chunked else ' '} {state:14s} {item.title}")
    print("(minutes: the estimate of one command; * in all, over several commands, each resuming the last)")
    print(f"next: {nxt.key if nxt else 'nothing: the plan is done'}")
    return 0


def chosen_item(args) -> planning.Item | None:
    if args.item:
        return planning.find_item(args.item)
    return planning.next_item(planning.PLAN, args.results)


def cmd_stage(args) -> int:
    item = chosen_item(args)
    if item is None:
        print("campaign: every item of the plan is done; nothing to stage.")
        return 0
    if item.data and not args.data:
        print("campaign: pass --data DIR (the CIFAR-10 npz copy, e.g. make campaign-stage DATA=/work/shared/data/cifar10).",
              file=sys.stderr)
        return 2
    tree = slot.tree_bytes(REPO)
    capacity = staging.CALL_LIMIT - tree - staging.MARGIN
    bundles = []
    for workdir in slot.needed_runs(item, args.results, REPO):
        path = Path(args.out) / "cache" / "runs" / f"{workdir.name}.tar.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        bundles.append(("run", staging.bundle_run(workdir, REPO, path)))
    extras = [("wheel", w) for w in slot.wheels(args.wheels)] + bundles
    manifest = staging.stage(args.data if item.data else None, args.out, capacity=capacity, extras=extras,
                             code=code_version(REPO))
    calls = slot.call_sequence(manifest, item.key)
    text = slot.render_calls(calls, manifest, item, capacity)
    (Path(args.out) / "CALLS.md").write_text(text)
    print(f"working tree {tree / staging.MIB:.1f} MiB; {len(calls)} call(s); also in {args.out}/CALLS.md\n")
    print(text)
    return 0


def cmd_wheels(args) -> int:
    return slot.download_wheels(args.out)


def cmd_run(args) -> int:
    from stepjax.campaign.runner import CampaignError, describe, run_item

    item = chosen_item(args)
    if item is None:
        print("campaign: every item of the plan is done; nothing to run.")
        return 0
    try:
        summary = run_item(item, args.out, results=args.results, root=args.root or staging.device_root(),
                           budget_s=args.budget_s)
    except CampaignError as error:
        print(f"campaign: {error}", file=sys.stderr)
        return 2
    print("\n".join(describe(summary)))
    return 0


def cmd_file(args) -> int:
    from stepjax.campaign.filing import file_returned

    try:
        lines = file_returned(args.dir, results=args.results, base=REPO)
    except FileNotFoundError as error:
        print(f"campaign: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    nxt = planning.next_item(planning.PLAN, args.results)
    print(f"next item: {nxt.key if nxt else 'none: the plan is done'}; now `make results`.")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m stepjax.campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.environ.get("STEPJAX_RESULTS") or "results",
                        help="the results tree that says what is finished (default $STEPJAX_RESULTS or results)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the plan, each item's state and estimate")
    wheels = sub.add_parser("wheels", help="download the wheels the device image lacks")
    wheels.add_argument("--out", default=".whl")
    stage = sub.add_parser("stage", help="write stage/call<k>/ for the next item and print the device calls")
    stage.add_argument("--data", default=os.environ.get(DATA_DIR_ENV), help="the CIFAR-10 npz copy")
    stage.add_argument("--out", default="stage")
    stage.add_argument("--wheels", default=".whl", help="folder of the wheels (make campaign-wheels)")
    stage.add_argument("--item", help="stage for this item instead of the next unfinished one")
    run = sub.add_parser("run", help="run the next unfinished item (on the device)")
    run.add_argument("--out", required=True, help="output folder ($OUT on the device)")
    run.add_argument("--item", help="run this item instead of the next unfinished one")
    run.add_argument("--budget-s", type=float, default=slot.RUN_BUDGET_S, help="seconds until everything is packed")
    run.add_argument("--root", help=f"device root (default ${staging.DEVICE_ROOT_ENV} or /tmp/stepjax)")
    file = sub.add_parser("file", help="file a returned output folder into the results tree")
    file.add_argument("dir")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"status": cmd_status, "wheels": cmd_wheels, "stage": cmd_stage, "run": cmd_run, "file": cmd_file}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:  # an unknown item, missing wheels, a file too large for a call
        print(f"campaign: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
