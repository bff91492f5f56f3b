import random

from transformers import AutoTokenizer

from common_kernels.tiny.task import make_sample
from common_kernels.tiny.tokenizer import CHARACTERS, build_tokenizer, save_tokenizer


def test_tokenizer_is_one_token_per_character_with_bos_and_round_trips(tmp_path):
    tok = build_tokenizer()
    ids = tok("q4 c7|c:7").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 10
    assert tok.decode(ids, skip_special_tokens=True) == "q4 c7|c:7"
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("q4 c7|c:7").input_ids == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == 4 + len(CHARACTERS)


def test_recall_samples_answer_from_the_context():
    rng = random.Random(0)
    for _ in range(50):
        s = make_sample(rng)
        context, *queries = s.text.split("|")
        pairs = {p[0]: p[1] for p in context.split(" ")}
        assert len(pairs) == 4 and len(queries) == 3
        for q in queries:
            key, value = q.split(":")
            assert pairs[key] == value
        assert s.prompt + s.answer == s.text and s.answer == pairs[queries[-1][0]]
