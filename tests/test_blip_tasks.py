"""The BLIP tasks: NLVR2-style ``reasoning`` (side-by-side image through the ITM head) and generative ``vqa``, their
collators from the released formats, splits, reference lengths, and a short search of each on a tiny BLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from PIL import Image
from tiny_blip import IMAGE, make_blip
from tiny_clip import quick
from transformers import BlipImageProcessorPil

import comp_vlm
from comp_vlm import ConfigError
from comp_vlm.data.files import process_images
from comp_vlm.data.nlvr2 import NLVR2Example, read_nlvr2_split, write_nlvr2
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.data.vqa_eval import evaluate_vqa
from comp_vlm.data.vqav2 import VQAQuestion, image_file_name, read_vqav2_split, write_vqav2
from comp_vlm.tasks import make_task, task_data, task_names, tasks_for_model
from comp_vlm.tasks.base import mean_reference_lengths
from comp_vlm.tasks.reasoning import (
    ReasoningCollator,
    ReasoningTask,
    nlvr2_loaders,
    reasoning_metrics,
    side_by_side,
)
from comp_vlm.tasks.vqa import (
    BlipVQACollator,
    VQATask,
    held_out_images,
    split_held_out,
    vqav2_loaders,
    vqav2_roles,
)

STATEMENTS = ["a red circle left of a blue square", "the big green triangle", "a small square",
              "the left circle is red and the right square is big"]
ANSWERS = ["red", "blue", "big square", "green"]


def png(path, seed: int) -> None:
    """A random 20x20 RGB image (the processor resizes it to the model's 16 px)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_nlvr2_dir(root, sizes=(("train", 8), ("dev", 4), ("test1", 4))) -> None:
    """An NLVR2 folder as released: data/<split>.json, images/<split>/[<directory>/] (train numbered)."""
    for s, (split, n) in enumerate(sizes):
        examples = []
        for i in range(n):
            directory = i % 2 if split == "train" else None
            ident = f"{split}-{i}-0-0"
            folder = root / "images" / split / (str(directory) if directory is not None else "")
            for side in range(2):
                png(folder / f"{split}-{i}-0-img{side}.png", 100 * s + 2 * i + side)
            examples.append(NLVR2Example(ident, STATEMENTS[i % len(STATEMENTS)], i % 3 == 0, directory))
        write_nlvr2(root / "data" / f"{split}.json", examples)


def write_vqav2_dir(root, sizes=(("train", 12), ("val", 3))) -> None:
    """A VQAv2 folder as the emoji world writes it (subtypes train and val), two questions per image."""
    for s, (subtype, n) in enumerate(sizes):
        questions = []
        for i in range(n):
            image_id = 1000 * s + i + 1
            png(root / subtype / image_file_name(subtype, image_id, "EMOJI", "png"), 7 * image_id)
            for k in range(2):
                answer = ANSWERS[(i + k) % len(ANSWERS)]
                questions.append(VQAQuestion(10 * image_id + k, image_id, STATEMENTS[(i + k) % len(STATEMENTS)],
                                             (answer,) * 7 + ("red",) * 3, answer, "what", "other"))
        write_vqav2(root, subtype, questions, data_type="emoji")


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def processor():
    return BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})


@pytest.fixture(scope="module")
def nlvr2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    write_nlvr2_dir(root)
    return root


@pytest.fixture(scope="module")
def vqav2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqav2")
    write_vqav2_dir(root)
    return root


# ---- registry ----------------------------------------------------------------------------------------------------------
def test_reasoning_and_vqa_are_registered_and_refuse_other_models():
    assert {"reasoning", "vqa"} <= set(task_names())
    assert isinstance(make_task("reasoning"), ReasoningTask) and isinstance(make_task("vqa"), VQATask)
    assert (task_data("reasoning"), task_data("vqa"), task_data("retrieval")) == (nlvr2_loaders, vqav2_loaders, None)
    retrieval, vqa = make_blip(0), make_blip(0, vqa=True)
    assert tasks_for_model(retrieval) == ("reasoning",) and tasks_for_model(vqa) == ("vqa",)
    with pytest.raises(ConfigError, match=r"task reasoning needs a BlipForImageTextRetrieval model, not BlipForQuestionAnswering "
                                          r"\(tasks for BlipForQuestionAnswering: vqa\)"):
        make_task("reasoning").check_model(vqa)
    with pytest.raises(ConfigError, match="task vqa needs a BlipForQuestionAnswering or LlavaForConditionalGeneration "
                                          "model, not BlipForImageTextRetrieval "
                                          r"\(tasks for BlipForImageTextRetrieval: reasoning\)"):
        make_task("vqa").check_model(retrieval)


