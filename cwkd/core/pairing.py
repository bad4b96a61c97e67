"""Pairing: choose which student layer is distilled towards which teacher layer."""

from __future__ import annotations

from dataclasses import dataclass

from cwkd.core.features import LayerInfo, find_layer, stages
from cwkd.errors import LayerError, PairingError

#: The largest spatial ratio the bilinear resize is allowed to bridge.
MAX_RESIZE = 4


@dataclass(frozen=True)
class Pair:
    """A student layer distilled towards a teacher layer."""

    student: LayerInfo
    teacher: LayerInfo

    @property
    def key(self) -> str:
        """A short stable name, ``student->teacher``."""
        return f"{self.student.name}->{self.teacher.name}"

    @property
    def needs_resize(self) -> bool:
        """True when the maps differ in height or width."""
        s, t = self.student, self.teacher
        return (s.height, s.width) != (t.height, t.width)

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        s, t = self.student, self.teacher
        return {
            "student": s.name, "teacher": t.name,
            "student_shape": [s.channels, s.height, s.width],
            "teacher_shape": [t.channels, t.height, t.width],
            "reduction": t.reduction, "resize": self.needs_resize,
        }


def pair_layers(
    student: list[LayerInfo],
    teacher: list[LayerInfo],
    pairs: str | list[tuple[str, str]] = "last",
    *,
    student_label: str = "the student",
    teacher_label: str = "the teacher",
) -> list[Pair]:
    """Pair student and teacher layers.

    ``pairs`` is ``"last"`` (the deepest reduction both share, as in the paper), ``"all"`` (every
    shared reduction), or explicit pairs: ``"s1:t1,s2:t2"`` or a list of ``(student, teacher)``.

    Example:
        >>> [p.key for p in pair_layers(probe(s), probe(t), "last")]  # doctest: +SKIP
        ['blocks.4->layer4']
    """
    if isinstance(pairs, str) and pairs in ("last", "all"):
        return _pair_by_reduction(student, teacher, pairs, student_label, teacher_label)
    explicit = parse_pairs(pairs) if isinstance(pairs, str) else list(pairs)
    result = []
    for s_name, t_name in explicit:
        pair = Pair(find_layer(student, s_name, student_label), find_layer(teacher, t_name, teacher_label))
        _check_bridgeable(pair)
        result.append(pair)
    return result


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Parse ``"s1:t1,s2:t2"`` into ``[("s1", "t1"), ("s2", "t2")]``."""
    result = []
    for item in (part.strip() for part in text.split(",")):
        if item.count(":") != 1 or not all(side.strip() for side in item.split(":")):
            raise LayerError(
                f"pair '{item}' is not STUDENT_LAYER:TEACHER_LAYER; use --pairs last, all, or e.g. "
                "blocks.4:layer4 (run `cwkd inspect MODEL` to list layer names)"
            )
        s, t = item.split(":")
        result.append((s.strip(), t.strip()))
    if not result:
        raise LayerError("--pairs is empty; use last, all, or STUDENT_LAYER:TEACHER_LAYER pairs")
    return result


def _pair_by_reduction(
    student: list[LayerInfo], teacher: list[LayerInfo], how: str, s_label: str, t_label: str,
) -> list[Pair]:
    s_by_red = {layer.reduction: layer for layer in stages(student)}  # deepest stage wins
    t_by_red = {layer.reduction: layer for layer in stages(teacher)}
    shared = sorted(set(s_by_red) & set(t_by_red))
    if not shared:
        raise PairingError(
            f"{s_label} (stage reductions {sorted(s_by_red)}) and {t_label} (reductions "
            f"{sorted(t_by_red)}) share no reduction; name the pairs yourself with "
            "--pairs STUDENT_LAYER:TEACHER_LAYER (see `cwkd inspect`)"
        )
    chosen = shared[-1:] if how == "last" else shared
    return [Pair(s_by_red[r], t_by_red[r]) for r in chosen]


def _check_bridgeable(pair: Pair) -> None:
    s, t = pair.student, pair.teacher
    ratio = max(s.height / t.height, t.height / s.height, s.width / t.width, t.width / s.width)
    if ratio > MAX_RESIZE:
        raise PairingError(
            f"pair {pair.key} maps {s.height}x{s.width} onto {t.height}x{t.width}: more than a "
            f"{MAX_RESIZE}x resize apart; pick layers at closer reductions (see `cwkd inspect`)"
        )
