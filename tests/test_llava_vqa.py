"""The ``vqa`` task on LLaVA: its collator (prompt, ``<image>`` expanded as LlavaProcessor does, labels on the answer
only, left-padded generate inputs), the loss against a hand-built forward, generated answers and their accuracy,
the reference lengths, and a short search on a tiny LLaVA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, make_clip
from test_blip_tasks import write_vqav2_dir
from tiny_clip import quick
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent / "contract"))
from families import LLAVA_VOCAB, make_llava

import comp_vlm
from comp_vlm import ConfigError
from comp_vlm.adapters.llava import answer_start
from comp_vlm.data.files import process_images
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.data.vqa_eval import evaluate_vqa
from comp_vlm.data.vqav2 import read_vqav2_split
from comp_vlm.tasks import make_task, task_data, tasks_for_model
from comp_vlm.tasks.base import mean_reference_lengths
from comp_vlm.tasks.vqa import (
    LLAVA_PROMPT,
    BlipVQACollator,
    LlavaVQACollator,
    VQATask,
    llava_image_tokens,
    vqa_collator,
    vqav2_loaders,
)

IMAGE = 16  # make_llava's image size (patch 4: 16 patches + CLS, CLS dropped: 16 image tokens)
IMAGE_TOKENS = 16
PAD, BOS, EOS, IMAGE_ID = 0, 1, 2, LLAVA_VOCAB - 1  # make_llava's special ids


def llava_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with make_llava's special ids (pad 0, BOS 1, EOS 2) and ``<image>`` as a special token
    of the model's ``image_token_id``; it adds BOS only, as Llama's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3}
    for word in sorted(set(WORDS) | {"user", "assistant", ":"}):
        vocab[word] = len(vocab)
    vocab["<image>"] = IMAGE_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


@pytest.fixture(scope="module")
def tokenizer():
    return llava_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


@pytest.fixture(scope="module")
def vqav2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqav2")
    write_vqav2_dir(root)
    return root


def words(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.lower().replace(":", " :").split())


def hand_prompt(tokenizer, question: str) -> list[int]:
    """BOS, ``USER :``, the image tokens, the question, ``ASSISTANT :``."""
    return [BOS] + words(tokenizer, "USER:") + [IMAGE_ID] * IMAGE_TOKENS + words(tokenizer, question) + \
        words(tokenizer, "ASSISTANT:")


def collate(vqav2_dir, tokenizer, processor, n: int = 4) -> tuple[list, dict]:
    questions = read_vqav2_split(vqav2_dir, "val")[:n]
    return questions, LlavaVQACollator.for_model(make_llava(0, "sdpa"), tokenizer, processor)(questions)


# ---- registry ----------------------------------------------------------------------------------------------------------
def test_vqa_runs_on_llava_through_its_own_collator(vqav2_dir, tokenizer, processor):
    from tiny_blip import make_blip

    llava = make_llava(0, "sdpa")
    assert tasks_for_model(llava) == ("vqa",)
    make_task("vqa").check_model(llava)
    assert isinstance(vqa_collator(llava, tokenizer, processor), LlavaVQACollator)
    assert isinstance(vqa_collator(make_blip(0, vqa=True), tokenizer, processor), BlipVQACollator)
    loaders = task_data("vqa")(vqav2_dir, llava, tokenizer, processor, batch_size=4)
    assert (loaders.test[0]["generate_inputs"]["input_ids"] == IMAGE_ID).sum(1).tolist() == [IMAGE_TOKENS] * 4
    clip = make_clip()
    with pytest.raises(ConfigError, match="task vqa has no collator for CLIPModel "
                                          r"\(it has: BlipForQuestionAnswering, LlavaForConditionalGeneration\)"):
        vqa_collator(clip, tokenizer, processor)
    with pytest.raises(ConfigError, match="task vqa needs a BlipForQuestionAnswering or LlavaForConditionalGeneration "
                                          "model, not CLIPModel"):
        make_task("vqa").check_model(clip)


# ---- the collator ------------------------------------------------------------------------------------------------------
def test_llava_collator_builds_the_prompt_answer_and_padding(vqav2_dir, tokenizer, processor):
    questions, batch = collate(vqav2_dir, tokenizer, processor)
    loss, gen = batch["loss_inputs"], batch["generate_inputs"]
    prompts = [hand_prompt(tokenizer, q.question) for q in questions]
    answers = [words(tokenizer, q.multiple_choice_answer) + [EOS] for q in questions]
    rows = [p + a for p, a in zip(prompts, answers)]
    width, prompt_width = max(map(len, rows)), max(map(len, prompts))
    assert len({len(p) for p in prompts}) > 1 and len({len(r) for r in rows}) > 1  # both paddings are exercised
    # loss inputs: right-padded prompt + answer + EOS; generate inputs: left-padded prompts
    assert loss["input_ids"].tolist() == [r + [PAD] * (width - len(r)) for r in rows]
    assert loss["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    assert gen["input_ids"].tolist() == [[PAD] * (prompt_width - len(p)) + p for p in prompts]
    assert gen["attention_mask"].tolist() == [[0] * (prompt_width - len(p)) + [1] * len(p) for p in prompts]
    pixels = process_images([q.image for q in questions], processor)
    assert torch.equal(loss["pixel_values"], pixels) and torch.equal(gen["pixel_values"], pixels)
    assert batch["questions"] == questions
    # reference lengths: the prompt less its image tokens (BOS included), the image size
    lengths = VQATask().reference_lengths(batch)
    assert lengths["text_length"].tolist() == [len(p) - IMAGE_TOKENS for p in prompts]
    assert lengths["image_size"].tolist() == lengths["image_width"].tolist() == [IMAGE] * 4
    # decode drops the prompt slots and the special tokens (EOS, padding) of what generate returns
    generated = torch.cat([gen["input_ids"], torch.tensor([a + [PAD] * (3 - len(a)) for a in answers])], 1)
    assert batch["decode"](generated) == [q.multiple_choice_answer for q in questions]


def test_only_answer_tokens_and_eos_carry_labels(vqav2_dir, tokenizer, processor):
    questions, batch = collate(vqav2_dir, tokenizer, processor)
    ids, labels = batch["loss_inputs"]["input_ids"], batch["loss_inputs"]["labels"]
    prompt_lengths = [len(hand_prompt(tokenizer, q.question)) for q in questions]
    for i, q in enumerate(questions):
        answer = words(tokenizer, q.multiple_choice_answer) + [EOS]
        span = slice(prompt_lengths[i], prompt_lengths[i] + len(answer))
        assert labels[i, span].tolist() == ids[i, span].tolist() == answer
        assert set(labels[i, :span.start].tolist()) == {-100}  # the prompt
        assert set(labels[i, span.stop:].tolist()) <= {-100}  # the padding
    assert (labels != -100).sum().item() == sum(len(words(tokenizer, q.multiple_choice_answer)) + 1 for q in questions)
    assert answer_start(labels).tolist() == prompt_lengths  # the adapter's prompt/answer boundary


def test_image_tokens_are_expanded_as_llava_processor_expands_them(vqav2_dir, tokenizer, processor):
    questions, batch = collate(vqav2_dir, tokenizer, processor)
    model = make_llava(0, "sdpa")
    reference = LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    gen = batch["generate_inputs"]
    for i, q in enumerate(questions):
        from PIL import Image

        out = reference(images=[Image.open(q.image)], text=[LLAVA_PROMPT.replace("{question}", q.question)],
                        return_tensors="pt")
        assert gen["input_ids"][i][gen["attention_mask"][i].bool()].tolist() == out["input_ids"][0].tolist()
    assert llava_image_tokens(model.config, IMAGE, IMAGE) == IMAGE_TOKENS
    model.config.vision_feature_select_strategy = "full"  # CLS kept
    assert llava_image_tokens(model.config, IMAGE, IMAGE) == IMAGE_TOKENS + 1
    assert llava_image_tokens(model.config, 2 * IMAGE, IMAGE) == 2 * IMAGE_TOKENS + 1


def test_llava_collator_refuses_a_tokenizer_without_the_image_token_and_a_bad_prompt(vqav2_dir, processor):
    questions = read_vqav2_split(vqav2_dir, "val")[:2]
    config = make_llava(0, "sdpa").config
    plain = build_word_tokenizer(WORDS + ["user", "assistant"])  # no <image> token
    with pytest.raises(ConfigError, match=r"holds 0 tokens of the model's image_token_id 39, not the image's 16: the "
                                          r"tokenizer must read <image> as one token of that id"):
        LlavaVQACollator(plain, processor, config)(questions)
    with pytest.raises(ConfigError, match="a LLaVA VQA prompt needs one <image> and a {question}"):
        LlavaVQACollator(plain, processor, config, prompt="USER: {question} ASSISTANT:")
    config.vision_config.model_type = "dinov2"
    with pytest.raises(ConfigError, match="does not know the image tokens of a dinov2 vision tower"):
        llava_image_tokens(config, IMAGE, IMAGE)


# ---- the loss ----------------------------------------------------------------------------------------------------------
def hand_loss(model, batch) -> torch.Tensor:
    """The mean next-token loss over the answer tokens and EOS of every sample, each sample alone (no padding): the
    image features (vision layer -2, CLS dropped, through the projector) put at the image tokens, the Llama run on
    those embeddings, lm_head."""
    inputs = batch["loss_inputs"]
    llava = model.model
    losses = []
    for i, q in enumerate(batch["questions"]):
        n = int(inputs["attention_mask"][i].sum())
        ids, labels = inputs["input_ids"][i, :n], inputs["labels"][i, :n]
        vision = llava.vision_tower(inputs["pixel_values"][i:i + 1], output_hidden_states=True)
        features = llava.multi_modal_projector(vision.hidden_states[-2][:, 1:])[0]
        embeds = llava.language_model.embed_tokens(ids).clone()
        embeds[ids == IMAGE_ID] = features
        hidden = llava.language_model(inputs_embeds=embeds[None], use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)[0]
        answer = (labels != -100).nonzero()[:, 0]
        losses.append(F.cross_entropy(logits[answer - 1], ids[answer], reduction="none"))
    return torch.cat(losses).mean()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("installed", [False, True])
def test_llava_vqa_loss_matches_a_hand_built_forward(vqav2_dir, tokenizer, processor, attn, installed):
    model, task = make_llava(0, attn), VQATask()
    if installed:
        comp_vlm.get_adapter(model).install()
    _, batch = collate(vqav2_dir, tokenizer, processor)
    loss = task.loss(model, batch)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(hand_loss(model, batch)), rel=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


# ---- generation and accuracy ---------------------------------------------------------------------------------------------
def test_vqa_accuracy_of_llava_is_the_official_accuracy_of_its_generated_answers(vqav2_dir, tokenizer, processor):
    model, task = make_llava(0, "sdpa"), VQATask(max_answer_tokens=3)
    comp_vlm.get_adapter(model).install()
    batches = vqav2_loaders(vqav2_dir, model, tokenizer, processor, batch_size=4, eval_batch_size=4).test
    metrics = task.evaluate(model, batches)
    with torch.no_grad():
        predictions = {q.question_id: a for b in batches for q, a in zip(b["questions"], task.answers(model, b))}
        # left padding: each answer is the one its prompt generates alone
        for b in batches:
            gen = b["generate_inputs"]
            for i, answer in enumerate(task.answers(model, b)):
                keep = gen["attention_mask"][i].bool()
                alone = {"input_ids": gen["input_ids"][i][keep][None], "pixel_values": gen["pixel_values"][i:i + 1]}
                ids = model.generate(**alone, max_new_tokens=3, do_sample=False)
                assert tokenizer.decode(ids[0, keep.sum():], skip_special_tokens=True).strip() == answer
        losses = [float(task.loss(model, b)) for b in batches]
    questions = [q for b in batches for q in b["questions"]]
    assert metrics["vqa_accuracy"] == pytest.approx(evaluate_vqa(predictions, questions)["overall"])
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses))
    # hand-computed: 7 of 10 humans answered the trained answer, 3 said "red" (90% for "red" unless it is the answer)
    fixed = [{**b, "decode": lambda ids: ["red"] * len(ids)} for b in batches]
    expected = [100.0 if q.multiple_choice_answer == "red" else 90.0 for q in questions]
    assert task.evaluate(model, fixed)["vqa_accuracy"] == pytest.approx(sum(expected) / len(expected))


# ---- a short search ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [False, True])
def test_a_short_prune_of_llava_with_the_vqa_task_completes(vqav2_dir, tokenizer, processor, use_cache):
    # the evaluation generates on the token-pruned model, with and without its (pruned) KV cache
    task, model = VQATask(max_answer_tokens=3, use_cache=use_cache), make_llava(0, "sdpa")
    loaders = task_data("vqa")(vqav2_dir, model, tokenizer, processor, batch_size=4)
    expected = {key: round(v) for key, v in mean_reference_lengths(task, loaders.train).items()}
    config = quick(ratio=0.2, stage_steps=2, finetune_steps=1, calibration_batches=1, reference=None)
    result = comp_vlm.prune(model, task, loaders.train, loaders.val, config, test_data=loaders.test)
    assert result.not_reached == []
    assert 0.0 <= result.metrics[0.2]["vqa_accuracy"] <= 100.0
    assert set(expected) == {"image_size", "image_width", "text_length"}
    assert {k: result.recipe.reference[k] for k in expected} == expected