# ---- reasoning -------------------------------------------------------------------------------------------------------
def test_reasoning_collator_puts_left_and_right_side_by_side(nlvr2_dir, tokenizer, processor):
    examples = read_nlvr2_split(nlvr2_dir, "train")[:3]
    batch = ReasoningCollator(tokenizer, processor)(examples)
    left = process_images([ex.left for ex in examples], processor)
    right = process_images([ex.right for ex in examples], processor)
    assert batch["pixel_values"].shape == (3, 3, IMAGE, 2 * IMAGE)
    assert torch.equal(batch["pixel_values"][..., :IMAGE], left)
    assert torch.equal(batch["pixel_values"][..., IMAGE:], right)
    text = tokenizer([ex.sentence for ex in examples], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], text["input_ids"])
    assert torch.equal(batch["attention_mask"], text["attention_mask"])
    assert batch["labels"].tolist() == [1, 0, 0]  # i % 3 == 0 is true
    assert batch["identifiers"] == ["train-0-0-0", "train-1-0-0", "train-2-0-0"]


def test_nlvr2_loaders_take_stage_costs_from_dev_and_test_from_test1(nlvr2_dir, tokenizer, processor):
    loaders = nlvr2_loaders(nlvr2_dir, None, tokenizer, processor, batch_size=4, eval_batch_size=3)
    ids = lambda batches: [i for b in batches for i in b["identifiers"]]
    assert ids(loaders.val) == [f"dev-{i}-0-0" for i in range(4)]
    assert ids(loaders.test) == [f"test1-{i}-0-0" for i in range(4)]
    assert sorted(ids(loaders.train)) == sorted(f"train-{i}-0-0" for i in range(8))
    with pytest.raises(ConfigError, match="batch size 9 must be between 1 and the 8 training records"):
        nlvr2_loaders(nlvr2_dir, None, tokenizer, processor, batch_size=9)


def test_reasoning_loss_and_accuracy_on_hand_computed_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    metrics = reasoning_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    # cross-entropy of a two-way softmax: log(1 + e^(other - own))
    assert metrics["loss"] == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))
                                             + math.log1p(math.exp(-2))) / 3)


def test_reasoning_task_loss_and_evaluate_read_the_itm_head_on_the_side_by_side_image(nlvr2_dir, tokenizer,
                                                                                      processor):
    model, task = make_blip(0), ReasoningTask()
    batches = nlvr2_loaders(nlvr2_dir, None, tokenizer, processor, batch_size=4).val
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  pixel_values=b["pixel_values"], interpolate_pos_encoding=True).itm_score
                            for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        assert float(task.loss(model, batches[0])) == pytest.approx(
            float(F.cross_entropy(logits[:len(batches[0]["labels"])], batches[0]["labels"])), rel=1e-6)
    assert task.evaluate(model, batches) == pytest.approx(reasoning_metrics(logits, labels))


def _concatenated_memory_itm(model, input_ids, attention_mask, left, right) -> torch.Tensor:
    """ITM logits with both images' tokens concatenated into one cross-attention memory (what does NOT work)."""
    memory = torch.cat([model.vision_model(pixel_values=p).last_hidden_state for p in (left, right)], dim=1)
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory,
                              encoder_attention_mask=torch.ones(memory.shape[:2], dtype=torch.long))
    return model.itm_head(text.last_hidden_state[:, 0])


