"""The vLLM engine's vision path without a GPU: spec, page sizes, prompt markup, multimodal inputs, the engine's plan.

The toy runtime of tests/test_vllm.py stands in for vLLM; it ignores pixels (it answers from the prompt's text), so
these tests check what the engine sends and how it reads answers, never what a vision model would see. Tests that
build vLLM's own input types run where vllm imports (CI's side environment); the end-to-end test runs a real small
vision-language model only with vllm and a CUDA GPU.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError
from test_vllm import INVOICE, ToyRuntime, classify_task, extract_task

from docroute.engines.base import EngineUnavailableError, Request
from docroute.engines.local.vllm import Call, VllmEngine, llm_kwargs, prompt_inputs, runtime_key, score_calls
from docroute.engines.local.vllm_vision import (
    FAMILIES,
    DocPages,
    call_groups,
    doc_pages,
    family_of,
    fit_image,
    fitted_size,
    mm_prompt,
    page_markup,
    page_size_estimate,
)
from docroute.engines.scoring import fewshot
from docroute.schemas.pages import PageImages, PageImagesError
from docroute.schemas.spec import JobSpec, VllmSpec, VllmVisionSpec, vision_family

# ----------------------------------------------------------------------------------------------------------
# a toy runtime that can show pages, and pages that count their renders

SPECIAL = {"<|vision_start|>": 0x110001, "<|image_pad|>": 0x110002, "<|vision_end|>": 0x110003}
SPECIAL |= {"<start_of_image>": 0x110004, "<image>": 0x110005}


class VisionToy(ToyRuntime):
    """ToyRuntime plus image markup: placeholder strings become ids above any character; pixels are ignored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inputs: list[list[dict[str, Any]]] = []

    def markup(self, text: str) -> list[int]:
        tokens: list[int] = []
        while text:
            special = next((s for s in SPECIAL if text.startswith(s)), None)
            if special is not None:
                tokens.append(SPECIAL[special])
                text = text[len(special) :]
            else:
                tokens.append(ord(text[0]))
                text = text[1:]
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens if t != 1 and t < 0x110000)

    def chat_prompt(self, messages: list[dict[str, str]], lead: str = "") -> list[int]:
        head = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
        tail = f"{messages[-1]['content']}\n\nAnswer (one JSON object):\n"
        return self.bos() + self.encode(head) + self.markup(lead) + self.encode(tail)

    def run(self, calls: Sequence[Call]) -> tuple[list[Any], float]:
        self.inputs.append(prompt_inputs(calls))  # what VllmRuntime would hand to LLM.generate (images rendered)
        return super().run(calls)


@dataclass
class Pages:
    """A PageImages render function over blank pages of one size, counting how often it is asked."""

    size: tuple[int, int] = (1700, 2200)
    fail: bool = False
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, pages: int, max_pixels: int) -> list[Any]:
        self.calls.append((pages, max_pixels))
        if self.fail:
            raise PageImagesError("the file changed after it was read")
        return [Image.new("L", self.size, 255) for _ in range(pages)]


def scanned(doc_id: str, text: str, *, count: int = 1, pages: Pages | None = None) -> Request:
    render = pages or Pages()
    return Request(doc_id, text, page_images=PageImages(key=f"sha-{doc_id}", count=count, render=render))


def vision_spec(**vision: Any) -> VllmSpec:
    return VllmSpec(model="Qwen/Qwen2.5-VL-3B-Instruct", vision=vision)


# ----------------------------------------------------------------------------------------------------------
# the spec


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_vl"),
        ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
        ("/models/qwen2_5_vl_7b_awq", "qwen2_vl"),
        ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl"),
        ("google/gemma-3-4b-it", "gemma3"),
        ("google/gemma-3-27b-it", "gemma3"),
        ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3"),
        ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "idefics3"),
        ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
        ("google/gemma-3-1b-it", None),  # text only
        ("google/gemma-3-270m", None),
        ("Qwen/Qwen2.5-0.5B-Instruct", None),
    ],
)
def test_the_family_is_read_from_the_model_name(model: str, family: str | None) -> None:
    assert vision_family(model) == family


def test_auto_family_is_resolved_when_the_spec_loads() -> None:
    assert vision_spec().vision == VllmVisionSpec(family="qwen2_vl")
    assert VllmSpec(model="google/gemma-3-4b-it", vision={}).vision.family == "gemma3"  # type: ignore[union-attr]
    explicit = VllmSpec(model="/models/my-finetune", vision={"family": "idefics3"})
    assert explicit.vision is not None and explicit.vision.family == "idefics3"


