"""Page images for the vLLM engine: the pure part of its vision path (no vLLM, no GPU; tests/test_vllm_vision.py).

A scanned document (an image, a PDF page without a text layer) may be shown to a vision-language model as its first
page images (`small_model.vision`). The engine asks the same questions as on the text path, in the same token
prompts, with the pages placed just before the document's OCR text:

    <fixed text and examples> Page 1: <image placeholder>\\n ... Text: <OCR text>\\n Label: <label tokens>

vLLM's offline API takes a token prompt with images beside it, `{"prompt_token_ids": [...], "multi_modal_data":
{"image": [PIL images]}}`, and expands each placeholder to the image's embedding positions itself, so the label and
candidate continuations are still scored token by token, read from log-probabilities, and turned into confidences
by the same maths as text documents. What differs between model families is only the placeholder text and how many
prompt tokens a page costs; both are here, with the page resizing that bounds that cost.

Families (each placeholder is the one vLLM's model class returns from `get_placeholder_str("image", i)`,
checked against vLLM 0.33 in tests/test_vllm_vision.py, and the one its offline vision example prompts use):
* qwen2_vl: Qwen2-VL and Qwen2.5-VL, `<|vision_start|><|image_pad|><|vision_end|>`; a 28x28 pixel patch is one
  token, so a page resized to multiples of 28 costs exactly (w/28)(h/28) tokens.
* qwen3_vl: Qwen3-VL, the same placeholder with 32x32 pixel patches.
* gemma3: Gemma 3 4B/12B/27B, `<start_of_image>`; every image is 256 soft tokens (pan and scan off).
* idefics3: SmolVLM and Idefics3, `<image>`; the page is cut into 512-pixel tiles plus one whole-page tile, 64
  tokens each for SmolVLM's small models (an estimate: set `page_tokens` for another model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from docroute.schemas.pages import PageImages, PageImagesError
from docroute.schemas.spec import VllmVisionSpec

# ----------------------------------------------------------------------------------------------------------
# model families


@dataclass(frozen=True, slots=True)
class Family:
    """How one family of vision-language models writes an image in a prompt, and what a page costs there."""

    name: str
    placeholder: str  # one image, as the model's prompt format writes it (special tokens, tokenized as markup)
    factor: int  # page sides are resized to multiples of this (the model's patch x merge size); 1: any size
    tokens: Callable[[int, int], int]  # prompt tokens of one page image of (width, height), placeholder included


def _qwen_tokens(patch: int) -> Callable[[int, int], int]:
    def tokens(width: int, height: int) -> int:
        return (width // patch) * (height // patch) + 2  # + <|vision_start|> and <|vision_end|>

    return tokens


GEMMA3_IMAGE_TOKENS = 256
"""Soft tokens of one Gemma 3 image (config mm_tokens_per_image), whatever its size, with pan and scan off."""

IDEFICS3_TILE, IDEFICS3_LONGEST, IDEFICS3_TILE_TOKENS = 512, 2048, 64
"""SmolVLM (256M/500M): pages scaled to a 2048-pixel longest edge, cut into 512-pixel tiles of 64 tokens each."""


def _idefics3_tokens(width: int, height: int) -> int:
    scale = min(1.0, IDEFICS3_LONGEST / max(width, height, 1))
    columns = math.ceil(width * scale / IDEFICS3_TILE)
    rows = math.ceil(height * scale / IDEFICS3_TILE)
    tiles = columns * rows + (1 if columns * rows > 1 else 0)  # the whole page once more, when it was cut
    return tiles * (IDEFICS3_TILE_TOKENS + 3) + 2  # each tile's own markers, and the row breaks around them


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>", 28, _qwen_tokens(28)),
    "qwen3_vl": Family("qwen3_vl", "<|vision_start|><|image_pad|><|vision_end|>", 32, _qwen_tokens(32)),
    "gemma3": Family("gemma3", "<start_of_image>", 1, lambda width, height: GEMMA3_IMAGE_TOKENS + 6),
    "idefics3": Family("idefics3", "<image>", 1, _idefics3_tokens),
}


def family_of(vision: VllmVisionSpec) -> Family:
    """The spec's family (the spec resolved `auto` from the model name when it was loaded)."""
    try:
        return FAMILIES[vision.family]
    except KeyError:
        raise ValueError(f"small_model.vision.family {vision.family!r} is not one of {sorted(FAMILIES)}") from None


# ----------------------------------------------------------------------------------------------------------
# page sizes