def test_swapping_left_and_right_changes_the_side_by_side_logits_but_not_a_concatenated_memory(tokenizer):
    """The documented fact behind the side-by-side design: cross-attention ignores the order of its memory, and both
    images carry the same position embeddings, so a concatenated memory cannot tell left from right."""
    model = make_blip(0)
    gen = torch.Generator().manual_seed(3)
    left, right = (torch.randn(2, 3, IMAGE, IMAGE, generator=gen) for _ in range(2))
    text = tokenizer(STATEMENTS[:2], padding=True, return_tensors="pt")
    task = ReasoningTask()
    with torch.no_grad():
        both = [task.logits(model, {**text, "pixel_values": side_by_side(a, b)}) for a, b in ((left, right),
                                                                                             (right, left))]
        concatenated = [_concatenated_memory_itm(model, text["input_ids"], text["attention_mask"], a, b)
                        for a, b in ((left, right), (right, left))]
    # measured: 1.1e-3 apart side by side; 7e-8 (float summation order) with the memory concatenated
    assert (both[0] - both[1]).abs().max() > 1e-4
    torch.testing.assert_close(concatenated[0], concatenated[1], rtol=0, atol=1e-6)


def test_reasoning_reference_lengths_count_the_side_by_side_width(nlvr2_dir, tokenizer, processor):
    task = ReasoningTask()
    batch = ReasoningCollator(tokenizer, processor)(read_nlvr2_split(nlvr2_dir, "train")[:4])
    lengths = task.reference_lengths(batch)
    assert set(lengths) == set(task.reference_keys) == {"image_size", "image_width", "text_length"}
    assert lengths["image_size"].tolist() == [IMAGE] * 4 and lengths["image_width"].tolist() == [2 * IMAGE] * 4
    assert lengths["text_length"].tolist() == [len(tokenizer(s)["input_ids"]) for s in STATEMENTS]


# ---- vqa ---------------------------------------------------------------------------------------------------------------
def test_vqa_collator_builds_loss_and_generate_inputs(vqav2_dir, tokenizer, processor):
    questions = read_vqav2_split(vqav2_dir, "val")[:4]
    bos = 7
    batch = BlipVQACollator(tokenizer, processor, bos)(questions)
    loss, gen = batch["loss_inputs"], batch["generate_inputs"]
    assert set(gen) == {"input_ids", "attention_mask", "pixel_values"}
    assert all(torch.equal(loss[k], gen[k]) for k in gen)
    assert torch.equal(gen["pixel_values"], process_images([q.image for q in questions], processor))
    answers = tokenizer([q.multiple_choice_answer for q in questions], padding=True, return_tensors="pt")
    expected = answers["input_ids"].clone()
    expected[:, 0] = bos
    assert torch.equal(loss["decoder_input_ids"], expected)
    assert torch.equal(loss["decoder_attention_mask"], answers["attention_mask"])
    assert torch.equal(loss["labels"], expected.masked_fill(answers["attention_mask"] == 0, -100))
    assert (loss["labels"] == -100).any()  # "big square" is longer than the one-word answers
    assert batch["questions"] == questions
    assert batch["decode"](answers["input_ids"]) == [q.multiple_choice_answer for q in questions]
    lengths = VQATask().reference_lengths(batch)
    assert set(lengths) == set(VQATask.reference_keys)
    assert lengths["answer_length"].tolist() == answers["attention_mask"].sum(1).tolist()
    assert lengths["text_length"].tolist() == gen["attention_mask"].sum(1).tolist()
    assert lengths["image_size"].tolist() == lengths["image_width"].tolist() == [IMAGE] * 4


def test_vqa_held_out_split_is_fixed_whole_images_and_disjoint(vqav2_dir):
    train = read_vqav2_split(vqav2_dir, "train")
    held = held_out_images(train, 0.25)
    assert len(held) == 3 and held == held_out_images(list(reversed(train)), 0.25)
    kept, out = split_held_out(train, 0.25)
    assert {q.image_id for q in out} == held and not held & {q.image_id for q in kept}
    assert len(kept) + len(out) == len(train)
    roles = vqav2_roles(vqav2_dir)
    assert [q.question_id for q in roles["test"]] == [q.question_id for q in read_vqav2_split(vqav2_dir, "val")]
    assert len({q.image_id for q in roles["val"]}) == 1  # 1/12 of 12 images
    assert {q.question_id for q in roles["train"] + roles["val"]} == {q.question_id for q in train}