def test_vision_config_errors_say_what_to_set() -> None:
    with pytest.raises(ValidationError, match=r"cannot tell the image prompt format of '/models/my-finetune'.*family"):
        VllmSpec(model="/models/my-finetune", vision={})
    with pytest.raises(ValidationError, match="family"):
        VllmSpec(model="Qwen/Qwen2.5-VL-3B-Instruct", vision={"family": "llava"})
    with pytest.raises(ValidationError, match="max_pages"):
        vision_spec(max_pages=0)
    with pytest.raises(ValidationError, match="max_pixels"):
        vision_spec(max_pixels=100)
    with pytest.raises(ValidationError, match="documents_per_call"):
        vision_spec(documents_per_call=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        vision_spec(dpi=300)


def _job(small_model: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "vision-job",
            "source": {"url": "memory://docs"},
            "task": {"classify": {"labels": [{"name": "invoice"}, {"name": "receipt"}]}},
            "small_model": small_model,
            "output": {"url": "memory://out"},
        }
    )


def test_vision_unset_keeps_the_spec_hash_and_set_changes_it() -> None:
    plain = _job({"engine": "vllm", "model": "Qwen/Qwen2.5-VL-3B-Instruct"})
    assert "vision" not in plain.model_dump()["small_model"]
    seen = _job({"engine": "vllm", "model": "Qwen/Qwen2.5-VL-3B-Instruct", "vision": {}})
    assert seen.spec_hash() != plain.spec_hash()  # confidences change: certified thresholds must be redone