def fitted_size(width: int, height: int, *, max_pixels: int, factor: int = 1) -> tuple[int, int]:
    """The page's size once scaled down to at most `max_pixels` pixels, its sides multiples of `factor`.

    The aspect ratio is kept (to within one `factor`), a page is never scaled up, and no side is shorter than
    `factor`. A Qwen page of this size is left as it is by the model's own processor, so its token count is exact.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"a page of {width}x{height} pixels")
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    new_width = max(factor, math.floor(width * scale / factor) * factor)
    new_height = max(factor, math.floor(height * scale / factor) * factor)
    return new_width, new_height


def fit_image(image: Any, *, max_pixels: int, factor: int = 1) -> Any:
    """A PIL image as RGB at `fitted_size` (the same image when nothing changes)."""
    from PIL import Image

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    size = fitted_size(rgb.width, rgb.height, max_pixels=max_pixels, factor=factor)
    if size == (rgb.width, rgb.height):
        return rgb
    return rgb.resize(size, Image.Resampling.BICUBIC)


def page_size_estimate(max_pixels: int, factor: int) -> tuple[int, int]:
    """The size an A4/Letter portrait page (1:1.414) takes at `max_pixels`: the budget planned for each page."""
    height = math.sqrt(max_pixels * 1.414)
    return fitted_size(max(1, round(height / 1.414)), max(1, round(height)), max_pixels=max_pixels, factor=factor)


# ----------------------------------------------------------------------------------------------------------
# one document's pages


@dataclass(frozen=True, slots=True, eq=False)
class DocPages:
    """The pages one document shows: `count` images from `source`, standing for `tokens` prompt tokens.

    Every call of the document carries the same object, so the runtime renders its pages once per vLLM call and
    vLLM sees the same images (and reuses their prefix-cache blocks) in each of them.
    """

    source: PageImages
    count: int
    tokens: int
    max_pixels: int
    factor: int

    def render(self) -> list[Any]:
        """The page images, resized; exactly `count` of them or PageImagesError (the prompt has `count` slots)."""
        images = list(self.source.render(self.count, self.max_pixels))
        if len(images) != self.count:
            raise PageImagesError(f"{len(images)} page image(s) rendered where {self.count} were asked for")
        return [fit_image(image, max_pixels=self.max_pixels, factor=self.factor) for image in images]

    def uuids(self) -> list[str]:
        """Stable names of the page images (content hash, page, size bound), so vLLM need not hash the pixels."""
        return [f"{self.source.key}:p{page + 1}:{self.max_pixels}" for page in range(self.count)]


def doc_pages(pages: PageImages | None, vision: VllmVisionSpec | None) -> DocPages | None:
    """What a request shows on the vision path, or None: the text path (no vision, or a document with text)."""
    if pages is None or vision is None or pages.count <= 0:
        return None
    family = family_of(vision)
    count = min(vision.max_pages, pages.count)
    per_page = vision.page_tokens or family.tokens(*page_size_estimate(vision.max_pixels, family.factor))
    return DocPages(pages, count, count * per_page, vision.max_pixels, family.factor)


def page_markup(family: Family, count: int) -> str:
    """The prompt text standing for `count` page images, one per line, placed just before the document."""
    return "".join(f"Page {page}: {family.placeholder}\n" for page in range(1, count + 1))


# ----------------------------------------------------------------------------------------------------------
# vLLM inputs (plain dicts: vLLM's TokensPrompt is a TypedDict)


def mm_prompt(tokens: Sequence[int], images: Sequence[Any], uuids: Sequence[str] | None = None) -> dict[str, Any]:
    """vLLM's token prompt with images: each placeholder in `tokens` takes the next image, in order."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(tokens), "multi_modal_data": {"image": list(images)}}
    if uuids is not None:
        prompt["multi_modal_uuids"] = {"image": list(uuids)}
    return prompt


def llm_kwargs(vision: VllmVisionSpec) -> dict[str, Any]:
    """What vllm.LLM needs beside the text path's arguments: room for `max_pages` images in one prompt."""
    return {"limit_mm_per_prompt": {"image": vision.max_pages}}


def call_groups(images: Sequence[object | None], limit: int) -> list[tuple[int, int]]:
    """Split consecutive calls into [start, end) runs holding at most `limit` distinct page sets.

    `images[i]` is call i's page set (None: a text call, which costs no image memory). A document's calls are
    consecutive, so its pages are rendered once, for the one run that holds all its calls.
    """
    if limit < 1:
        raise ValueError("a vLLM call holds at least one document's pages")
    groups: list[tuple[int, int]] = []
    start = 0
    seen: set[int] = set()
    for index, item in enumerate(images):
        if item is None or id(item) in seen:
            continue
        if len(seen) == limit:
            groups.append((start, index))
            start, seen = index, set()
        seen.add(id(item))
    if images:
        groups.append((start, len(images)))
    return groups


__all__ = [
    "FAMILIES",
    "DocPages",
    "Family",
    "call_groups",
    "doc_pages",
    "family_of",
    "fit_image",
    "fitted_size",
    "llm_kwargs",
    "mm_prompt",
    "page_markup",
]
