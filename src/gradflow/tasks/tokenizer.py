"""A character-level tokenizer for the arithmetic task (`gradflow.tasks.arithmetic`).

Every character is one token: a `WordLevel` model over single characters behind a pre-tokenizer
that isolates each character and maps it to its GPT-2 byte-level symbol (newline `Ċ`, space `Ġ`,
printable ASCII unchanged), and a `ByteLevel` decoder, so
`decode(encode(text), skip_special_tokens=True) == text` for any text over the vocabulary
(newlines and spaces included). No BOS token and no post-processor: encoding adds nothing.

The vocabulary is byte-level so that a checkpoint directory whose `config.json` says
`model_type = "qwen2"` still tokenizes the same: for such a directory `transformers`' (v5)
`AutoTokenizer` ignores `tokenizer_config.json` and rebuilds a `Qwen2Tokenizer` (a byte-level BPE)
from the saved vocabulary, which with no merges is this same character tokenizer.

Ids: `<pad>` 0, `<eos>` 1, `<unk>` 2, then the digits, `+-*=?#`, newline, space, and `a`..`z`.
"""

import json
import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
CHARACTERS = string.digits + "+-*=?#\n " + string.ascii_lowercase


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    **Returns:**

    A `PreTrainedTokenizerFast` with `pad_token="<pad>"` (id 0), `eos_token="<eos>"` (id 1),
    `unk_token="<unk>"` (id 2), left padding, and one token per character of `CHARACTERS`.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [byte_level.pre_tokenize_str(char)[0][0] for char in CHARACTERS]
    vocab = {token: i for i, token in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *symbols])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), byte_level]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(path: str | os.PathLike) -> None:
    """Save the tokenizer so that `transformers.AutoTokenizer.from_pretrained(path)` loads it.

    Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

    **Arguments:**

    - `path`: the directory to write to (created if missing).

    **Returns:**

    Nothing.
    """
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    special_tokens = {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special_tokens, f, indent=2)
