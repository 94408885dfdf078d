import shutil

import pytest

from progrow_ray.core import ConfigError
from progrow_ray.data.tokenizer import EOT, build_gpt2, gpt2_encoding, gpt2_files


@pytest.mark.parametrize("text,ids", [
    ("Hello world", [15496, 995]),
    (" the", [262]),
    ("GPT-2", [38, 11571, 12, 17]),
    ("def f(x):\n    return x", [4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124]),
])
def test_gpt2_known_encodings(text, ids):
    enc = gpt2_encoding()
    assert enc.encode_ordinary(text) == ids
    assert enc.decode(ids) == text


def test_special_token_and_vocab():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_tampered_files_fail_the_hash_check(tmp_path):
    vocab, encoder = gpt2_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(vocab, bad)
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256"):
        build_gpt2(str(bad), encoder)
