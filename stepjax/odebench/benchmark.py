"""The whole study: train the learned controller, tune a PID on the same budget, measure
work-precision on the held-out problems, compare, and write the results."""

import dataclasses
import math
import os
import pathlib
import platform
import shlex
import time

import diffrax
import jax

from .imitation import ImitationConfig, train_imitation
from .learned import LearnedPolicy, init_network
from .pid import PID_BASELINES, pid_gains, tune_pid
from .problems import FAMILIES, get_family
from .reference import ANCHORS, check_anchor, reference_solution
from .report import compare, verdict, verdict_words, write_json
from .workprecision import measure_curve

BASELINES = (*PID_BASELINES, "tuned PID", "PI34-shrink")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run.

    **Arguments:**

    - `quick`: label for the reduced run.
    - `families`: family names to evaluate (their held-out values) and train on.
    - `rtols`: solver name -> evaluation tolerances.
    - `train_rtols`: solver name -> tolerances of the training solves (implicit ones
      are counted through callbacks, about 15x slower, hence fewer).
    - `params`: optional family -> (train values, held-out values) overrides.
    - `rounds`, `fit_steps`, `max_records`: imitation training settings.
    - `stiffness`: solver name -> whether the learned controller uses the secant
      feature. Chosen by training score: for Tsit5 its extra evaluation per step (1/6
      more NFE) does not pay for itself, for Kvaerno5 it does.
    - `overshoot`: cautiousness of the imitation fit (see [`train_imitation`][]).
    - `repeats`: timed repeats per solve.
    - `seed`: random seed.
    """

    quick: bool = False
    families: tuple = tuple(FAMILIES)
    rtols: dict = dataclasses.field(default_factory=lambda: {"tsit5": tuple(10.0**-k for k in range(3, 11)), "kvaerno5": tuple(10.0**-k for k in range(3, 9))})
    train_rtols: dict = dataclasses.field(default_factory=lambda: {"tsit5": (1e-4, 1e-6, 1e-8), "kvaerno5": (1e-4, 1e-6)})
    params: dict = dataclasses.field(default_factory=dict)
    rounds: int = 3
    fit_steps: int = 2000
    max_records: int = 1000
    stiffness: dict = dataclasses.field(default_factory=lambda: {"tsit5": False, "kvaerno5": True})
    overshoot: float = 0.8
    repeats: int = 3
    seed: int = 0

    def family(self, name):
        """**Returns:** the family, with this config's parameter overrides applied."""
        family = get_family(name)
        if name in self.params:
            train, held_out = self.params[name]
            family = dataclasses.replace(family, train=train, held_out=held_out)
        return family


QUICK = BenchConfig(
    quick=True,
    families=("vdp", "robertson", "lotka_volterra"),
    rtols={"tsit5": (1e-4, 1e-6, 1e-8), "kvaerno5": (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)},
    train_rtols={"tsit5": (1e-4, 1e-7), "kvaerno5": (1e-4, 1e-7)},
    params={"vdp": ((2, 10, 20), (15, 100)), "robertson": ((3e7,), (3e8,))},
    rounds=2,
    fit_steps=1000,
    max_records=600,
    repeats=1,
)
FULL = BenchConfig()


def _device() -> str:
    device = jax.devices()[0]
    return f"{device.platform.upper()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}, diffrax {diffrax.__version__}"


def _train_solver(config, solver, families, log):
    """Train the learned controller and tune a PID on the same budget for one solver."""
    problems = [p for f in families if f.solver == solver for p in f.train_problems()]
    if not problems:
        raise ValueError(f"No training problems for solver {solver!r}; add a family with training values.")
    references = [reference_solution(p) for p in problems]
    rtols = config.train_rtols[solver]
    log(f"[train] {solver}: learned controller on {len(problems)} problems x {len(rtols)} tolerances")
    imitation = ImitationConfig(stiffness=config.stiffness[solver], overshoot=config.overshoot, rounds=config.rounds, fit_steps=config.fit_steps, max_records=config.max_records)
    trained = train_imitation(problems, rtols, references, imitation, seed=config.seed, log=log)
    budget = math.ceil(trained.solves)
    log(f"[train] {solver}: tuned PID search with {budget} solves")
    tuned = tune_pid(problems, rtols, references, trained.baselines, budget, seed=config.seed, log=log)
    summary = {
        "problems": [p.name for p in problems],
        "rtols": list(rtols),
        "history": trained.history,
        "kept_round": min(trained.history, key=lambda h: h["score"])["round"],
        "solves": trained.solves,
        "tuned": {"gains": dataclasses.asdict(tuned.gains), "score": tuned.score, "solves": tuned.solves, "history": tuned.history},
    }
    return trained.policy, tuned.gains, summary


