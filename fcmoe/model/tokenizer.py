"""The built-in models' byte tokenizer as a Hugging Face tokenizer (``AutoTokenizer`` loads it).

Built-in models read UTF-8 bytes: token ``b`` is byte ``b`` (0..255), 256 is BOS, 257 EOS, 258 PAD,
259 unused (``silo_agent.data.ByteTokenizer``; the vocabulary is rounded up to 260 for the model).
Here the same ids come out of the ``tokenizers`` library: a byte-level pre-tokenizer maps each byte
to one printable character (GPT-2's table), a BPE model without merges maps each character to its
byte's id, and the byte-level decoder turns ids back into bytes, then text. Encoding with special
tokens prepends BOS, as the data pipeline does before a prompt; the response ends with EOS, where
``generate()`` stops.
"""

from __future__ import annotations

BOS, EOS, PAD, UNUSED = "<s>", "</s>", "<pad>", "<unused>"
SPECIAL_IDS = {BOS: 256, EOS: 257, PAD: 258, UNUSED: 259}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ``pre_tokenizers.ByteLevel`` emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A fast tokenizer whose ids equal ``ByteTokenizer``'s (BOS prepended when special tokens are added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update(SPECIAL_IDS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_IDS[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
