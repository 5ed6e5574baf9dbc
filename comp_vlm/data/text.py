"""A word-level fast tokenizer for tiny models (offline; no downloads), saved and loaded through AutoTokenizer.

Ids: 0 <pad>, 1 <unk>, 2 <bos>, then the words, and <eos> last -- CLIP pools at the highest id when its config
says ``eos_token_id == 2``, and at the first EOS otherwise; giving EOS the highest id makes both rules agree.
"""

from __future__ import annotations

from collections.abc import Iterable


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 77):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    for w in sorted({w.lower() for w in words}):
        if w not in vocab:
            vocab[w] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