def test_llm_kwargs_allow_the_pages_per_prompt() -> None:
    assert "limit_mm_per_prompt" not in llm_kwargs(VllmSpec(model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert llm_kwargs(vision_spec(max_pages=3))["limit_mm_per_prompt"] == {"image": 3}
    assert runtime_key(vision_spec(max_pages=3)) != runtime_key(vision_spec(max_pages=2))


def test_the_example_job_loads() -> None:
    from docroute.schemas.load import load_job

    example = Path(__file__).resolve().parents[1] / "examples" / "engines" / "vllm_vision.yaml"
    spec = load_job(example, env={"OPENAI_API_KEY": "sk-test-not-a-key"})
    assert isinstance(spec.small_model, VllmSpec) and spec.small_model.vision is not None
    assert spec.small_model.vision.family == "qwen2_vl" and spec.small_model.vision.max_pages == 1


# ----------------------------------------------------------------------------------------------------------
# page sizes


@pytest.mark.parametrize("size", [(1654, 2339), (2480, 3508), (3508, 2480), (600, 800), (20, 5000), (5, 5)])
@pytest.mark.parametrize(("max_pixels", "factor"), [(1280 * 28 * 28, 28), (1_000_000, 32), (500_000, 1)])
def test_fitted_size_stays_within_the_bound(size: tuple[int, int], max_pixels: int, factor: int) -> None:
    width, height = size
    new_width, new_height = fitted_size(width, height, max_pixels=max_pixels, factor=factor)
    assert new_width % factor == 0 and new_height % factor == 0
    assert new_width >= factor and new_height >= factor
    assert new_width <= max(width, factor) and new_height <= max(height, factor)  # never scaled up
    if width * height > max_pixels and min(width, height) > 4 * factor:
        assert new_width * new_height <= max_pixels
        assert new_width * new_height > max_pixels * 0.8  # and not needlessly small
        assert abs(new_width / new_height - width / height) < 0.1 * width / height  # the aspect ratio kept
    with pytest.raises(ValueError, match="0x10"):
        fitted_size(0, 10, max_pixels=max_pixels)


def test_fit_image_resizes_to_rgb_within_the_bound() -> None:
    page = Image.new("L", (2480, 3508), 255)
    fitted = fit_image(page, max_pixels=1280 * 28 * 28, factor=28)
    assert fitted.mode == "RGB" and fitted.width % 28 == 0 and fitted.height % 28 == 0
    assert fitted.width * fitted.height <= 1280 * 28 * 28
    small = Image.new("RGB", (280, 392))
    assert fit_image(small, max_pixels=1280 * 28 * 28, factor=28) is small  # already fits: not copied


def test_qwen_page_tokens_are_exact_for_a_fitted_page() -> None:
    qwen = FAMILIES["qwen2_vl"]
    width, height = fitted_size(2480, 3508, max_pixels=1280 * 28 * 28, factor=28)
    assert qwen.tokens(width, height) == (width // 28) * (height // 28) + 2 <= 1280 + 2
    assert FAMILIES["qwen3_vl"].tokens(320, 640) == 10 * 20 + 2
    assert FAMILIES["gemma3"].tokens(896, 896) == FAMILIES["gemma3"].tokens(3000, 4000)  # fixed per image
    assert FAMILIES["idefics3"].tokens(512, 512) < FAMILIES["idefics3"].tokens(1536, 2048)  # more tiles
    width, height = page_size_estimate(1280 * 28 * 28, 28)
    assert height > width and width * height <= 1280 * 28 * 28


# ----------------------------------------------------------------------------------------------------------
# prompt markup and vLLM inputs


def test_placeholders_per_family() -> None:
    assert page_markup(FAMILIES["qwen2_vl"], 2) == (
        "Page 1: <|vision_start|><|image_pad|><|vision_end|>\nPage 2: <|vision_start|><|image_pad|><|vision_end|>\n"
    )
    assert page_markup(FAMILIES["qwen3_vl"], 1) == "Page 1: <|vision_start|><|image_pad|><|vision_end|>\n"
    assert page_markup(FAMILIES["gemma3"], 1) == "Page 1: <start_of_image>\n"
    assert page_markup(FAMILIES["idefics3"], 3).count("<image>") == 3
    with pytest.raises(ValueError, match="not one of"):
        family_of(VllmVisionSpec.model_construct(family="llava"))


def test_mm_prompt_is_vllms_token_prompt_with_images() -> None:
    images = [Image.new("RGB", (28, 28)), Image.new("RGB", (56, 28))]
    prompt = mm_prompt((1, 2, 3), images, ["a:p1", "a:p2"])
    assert prompt == {
        "prompt_token_ids": [1, 2, 3],
        "multi_modal_data": {"image": images},
        "multi_modal_uuids": {"image": ["a:p1", "a:p2"]},
    }
    assert "multi_modal_uuids" not in mm_prompt([1], images[:1])


def test_doc_pages_bounds_the_pages_and_estimates_their_tokens() -> None:
    vision = VllmVisionSpec(family="qwen2_vl", max_pages=2)
    source = PageImages(key="sha", count=5, render=Pages())
    assert doc_pages(None, vision) is None and doc_pages(source, None) is None
    assert doc_pages(PageImages(key="sha", count=0, render=Pages()), vision) is None
    pages = doc_pages(source, vision)
    assert pages is not None and pages.count == 2
    assert pages.tokens == 2 * FAMILIES["qwen2_vl"].tokens(*page_size_estimate(vision.max_pixels, 28))
    assert pages.uuids() == [f"sha:p1:{vision.max_pixels}", f"sha:p2:{vision.max_pixels}"]
    fixed = doc_pages(source, VllmVisionSpec(family="gemma3", max_pages=4, page_tokens=300))
    assert fixed is not None and (fixed.count, fixed.tokens) == (4, 1200)


def test_render_checks_the_page_count_and_resizes() -> None:
    render = Pages(size=(2480, 3508))
    pages = DocPages(PageImages(key="k", count=3, render=render), 2, 100, 1280 * 28 * 28, 28)
    images = pages.render()
    assert render.calls == [(2, 1280 * 28 * 28)] and len(images) == 2
    assert all(i.mode == "RGB" and i.width % 28 == 0 and i.width * i.height <= 1280 * 28 * 28 for i in images)
    short = DocPages(PageImages(key="k", count=3, render=lambda n, px: [Image.new("RGB", (28, 28))]), 2, 1, 10**6, 28)
    with pytest.raises(PageImagesError, match="1 page image"):
        short.render()


def test_call_groups_bound_the_documents_per_call() -> None:
    a, b, c = object(), object(), object()
    assert call_groups([], 2) == []
    assert call_groups([None, None], 1) == [(0, 2)]
    assert call_groups([a, a, b, b, None, c, c], 2) == [(0, 5), (5, 7)]
    assert call_groups([a, b, c], 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="at least one"):
        call_groups([a], 0)


def test_prompt_inputs_render_each_documents_pages_once() -> None:
    render = Pages()
    pages = DocPages(PageImages(key="k", count=1, render=render), 1, 100, 1280 * 28 * 28, 28)
    _, calls = score_calls([5, 6], [[7], [8, 9], [8, 10]], token_ids=True, images=pages)
    inputs = prompt_inputs([Call((1,), read_ids=(2,)), *calls])
    assert inputs[0] == {"prompt_token_ids": [1]}
    assert len(render.calls) == 1  # three calls of one document: its page rendered once
    first = inputs[1]["multi_modal_data"]["image"][0]
    assert all(p["multi_modal_data"]["image"][0] is first for p in inputs[1:])  # the same image object
    assert [p["prompt_token_ids"][:2] for p in inputs[1:]] == [[5, 6]] * len(calls)


# ----------------------------------------------------------------------------------------------------------
# the engine over the toy runtime

QWEN_LEAD = "Page 1: <|vision_start|><|image_pad|><|vision_end|>\n"


def test_a_text_document_stays_on_the_text_path() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(), classify_task(), runtime=runtime)
    [prediction] = engine.predict([Request("t", "Severe weather warnings for the coast tonight.")])
    assert prediction.ok and prediction.label == "weather"
    sent = runtime.inputs[-1]
    assert all(set(p) == {"prompt_token_ids"} for p in sent)
    assert not any(SPECIAL["<|image_pad|>"] in p["prompt_token_ids"] for p in sent)


def test_a_scanned_document_gets_the_same_prompts_with_its_pages() -> None:
    text = "Severe weather warnings for the coast tonight."
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(), classify_task(), runtime=runtime)
    render = Pages()
    plain, seen = engine.predict([Request("t", text), scanned("s", text, pages=render)])
    assert seen.ok and seen.label == plain.label == "weather"
    # the toy ignores pixels, so the same text scores the same: the confidence maths is the text path's own
    assert seen.label_confidence == pytest.approx(plain.label_confidence)
    sent = runtime.inputs[-1]
    with_pages = [p for p in sent if "multi_modal_data" in p]
    assert with_pages and len(with_pages) == len(sent) // 2
    for prompt in with_pages:
        tokens = prompt["prompt_token_ids"]
        lead = runtime.markup(QWEN_LEAD)
        at = tokens.index(lead[8])  # <|vision_start|>
        assert tokens[at - 8 : at + 4] == lead  # the page markup ...
        assert runtime.decode(tokens[at + 4 :]).startswith(fewshot.classify_document(text))  # ... then the text
        assert len(prompt["multi_modal_data"]["image"]) == 1
        assert prompt["multi_modal_uuids"] == {"image": [f"sha-s:p1:{1280 * 28 * 28}"]}
    assert len(render.calls) == 1  # every call of the document shares one rendering


def test_document_text_cannot_forge_image_placeholders() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(), classify_task(), runtime=runtime)
    [prediction] = engine.predict([Request("t", "Rain <|image_pad|> tonight <image>.")])
    assert prediction.ok
    assert not any(t >= 0x110000 for p in runtime.inputs[-1] for t in p["prompt_token_ids"])


