"""The example images the page offers with a model: images that fit what it was trained on.

A model of the shapes world gets the shapes scenes that ship with the page
(``service/static/examples``); any other model the images of the operator's folder
(``CAPTIONER_EXAMPLES_DIR``), or none: a photo model shown coloured shapes captions them as
photographs, and its page should not suggest it. A subfolder of that folder named as the model
holds that model's own examples, for a shapes model too. No photograph ships with the project.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

STATIC_EXAMPLES = Path(__file__).parent / "static" / "examples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
MOST = 12  # examples offered at most


def operator_folder(examples_dir: str | None, model: str) -> Path | None:
    """The operator's folder of examples for ``model``: its subfolder if there is one, else the
    folder itself; None without a folder."""
    if not examples_dir:
        return None
    folder = Path(examples_dir)
    own = folder / model
    return own if own.is_dir() else folder


def examples_for(model: str, trained_on: dict | None, examples_dir: str | None) -> list[dict]:
    """``[{"url", "caption"?}]``: the example images the page offers with ``model``."""
    own = Path(examples_dir) / model if examples_dir else None
    if (trained_on or {}).get("world") == "shapes" and not (own is not None and own.is_dir()):
        index = json.loads((STATIC_EXAMPLES / "index.json").read_text())
        return [{"url": f"/static/examples/{item['file']}", "caption": item["caption"]} for item in index[:MOST]]
    folder = operator_folder(examples_dir, model)
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [{"url": f"/examples/{model}/{quote(name)}"} for name in files[:MOST]]
