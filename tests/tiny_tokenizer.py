"""A small byte-level BPE tokenizer built offline, for tests that need real tokenization without the hub.

Byte-level, so any text encodes without <unk> and `decode(encode(x)) == x`; ids stay below `vocab_size`
(default 512, the vocab of `tests/tiny.py`'s models), so its ids can be fed to those models. Like Llama's, it
prepends <s> to every encoded text (pass `add_special_tokens=False` to skip that).
"""
from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in this order

_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A model is quantized block by block on calibration text,
then its perplexity is measured before and after. Weights are grouped, scaled and rounded to a few bits;
the error of each layer is kept small by choosing the scales on real activations. We the people of the
United States, in order to form a more perfect union, establish justice, insure domestic tranquility,
provide for the common defence, promote the general welfare, and secure the blessings of liberty.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness. Call me Ishmael. Some years ago, never mind how long precisely, having little or no money
in my purse, and nothing particular to interest me on shore, I thought I would sail about a little.
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 = @ - , . ; : ! ? ( ) [ ] " ' \n\n
"""


@lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    """Train once per vocab size and keep the JSON (training is cheap, but tests call this a lot)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXT.splitlines(keepends=True) * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh `PreTrainedTokenizerFast` (byte-level BPE, <s> prepended) with unk/bos/eos/pad set."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer.from_str(_trained(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=1 << 30)
