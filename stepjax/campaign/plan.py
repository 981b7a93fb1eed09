"""The GPU campaign's plan: the items that one device command each runs, in order, and the time
each is expected to take on one NVIDIA H200.

An item trains some runs side by side on the one GPU (each a normal ``python -m stepjax.main``
process; a run is *finished* when its record, ``results/<record>/summary.json``, says ``done``),
then analyses some of them (finished when its record ``results/analysis/<name>/analysis.json.gz`` exists), or
measures the step (``results/measure/<key>.json``). `next_item` is the first item with anything
unfinished; since ``results/`` travels with the working tree, the device decides this itself.

**Sizing.** One command may run 10 minutes; an item must end within `BUDGET_S` (9 minutes, less
the arrival and decoding of the data's last part in the same command: 18 s of CPU here). The
estimates come from the H200 figures of docs/BENCHMARKS.md (one process, ResNet-164 plain):
step 24.6 ms at batch 128 and 111.5 ms at 1024 in float32, 17.2 and 64.7 ms in bfloat16, taken
as linear in the batch between and beyond (`step_ms`); SE cost 1.19x plain there and StepNet
1.78x (float32, batch 128), taken to hold in bfloat16 and at other batches (not measured); the
evaluation ran 48,101 images/s in float32 and 78,288 in bfloat16. Trainings side by side are
taken to share the GPU with no gain: in the one slot so far, three paper-protocol trainings side
by side ran at 1,726 (plain) and 1,522 (SE) images/s median against 5,205 and 4,386 alone. So an
item takes `STARTUP_S` + its longest compile + the sum of its trainings' GPU time + its analyses
(`ANALYSIS_S`, run side by side) + `PACK_S`. What is not measured (the ResNet-20 step on the GPU,
CBAM and DIA there, the analyses' time) is an assumption named where it is used; the `measure`
item measures the step, and its figures should replace these constants before the items after it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from stepjax.records import analysis_record

COMMAND_S = 540  # one device command: 9 minutes of the 10 it may run
RECEIVE_S = 45  # before the item, in the same command: the last part's arrival and the decoding of CIFAR-10
BUDGET_S = COMMAND_S - RECEIVE_S  # the runner's own budget (python -m stepjax.campaign run --budget-s)
STARTUP_S = 30  # interpreter, JAX on the GPU, the data read into memory (assumed)
PACK_S = 30  # records, analyses and checkpoints packed into the output folder (assumed)
ANALYSIS_S = 120  # one NSI analysis of two ResNet-164s on 500 test images (assumed, not measured)
COMPILE_S = {"resnet164": 25.0, "resnet20": 10.0}  # measured 12-21 s for ResNet-164 (BENCHMARKS)
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000

# H200, ResNet-164 plain, one process: step ms at batch 128 and 1024 (docs/BENCHMARKS.md, 2026-11-26)
H200_STEP_MS = {"float32": (24.6, 111.5), "bfloat16": (17.2, 64.7)}
H200_EVAL_IMAGES_S = {"float32": 48_101, "bfloat16": 78_288}
# step cost against plain: SE and StepNet measured on the H200 (float32, batch 128); the others assumed
# (CBAM and DIA as StepNet: more small per-block kernels; the NSI-placed SE as SE)
CONTROLLER_COST = {"resnet": 1.0, "se": 1.19, "stepnet": 1.78, "stepnet_nohistory": 1.78, "cbam": 1.78, "dia": 1.78}
RESNET20_STEP_MS = 3.0  # ResNet-20 at batch 32 in float32 on the H200: assumed (not measured; `measure` does)


def step_ms(batch: int, dtype: str) -> float:
    """The plain ResNet-164 step on the H200, linear in the batch through the two measured points."""
    at128, at1024 = H200_STEP_MS[dtype]
    return at128 + (batch - 128) * (at1024 - at128) / (1024 - 128)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What the estimate needs of an experiment variant (checked against the experiment files by the tests)."""

    preset: str
    epochs: int
    batch: int
    dtype: str
    train_images: int = TRAIN_IMAGES
    test_images: int = TEST_IMAGES

    def gpu_s(self, controller: str) -> float:
        """GPU seconds of a whole training of `controller` (steps and evaluations, one process)."""
        steps = self.epochs * (self.train_images // self.batch)
        step = (RESNET20_STEP_MS if self.preset == "resnet20" else step_ms(self.batch, self.dtype)) / 1000
        evaluation = self.test_images / H200_EVAL_IMAGES_S[self.dtype]
        return CONTROLLER_COST[controller] * (steps * step + self.epochs * evaluation)


PROTOCOLS = {
    "gpu": Protocol("resnet164", 15, 256, "bfloat16"),
    "cpu": Protocol("resnet20", 18, 32, "float32"),
    "paper": Protocol("resnet164", 164, 128, "float32"),
    "smoke": Protocol("resnet20", 2, 32, "float32", train_images=256, test_images=64),  # tiny: any small figure
}


@dataclasses.dataclass(frozen=True)
class Training:
    """One run: ``python -m stepjax.main --config <exp> seed=<seed> <overrides>``, filed as
    ``results/<record>``."""

    exp: str
    seed: int
    overrides: tuple[str, ...] = ()
    tag: str = ""  # told apart from another run of the same experiment and seed (e.g. a placement)
    group: str = "gpu"  # the results group (folder under results/)

    @property
    def controller(self) -> str:
        return self.exp.split(":")[0].removeprefix("cifar10_")

    @property
    def variant(self) -> str:
        return self.exp.split(":")[1] if ":" in self.exp else "paper"

    @property
    def name(self) -> str:
        return f"{self.exp.replace(':', '_')}{'_' + self.tag if self.tag else ''}_s{self.seed}"

    @property
    def record(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def gpu_s(self) -> float:
        return PROTOCOLS[self.variant].gpu_s(self.controller)

    @property
    def compile_s(self) -> float:
        return COMPILE_S[PROTOCOLS[self.variant].preset]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """``python -m stepjax.analysis --workdir <model> --compare <compare> <options>``, filed as
    ``results/analysis/<name>/analysis.json.gz``; `model` and `compare` are `Training.record` s."""

    name: str
    model: str
    compare: str | None = None
    options: tuple[str, ...] = ("--num-samples", "500")  # as the CPU study's analyses
    est_s: float = ANALYSIS_S


@dataclasses.dataclass(frozen=True)
class Item:
    """One device command's work.

    - `key`, `title`: its name and what it gives.
    - `trainings`, `analyses`: what it runs; `concurrency` trainings at a time.
    - `env`: environment of its trainings (``NAME=value``).
    - `measure`: the step measurements (`stepjax.campaign.measure`) instead of trainings.
    - `chunked`: longer than one command by design: each command trains until its time is up and
      brings the checkpoints back, the next resumes from them.
    - `data`: needs CIFAR-10 on the device (False for synthetic data).
    """

    key: str
    title: str
    trainings: tuple[Training, ...] = ()
    analyses: tuple[Analysis, ...] = ()
    concurrency: int = 3
    env: tuple[str, ...] = ()
    measure: bool = False
    chunked: bool = False
    data: bool = True

    @property
    def est_s(self) -> float:
        """Expected seconds of the whole item in one command (see the module docstring)."""
        if self.measure:
            return float(BUDGET_S - PACK_S)
        trainings = sum(t.gpu_s for t in self.trainings)
        compile_s = max((t.compile_s for t in self.trainings), default=0.0)
        analyses = max((a.est_s for a in self.analyses), default=0.0)
        return STARTUP_S + compile_s + trainings + analyses + PACK_S


def training_done(training: Training, results: str | Path) -> bool:
    """Whether `results/<record>/summary.json` says the run finished."""
    summary = Path(results) / training.record / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "done"


def analysis_done(analysis: Analysis, results: str | Path) -> bool:
    return analysis_record(Path(results) / "analysis" / analysis.name) is not None


def measure_done(item: Item, results: str | Path) -> bool:
    return (Path(results) / "measure" / f"{item.key}.json").is_file()


def pending(item: Item, results: str | Path) -> dict:
    """The unfinished parts of an item: ``{"trainings": [...], "analyses": [...], "measure": bool}``."""
    return {"trainings": [t for t in item.trainings if not training_done(t, results)],
            "analyses": [a for a in item.analyses if not analysis_done(a, results)],
            "measure": item.measure and not measure_done(item, results)}


def unfinished(item: Item, results: str | Path) -> bool:
    todo = pending(item, results)
    return bool(todo["trainings"] or todo["analyses"] or todo["measure"])


def next_item(plan: tuple[Item, ...], results: str | Path) -> Item | None:
    """The first item of `plan` with anything unfinished in the results tree, or None."""
    return next((item for item in plan if unfinished(item, results)), None)


def find_item(key: str, plan: tuple[Item, ...] | None = None) -> Item:
    """The item named `key` in `plan` (default: `PLAN` and `EXTRA`)."""
    items = plan if plan is not None else PLAN + EXTRA
    for item in items:
        if item.key == key:
            return item
    raise ValueError(f"No campaign item {key!r}; items: {', '.join(i.key for i in items)}.")


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------

TRIO = ("resnet", "se", "stepnet")


def trio(variant: str, seed: int) -> tuple[Training, ...]:
    """Plain, SE and StepNet of one protocol variant and seed."""
    return tuple(Training(f"cifar10_{c}{':' + variant if variant != 'paper' else ''}", seed) for c in TRIO)


def nsi_pair_analyses(variant: str, seed: int) -> tuple[Analysis, ...]:
    """The NSI analyses of the CPU study, for a GPU trio: SE against plain, StepNet against SE."""
    plain, se, stepnet = (t.record for t in trio(variant, seed))
    return (Analysis(f"{variant}_se_vs_plain_s{seed}", se, plain),
            Analysis(f"{variant}_stepnet_vs_se_s{seed}", stepnet, se))


def gpu_trio(key: str, seed: int) -> Item:
    return Item(key, f"ResNet-164 (full width) plain, SE, StepNet, seed {seed}: short GPU protocol "
                "(15 epochs, batch 256, bfloat16), then the NSI analyses SE vs plain and StepNet vs SE",
                trio("gpu", seed), nsi_pair_analyses("gpu", seed))


# the ResNet-20 CPU protocol on the GPU: seeds after the CPU study's 0-2, pooled with them; float32
# convolutions at full precision as on the CPU (XLA:GPU would run them in TF32 by default)
CPU_SEEDS = tuple(range(3, 13))
FULL_PRECISION = ("JAX_DEFAULT_MATMUL_PRECISION=highest",)


def cpu_seed(seed: int) -> Item:
    return Item(f"c-cpu-s{seed}", f"ResNet-20 CPU protocol (18 epochs, batch 32) plain, SE, StepNet, seed {seed}",
                trio("cpu", seed), env=FULL_PRECISION)


LOTTERY_RATIO = 0.4  # as the CPU lottery (results/lottery/cifar10_se_cpu_ratio0.4)

PLAN = (
    gpu_trio("a-gpu-s0", 0),
    Item("measure", "the accelerator step near its limit: scan vs unrolled stages, XLA command buffers, "
         "bfloat16, trainings side by side, seeds vmapped (stepjax.campaign.measure)", measure=True, data=False),
    gpu_trio("b-gpu-s1", 1),
    gpu_trio("b-gpu-s2", 2),
    *(cpu_seed(seed) for seed in CPU_SEEDS),
    Item("d-more-s0", "ResNet-164 CBAM, DIA and StepNet without history, seed 0: short GPU protocol",
         tuple(Training(f"cifar10_{c}:gpu", 0) for c in ("cbam", "dia", "stepnet_nohistory"))),
    Item("d-lottery-s0", f"lottery at full width: SE in 4 random placements at connection ratio {LOTTERY_RATIO}, "
         "seed 0, short GPU protocol (against a-gpu-s0's plain and SE)",
         tuple(Training("cifar10_se:gpu", 0, ("model.placement='random'", f"model.placement_ratio={LOTTERY_RATIO}",
                                               f"model.placement_seed={k}"), tag=f"random{k}") for k in range(4)),
         concurrency=4),
    Item("d-paper-s0", "paper protocol (164 epochs, batch 128, float32) plain, SE, StepNet, seed 0, in chunks: "
         "each command trains until its time is up and brings the checkpoints back", trio("paper", 0), chunked=True),
)

# not in the order: the environment check of a fresh machine or a new device image, which is also
# the item the CPU test runs end to end
EXTRA = (
    Item("check", "environment check: a tiny StepNet trained in bfloat16 on synthetic data, and its NSI analysis",
         (Training("cifar10_stepnet:smoke", 0, ("model.dtype='bfloat16'",), group="check"),),
         (Analysis("check_stepnet", "check/cifar10_stepnet_smoke_s0", None,
                   ("--num-samples", "16", "--batch-size", "16", "--power-iters", "2", "--permutations", "20",
                    "--bootstrap", "20", "--num-curves", "4"), est_s=30.0),),
         concurrency=1, data=False),
)