def _evaluate(problem, makers, rtols, repeats, log):
    reference = reference_solution(problem)
    curves = {}
    for name, make in makers.items():
        start = time.perf_counter()
        curves[name] = measure_curve(problem, name, make, rtols, reference, repeats=repeats)
        log(f"    {name:12s} NFE {sum(curves[name].nfe):>9d}  rejected {sum(curves[name].rejected):>6d}  failures {curves[name].failures}  ({time.perf_counter() - start:.1f}s)")
    return curves


def run(config: BenchConfig, *, log=print) -> tuple[dict, dict]:
    """Run the benchmark described by `config`.

    **Arguments:**

    - `config`: a `BenchConfig` (`QUICK` or `FULL`).
    - `log`: progress printer.

    **Returns:** `(payload, policies)`: the results payload (config, anchors, training,
    per-problem curves and comparisons, verdict), as written to JSON, and the trained
    `LearnedPolicy` of each solver.
    """
    start = time.perf_counter()
    families = [config.family(name) for name in config.families]
    log(f"[reference] checking {len(ANCHORS)} published anchors")
    anchors = [check_anchor(name) for name in ANCHORS]
    policies, tuned, training = {}, {}, {}
    for solver in sorted({f.solver for f in families}):
        policies[solver], tuned[solver], training[solver] = _train_solver(config, solver, families, log)
    shrink = LearnedPolicy(init_network(jax.random.PRNGKey(config.seed)), shrink_after_accept=True)
    results = []
    for family in families:
        for problem in family.held_out_problems():
            log(f"[evaluate] {problem.name} ({problem.solver})")
            makers = {name: pid_gains(name).controller for name in PID_BASELINES}
            makers |= {"tuned PID": tuned[problem.solver].controller, "PI34-shrink": shrink.controller, "learned": policies[problem.solver].controller}
            curves = _evaluate(problem, makers, config.rtols[problem.solver], config.repeats, log)
            comparison = compare(curves, "learned", list(BASELINES))
            unmatched = f" (no common error range with {', '.join(comparison['unmatched'])})" if comparison["unmatched"] else ""
            log(f"    learned / {comparison['best_classical']}: {[round(r, 3) for r in comparison['ratios']]}{unmatched}")
            sanity = not family.stiff and not family.train
            results.append({"problem": problem.name, "family": family.name, "solver": problem.solver, "stiff": family.stiff, "sanity": sanity, "metric": curves["learned"].metric, "curves": curves, "comparison": comparison})
    judged = verdict(results)
    log(f"[verdict] {judged['summary']}")
    payload = {
        "command": shlex.join(["python", "-m", "stepjax.odebench", *(["--quick"] if config.quick else []), "--seed", str(config.seed)]),
        "config": dataclasses.asdict(config),
        "device": _device(),
        "elapsed_s": time.perf_counter() - start,
        "classical": list(BASELINES),
        "anchors": anchors,
        "training": training,
        "policies": {solver: policy_file(solver) for solver in policies},
        "results": results,
        "verdict": judged,
        "verdict_words": verdict_words(results, judged),
    }
    return payload, policies


def policy_file(solver: str) -> str:
    """**Returns:** the file name of the learned policy for `solver` in a record directory."""
    return f"learned_{solver}.json"


def write_records(payload: dict, policies: dict, out_dir: pathlib.Path, log=print):
    """Write the run's record to `out_dir`: `results.json` and one `learned_<solver>.json` per
    trained policy (its settings and float64 weights, reloadable with `LearnedPolicy.load`)."""
    for solver, policy in policies.items():
        kept = payload["training"][solver]["kept_round"]
        policy.save(out_dir / policy_file(solver), solver=solver, seed=payload["config"]["seed"], kept_round=kept)
    write_json(payload, out_dir / "results.json")
    log(f"[write] {out_dir / 'results.json'}, {len(policies)} policies")
