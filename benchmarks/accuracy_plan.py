"""accuracy.py's plan: the distilled pairs, the methods, the sizes, the grid of cells in the order they run,
and the files their results go to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS, RUNS

#: The distilled pair per student at 32 px: reduction 8, 4x4 maps (from `cwkd inspect ... --pairs all`).
PAIRS = {
    "mobilenetv3_small_050": "blocks.1:layer2",   # 16x4x4  -> 128x4x4
    "mobilenetv1_100": "blocks.2:layer2",         # 256x4x4 -> 128x4x4
}
#: Method label -> (cwkd method, uses the feature loss, logit-KD weight).
METHODS = {
    "none": ("none", False, 0.0),
    "kd": ("none", False, 1.0),
    "linear": ("linear", True, 0.0),
    "cwt": ("cwt", True, 0.0),
    "cwt+kd": ("cwt", True, 1.0),
    "mgd": ("mgd", True, 0.0),
}


@dataclass(frozen=True)
class Plan:
    """Everything that sizes the benchmark; ``--quick`` is a smaller one."""

    name: str = "full"
    teacher: str = "resnet18"
    students: tuple[str, ...] = ("mobilenetv3_small_050", "mobilenetv1_100")
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    input_size: int = 32
    train_subset: int = 5000      # class-balanced images the students train on
    teacher_subset: int = 10000   # a superset of the students' subset
    test_subset: int | None = None  # None: the full 10k test split
    epochs: int = 5
    teacher_epochs: int = 4
    batch_size: int = 64
    alpha: float = 7.0
    kd_temperature: float = 4.0
    ablation_student: str = "mobilenetv3_small_050"
    alphas: tuple[float, ...] = (0.5, 2.0, 7.0, 20.0, 50.0, 200.0)
    hiddens: tuple[int, ...] = (32, 128, 512)   # 128 = the teacher's channels, cwkd's default
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    results: Path = RESULTS
    runs: Path = RUNS
    device: str = "cpu"


QUICK = Plan(name="quick", students=("mobilenetv3_small_050",), methods=("none", "cwt"), seeds=(0,),
             train_subset=1000, teacher_subset=2000, test_subset=2000, epochs=2, teacher_epochs=1,
             alphas=(), hiddens=(), ablation_seeds=(), results=RUNS / "quick" / "results", runs=RUNS / "quick")


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    group: str          # main, alpha or hidden
    student: str
    method: str         # a METHODS label
    seed: int
    alpha: float = 0.0
    hidden: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        parts = [self.student, self.method.replace("+", "_"), f"s{self.seed}"]
        if METHODS[self.method][1]:
            parts.append(f"a{self.alpha:g}" if isinstance(self.alpha, int | float) else f"a{self.alpha}")  # a7, aauto
        if self.hidden is not None:
            parts.append(f"h{self.hidden}")
        return "-".join(parts)


def grid(plan: Plan, only: str = "all") -> list[Cell]:
    """Every cell, in the order they run: most informative first, so a grid cut short is still balanced.

    First the smaller student's main grid seed by seed (every method at seed 0, then seed 1, ...), then the
    bigger student's baseline and cwt at the first seed, the first seed of the ablations, the rest of the
    bigger student, and the other ablation seeds.
    """
    main = [Cell("main", s, m, seed, alpha=plan.alpha if METHODS[m][1] else 0.0)
            for seed in plan.seeds for s in plan.students for m in plan.methods]
    ablation = []
    for seed in plan.ablation_seeds:
        ablation += [Cell("alpha", plan.ablation_student, "cwt", seed, alpha=a) for a in plan.alphas if a != plan.alpha]
        ablation += [Cell("hidden", plan.ablation_student, "cwt", seed, alpha=plan.alpha, hidden=h)
                     for h in plan.hiddens if h != 128]
    cells = {"all": main + ablation, "main": main, "ablations": ablation}[only]
    return sorted(cells, key=lambda c: _priority(plan, c))


def _priority(plan: Plan, cell: Cell) -> tuple:
    first_seed = cell.seed == plan.seeds[0]
    if cell.group == "main" and cell.student == plan.ablation_student:
        return (0, cell.seed)
    if cell.group == "main" and cell.method in ("none", "cwt"):
        return (1 if first_seed else 3, cell.seed)
    if cell.group != "main":
        return (2 if first_seed else 5, cell.seed)
    return (4, cell.seed)


def cell_path(plan: Plan, cell: Cell) -> Path:
    return plan.results / "accuracy" / f"{cell.key}.json"


def teacher_json(plan: Plan) -> Path:
    return plan.results / "accuracy_teacher.json"