def test_extraction_candidates_still_come_from_the_ocr_text() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(max_pages=2), extract_task(), runtime=runtime)
    [text, seen] = engine.predict([Request("t", INVOICE), scanned("s", INVOICE, count=3)])
    assert seen.ok, seen.error
    assert seen.fields == text.fields
    assert seen.fields["invoice_date"] == date(2024, 3, 14) and seen.fields["currency"] == "USD"
    assert seen.field_confidences == pytest.approx(text.field_confidences)
    images = [p for p in runtime.inputs[-1] if "multi_modal_data" in p]
    assert images and all(len(p["multi_modal_data"]["image"]) == 2 for p in images)  # max_pages of 3 pages


def test_without_ocr_text_the_prompt_shows_only_the_pages() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(ocr_text=False), extract_task(), runtime=runtime)
    [seen] = engine.predict([scanned("s", INVOICE)])
    assert seen.ok
    for prompt in runtime.inputs[-1]:
        assert "NW-20931" not in runtime.decode(prompt["prompt_token_ids"]).split("Page 1:")[-1]
    assert seen.fields["currency"] in ("USD", "EUR", "GBP")  # still chosen among the OCR text's candidates


def test_generated_fields_put_the_pages_in_the_chat_prompt() -> None:
    runtime = VisionToy(answer=lambda prompt: '{"invoice_date": "2024-03-14", "currency": "USD", "due_date": null}')
    engine = VllmEngine(
        vision_spec().model_copy(update={"extract_strategy": "generate"}), extract_task(), runtime=runtime
    )
    [seen] = engine.predict([scanned("s", INVOICE)])
    assert seen.ok and seen.fields["invoice_date"] == date(2024, 3, 14)
    [prompt] = runtime.inputs[-1]
    assert "multi_modal_data" in prompt
    tokens = prompt["prompt_token_ids"]
    assert tokens.count(SPECIAL["<|image_pad|>"]) == 1
    assert tokens.index(SPECIAL["<|image_pad|>"]) < len(tokens) - len(runtime.encode(INVOICE))  # before the text


