"""One check of a COCO instances JSON at load, so a malformed record fails before training, never mid-epoch.

:func:`check_coco` raises one :class:`~cwkd.errors.DataError` naming the file, the record (its list, index
and id) and the field of the first record that cwkd, or COCO's scoring, could not use: a category without
an integer ``id`` or a ``name``, an image without a ``file_name`` or with a ``width`` that is no positive
integer, an annotation that is not an object, or whose ``bbox`` is not four numbers. With masks, it also
reads every ``segmentation``: a polygon with fewer than 3 points cannot be drawn or scored (pycocotools
fails on it), so it is dropped, and an object left with no polygon is dropped with it; the caller warns once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NoReturn

from cwkd.errors import DataError


def check_coco(coco: dict, path: Path, *, masks: bool) -> tuple[int, int]:
    """Check ``coco`` in place; drop (with masks) polygons under 3 points. Returns (polygons, objects) dropped.

    Example:
        >>> check_coco({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}, Path("x"),
        ...            masks=False)
        (0, 0)
    """
    for index, item in enumerate(coco["categories"]):
        category = _record(path, "categories", index, item)
        if not isinstance(category.get("name"), str) or not category["name"]:
            _fail(path, "categories", index, category, "has no 'name' (a string)")
    for index, image in enumerate(coco["images"]):
        _check_image(path, index, image, masks=masks)
    _unique(path, "categories", coco["categories"])
    _unique(path, "images", coco["images"])
    for index, ann in enumerate(coco["annotations"]):
        _check_annotation(path, index, ann)
    _unique(path, "annotations", coco["annotations"])
    if not masks:
        return 0, 0
    polygons = sum(_check_segmentation(path, index, ann) for index, ann in enumerate(coco["annotations"]))
    kept = [ann for ann in coco["annotations"] if ann["segmentation"]]  # an RLE dict is never empty
    objects, coco["annotations"] = len(coco["annotations"]) - len(kept), kept
    return polygons, objects


def _check_image(path: Path, index: int, item: object, *, masks: bool) -> None:
    image = _record(path, "images", index, item)
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        _fail(path, "images", index, image, "has no 'file_name' (the image's path under the image folder)")
    for side in ("width", "height"):
        value = image.get(side)
        if (value is not None or masks) and not (_is_int(value) and value > 0):
            need = " (COCO's mask AP needs it)" if value is None else ""
            _fail(path, "images", index, image, f"has '{side}' {value!r}{need}; it must be a positive integer "
                                                f"(the image's {side} in pixels)")


def _check_annotation(path: Path, index: int, item: object) -> None:
    ann = _record(path, "annotations", index, item)
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        _fail(path, "annotations", index, ann, f"has 'bbox' {_short(box)}; it must be 4 numbers [x, y, width, "
                                               "height] in pixels")
    for field in ("iscrowd", "area"):
        if field in ann and not (_is_number(ann[field]) or field == "iscrowd" and isinstance(ann[field], bool)):
            _fail(path, "annotations", index, ann, f"has '{field}' {_short(ann[field])}; it must be a number")


def _check_segmentation(path: Path, index: int, ann: dict) -> int:
    """Polygons under 3 points removed from ``ann`` (their count); a malformed mask is an error."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        size = seg.get("size")
        if not isinstance(seg.get("counts"), list | str) or not (isinstance(size, list) and len(size) == 2
                                                                  and all(_is_int(v) for v in size)):
            _fail(path, "annotations", index, ann, f"has 'segmentation' {_short(seg)}; an RLE mask has 'counts' "
                                                   "and 'size' [height, width]")
        return 0
    if not isinstance(seg, list) or not seg:
        _fail(path, "annotations", index, ann, f"has 'segmentation' {_short(seg)}; instance segmentation needs "
                                               "polygons [[x0, y0, x1, y1, ...], ...] or RLE for every object")
    for polygon in seg:
        if not (isinstance(polygon, list) and len(polygon) % 2 == 0 and all(_is_number(v) for v in polygon)):
            _fail(path, "annotations", index, ann, f"has a polygon {_short(polygon)}; a polygon is a list of "
                                                   "x, y pixel coordinates [x0, y0, x1, y1, ...]")
    ann["segmentation"] = [p for p in seg if len(p) >= 6]
    return len(seg) - len(ann["segmentation"])


def _record(path: Path, kind: str, index: int, record: object) -> dict:
    """``record`` when it is an object with an integer ``id``; else the error."""
    if not isinstance(record, dict):
        _fail(path, kind, index, None, f"is {_short(record)}, not an object")
    elif not _is_int(record.get("id")):
        _fail(path, kind, index, None, f"has 'id' {_short(record.get('id'))}; it must be an integer")
    return record  # type: ignore[return-value]


def _unique(path: Path, kind: str, records: list[dict]) -> None:
    seen: set[int] = set()
    for index, record in enumerate(records):
        if record["id"] in seen:
            _fail(path, kind, index, record, "repeats an id an earlier record has; ids must be unique")
        seen.add(record["id"])


def _fail(path: Path, kind: str, index: int, record: dict | None, problem: str) -> NoReturn:
    ident = f" (id {record['id']})" if record is not None and "id" in record else ""
    raise DataError(f"{path}: {kind}[{index}]{ident} {problem}; fix or remove that record")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
