"""The text-encoder loader, on a tiny T5 with a SentencePiece model trained here (no hub)."""

import pytest
import torch

from data.shapes import make_sample


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    import numpy as np
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = tmp_path_factory.mktemp("t5") / "tiny-t5"
    out.mkdir()
    rng = np.random.default_rng(0)
    captions = [make_sample(rng)[1]["caption"] for _ in range(400)] + ["a picture of something else entirely"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=str(out / "spiece"), vocab_size=36, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    tok = T5Tokenizer.from_pretrained(str(out))  # not T5Tokenizer(vocab_file=...): see ENVIRONMENT.md
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=tok.vocab_size + 100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(out)
    return out


def test_t5_from_a_local_folder(tiny_t5_dir):
    from models.text_encoder import TextEncoder

    enc = TextEncoder(str(tiny_t5_dir), max_length=48)
    assert enc.hidden_size == 32 and enc.tokenizer.vocab_size > 10
    hidden, mask = enc.encode(["a small red circle on a black background", ""])
    assert hidden.shape == (2, 48, 32) and mask.shape == (2, 48) and mask.dtype == torch.bool
    assert 3 < mask[0].sum() < 48 and mask[1].sum() == 1  # the empty prompt is just </s>: a valid null condition
    # padding does not leak into the real tokens
    alone, _ = enc.encode(["a small red circle on a black background"])
    torch.testing.assert_close(alone[0, mask[0]], hidden[0, mask[0]])


def test_long_prompts_are_truncated_with_a_warning(tiny_t5_dir):
    from models.text_encoder import TextEncoder

    enc = TextEncoder(str(tiny_t5_dir), max_length=8)
    with pytest.warns(UserWarning, match="exceed the text encoder's 8-token limit"):
        hidden, mask = enc.encode(["a large blue square on a white background " * 5])
    assert hidden.shape == (1, 8, 32) and mask.all()