def test_documents_per_call_bounds_the_pages_in_memory() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(documents_per_call=2), classify_task(), runtime=runtime)
    runtime.inputs.clear()
    batch = [scanned(f"s{i}", "Local sports club signs a new coach.") for i in range(5)]
    predictions = engine.predict([Request("t", "Rain tonight."), *batch])
    assert all(p.ok for p in predictions) and {p.label for p in predictions[1:]} == {"sports"}
    assert len(runtime.inputs) == 3  # 5 scanned documents, 2 per call (the text document rides along)
    for sent in runtime.inputs:
        assert len({id(p["multi_modal_data"]["image"][0]) for p in sent if "multi_modal_data" in p}) <= 2


def test_pages_that_cannot_be_rendered_fail_only_their_document() -> None:
    runtime = VisionToy()
    engine = VllmEngine(vision_spec(), classify_task(), runtime=runtime)
    good, bad = engine.predict(
        [scanned("g", "Severe weather tonight."), scanned("b", "Severe weather tonight.", pages=Pages(fail=True))]
    )
    assert good.ok and good.label == "weather"
    assert not bad.ok and "file changed" in (bad.error or "") and bad.retryable


def test_pages_too_large_for_the_context_are_a_document_error() -> None:
    runtime = VisionToy(max_model_len=4096)
    engine = VllmEngine(vision_spec(page_tokens=3900), classify_task(), runtime=runtime)
    text, seen = engine.predict([Request("t", "Rain tonight."), scanned("s", "Rain tonight.")])
    assert text.ok and not seen.ok and not seen.retryable
    assert "page image(s) take about 3900" in (seen.error or "") and "max_pixels" in (seen.error or "")


def test_a_runtime_without_markup_is_refused() -> None:
    with pytest.raises(EngineUnavailableError, match="cannot show page images"):
        VllmEngine(vision_spec(), classify_task(), runtime=ToyRuntime())


# ----------------------------------------------------------------------------------------------------------
# the ingest side: which documents carry pages, and rendering them from the file


def _source_doc(path: Any, fmt: str, *, pages: int = 1, ocr_pages: int = 1) -> Any:
    from docroute.tasks.ingest.read import SourceDocument

    data = path.read_bytes()
    return SourceDocument(
        doc_id="d",
        uri=path.as_uri(),
        record_key=None,
        content_sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        text="TOTAL 9.00",
        error=None,
        pages=pages,
        ocr_pages=ocr_pages,
    )


def test_page_images_come_from_the_file_again(tmp_path) -> None:
    pytest.importorskip("pypdfium2", reason="PDF pages need the [ocr] extra")
    from docroute.tasks.ingest.page_images import page_images

    job = _job({"engine": "vllm", "model": "Qwen/Qwen2.5-VL-3B-Instruct", "vision": {}})
    png = tmp_path / "scan.png"
    Image.new("RGB", (2000, 3000), "white").save(png)
    pages = page_images(job, _source_doc(png, "image"))
    assert pages is not None and pages.count == 1
    [image] = pages.render(1, 500_000)
    assert image.width * image.height <= 500_000  # decoded frames are scaled down at once
    pdf = tmp_path / "scan.pdf"
    Image.new("RGB", (1240, 1754), "white").save(pdf, "PDF", resolution=150.0)
    rendered = page_images(job, _source_doc(pdf, "pdf"))
    assert rendered is not None and len(rendered.render(1, 500_000)) == 1
    assert page_images(job, _source_doc(pdf, "pdf", ocr_pages=0)) is None  # a text layer: the text path
    plain = _job({"engine": "vllm", "model": "Qwen/Qwen2.5-VL-3B-Instruct"})
    assert page_images(plain, _source_doc(png, "image")) is None  # no vision: nothing attached
    png.write_bytes(b"changed")
    with pytest.raises(PageImagesError, match="changed"):
        pages.render(1, 500_000)