def test_vqa_training_loss_passes_labels_apart_from_the_decoder_input(vqav2_dir, tokenizer, processor):
    model, task = make_blip(0, vqa=True), VQATask()
    batch = BlipVQACollator.for_model(model, tokenizer, processor)(read_vqav2_split(vqav2_dir, "val")[:4])
    inputs = batch["loss_inputs"]
    with pytest.raises(IndexError):  # why the labels are passed apart: -100 is no token id
        model(**{k: v for k, v in inputs.items() if k != "decoder_input_ids"})
    loss = task.loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.text_decoder.cls.predictions.decoder.weight.grad.abs().sum() > 0
    # padded answer positions are ignored: other ids there give the same loss
    padded = inputs["decoder_attention_mask"] == 0
    other = {**inputs, "decoder_input_ids": inputs["decoder_input_ids"].masked_fill(padded, 5)}
    with torch.no_grad():
        assert float(task.loss(model, {"loss_inputs": other})) == pytest.approx(float(loss), rel=1e-6)


def test_vqa_accuracy_is_the_official_accuracy_of_the_generated_answers(vqav2_dir, tokenizer, processor):
    model, task = make_blip(0, vqa=True), VQATask(max_answer_tokens=3)
    comp_vlm.get_adapter(model).install()
    batches = vqav2_loaders(vqav2_dir, model, tokenizer, processor, batch_size=4, eval_batch_size=4).test
    metrics = task.evaluate(model, batches)
    with torch.no_grad():
        predictions = {q.question_id: a for b in batches for q, a in zip(b["questions"], task.answers(model, b))}
    questions = [q for b in batches for q in b["questions"]]
    assert metrics["vqa_accuracy"] == pytest.approx(evaluate_vqa(predictions, questions)["overall"])
    assert metrics["vqa_accuracy/other"] == metrics["vqa_accuracy"]
    # hand-computed: 7 of 10 humans answered the trained answer, 3 said "red" (90% for "red" unless it is the answer)
    fixed = [{**b, "decode": lambda ids: ["red"] * len(ids)} for b in batches]
    expected = [100.0 if q.multiple_choice_answer == "red" else 90.0 for q in questions]
    assert task.evaluate(model, fixed)["vqa_accuracy"] == pytest.approx(sum(expected) / len(expected))


# ---- a short search of each task ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reasoning", "vqa"])
def test_a_short_prune_of_each_task_completes_and_reports_the_task_metric(name, nlvr2_dir, vqav2_dir, tokenizer,
                                                                          processor):
    task = make_task(name)
    model = make_blip(0, vqa=name == "vqa")
    if name == "vqa":
        task.max_answer_tokens = 3
    root = vqav2_dir if name == "vqa" else nlvr2_dir
    loaders = task_data(name)(root, model, tokenizer, processor, batch_size=4)  # the task's data registry
    expected = {key: round(v) for key, v in mean_reference_lengths(task, loaders.train).items()}  # one epoch
    config = quick(ratio=0.2, stage_steps=2, finetune_steps=1, calibration_batches=1, reference=None)
    result = comp_vlm.prune(model, task, loaders.train, loaders.val, config, test_data=loaders.test)
    assert result.not_reached == []
    assert 0.0 <= result.metrics[0.2][task.primary_metric] <= 100.0
    assert {k: result.recipe.reference[k] for k in task.reference_keys} == expected
    assert expected["image_width"] == (2 * IMAGE if name == "reasoning" else IMAGE)


def test_batch_to_moves_the_tensors_of_nested_input_groups():
    batch = {"loss_inputs": {"input_ids": torch.ones(2, 3)}, "ids": torch.zeros(2), "questions": ["q"]}
    moved = VQATask.batch_to(batch, "meta")
    assert moved["loss_inputs"]["input_ids"].is_meta and moved["ids"].is_meta and moved["questions"] == ["q"]
    assert not batch["loss_inputs"]["input_ids"].is_meta