# ----------------------------------------------------------------------------------------------------------
# vLLM's own input types (where vllm imports; no GPU needed)


def test_real_vllm_accepts_the_multimodal_token_prompt() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed here")
    from vllm.inputs import TokensPrompt
    from vllm.multimodal.parse import MultiModalDataParser

    keys = TokensPrompt.__annotations__
    assert {"prompt_token_ids", "multi_modal_data", "multi_modal_uuids"} <= set(keys)
    images = [Image.new("RGB", (56, 84)), Image.new("RGB", (28, 28))]
    prompt = TokensPrompt(**mm_prompt([1, 2, 3], images, ["k:p1:100", "k:p2:100"]))  # type: ignore[typeddict-item]
    items = MultiModalDataParser().parse_mm_data(prompt["multi_modal_data"])  # how vLLM reads it
    assert items.get_all_counts() == {"image": 2}
    assert (items["image"].get_image_size(0).width, items["image"].get_image_size(0).height) == (56, 84)


@pytest.mark.parametrize(
    ("family", "module", "model_class"),
    [
        ("qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration"),
        ("qwen2_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
        ("qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration"),
        ("gemma3", "gemma3_mm", "Gemma3ForConditionalGeneration"),
        ("idefics3", "idefics3", "Idefics3ForConditionalGeneration"),
        ("idefics3", "smolvlm", "SmolVLMForConditionalGeneration"),
    ],
)
def test_real_placeholders_are_vllms_own(family: str, module: str, model_class: str) -> None:
    """The placeholder each family writes is the one vLLM's model class gives its chat path."""
    pytest.importorskip("vllm", reason="vllm is not installed here")
    import importlib

    try:
        model = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), model_class)
    except Exception as exc:  # a model module that needs more than this machine has
        pytest.skip(f"vllm.model_executor.models.{module} does not import here: {exc}")
    assert model.get_placeholder_str("image", 1) == FAMILIES[family].placeholder


def test_real_engine_args_take_the_image_limit() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed here")
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(**llm_kwargs(vision_spec(max_pages=3)))
    assert args.limit_mm_per_prompt == {"image": 3}


# ----------------------------------------------------------------------------------------------------------
# end to end on a GPU


def _gpu_skip_reason() -> str | None:
    try:
        import torch
        import vllm  # noqa: F401
    except Exception as exc:  # an import failure of any kind means: not here
        return f"needs vllm and torch ({exc})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


def _page(lines: list[str]) -> Image.Image:
    page = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(page)
    for row, line in enumerate(lines):
        draw.text((100, 120 + row * 60), line, fill="black", font_size=40)
    return page


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_end_to_end_on_a_gpu() -> None:
    """A small VLM (DOCROUTE_VLLM_VISION_TEST_MODEL) answers scanned pages; images reach it (more prompt tokens)."""
    from docroute.engines.local.vllm import shared_runtime

    model = os.environ.get("DOCROUTE_VLLM_VISION_TEST_MODEL", "Qwen/Qwen2.5-VL-3B-Instruct")
    spec = VllmSpec(
        model=model,
        max_model_len=8192,
        gpu_memory_utilization=0.5,
        max_input_tokens=1024,
        vision={"max_pages": 1, "max_pixels": 640 * 28 * 28},
    )
    try:
        runtime = shared_runtime(spec)
    except EngineUnavailableError as exc:
        pytest.skip(f"cannot load {model} here: {exc}")
    task = extract_task()
    engine = VllmEngine(spec, task, runtime=runtime)
    page = _page(INVOICE.splitlines())
    pages = PageImages(key="invoice", count=1, render=lambda n, px: [page])
    text, seen = engine.predict([Request("t", INVOICE), Request("s", INVOICE, page_images=pages)])
    assert text.ok and seen.ok, (text.error, seen.error)
    assert seen.fields["invoice_date"] == date(2024, 3, 14) and seen.fields["currency"] == "USD"
    assert all(c is None or 0.0 <= c <= 1.0 for c in seen.field_confidences.values())
    assert seen.usage.input_tokens > text.usage.input_tokens + 100  # the page's image tokens were in the prompt
