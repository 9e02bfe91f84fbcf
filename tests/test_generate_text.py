"""Training text sampled from the dense model: the budget, the prompts, the seed, and a file recovery reads."""

from dataclasses import replace

import pytest
import torch

from ziplm_planner.api import generate_text
from ziplm_planner.errors import UserError
from ziplm_planner.recovery import load_training_data
from ziplm_planner.settings import GenerationSettings
from ziplm_planner.synthetic import cut_after_end, prompt_ids
from tiny_models import tiny_loaded_with_tokenizer, write_sentences

SETTINGS = GenerationSettings(tokens=150, seq_len=16, prompt_tokens=4, batch_size=4, precision="no")


@pytest.fixture(scope="module")
def decoder():
    return tiny_loaded_with_tokenizer("llama", causal_lm=True)


@pytest.fixture
def prompts(tmp_path):
    return write_sentences(tmp_path / "real.txt")


def test_samples_continue_the_prompt_windows_up_to_the_budget(decoder, prompts, tmp_path):
    generated = generate_text(decoder, tmp_path / "gen.txt", prompts, settings=SETTINGS)
    per_batch = SETTINGS.batch_size * (SETTINGS.seq_len - SETTINGS.prompt_tokens)
    assert SETTINGS.tokens <= generated.new_tokens < SETTINGS.tokens + per_batch
    assert generated.new_tokens <= len(generated.samples) * (SETTINGS.seq_len - SETTINGS.prompt_tokens)
    starts = prompt_ids(decoder, prompts, SETTINGS)
    for sample, start in zip(generated.samples, starts):
        assert sample.startswith(decoder.tokenizer.decode(start))


def test_the_written_file_is_training_data(decoder, prompts, tmp_path):
    generated = generate_text(decoder, tmp_path / "gen.txt", prompts, settings=SETTINGS)
    data = load_training_data(decoder, [str(tmp_path / "gen.txt")], SETTINGS.seq_len, 0, "--train-data file")
    text_tokens = sum(len(decoder.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in generated.samples)
    assert data.num_tokens >= 0.8 * text_tokens  # all of it, less the last partial window and the joins' retokenising


def test_the_seed_decides_the_text(decoder, prompts, tmp_path):
    paths = [tmp_path / f"{n}.txt" for n in range(3)]
    for path, seed in zip(paths, (0, 0, 1)):
        generate_text(decoder, path, prompts, settings=replace(SETTINGS, seed=seed))
    same, again, other = (path.read_text() for path in paths)
    assert same == again and same != other


def test_without_prompts_samples_start_from_bos(decoder, tmp_path):
    assert decoder.tokenizer.bos_token_id is None  # MiniLM's tokenizer: the model's own BOS serves
    assert prompt_ids(decoder, None, SETTINGS).tolist() == [[decoder.model.generation_config.bos_token_id]]
    generated = generate_text(decoder, tmp_path / "gen.txt", settings=SETTINGS)
    assert generated.new_tokens >= SETTINGS.tokens and all(generated.samples)


def test_a_sample_ends_at_the_model_end_token():
    ids = torch.tensor([5, 6, 2, 2, 2])
    assert cut_after_end(ids, {2}).tolist() == [5, 6, 2]
    assert cut_after_end(ids, {7}).tolist() == ids.tolist()
    assert cut_after_end(ids, set()).tolist() == ids.tolist()


def test_an_encoder_is_refused_and_nothing_is_written(tmp_path):
    encoder = tiny_loaded_with_tokenizer("bert")
    with pytest.raises(UserError, match="not a causal language model"):
        generate_text(encoder, tmp_path / "gen.txt", settings=SETTINGS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(tokens=0), dict(batch_size=0), dict(prompt_tokens=16), dict(prompt_tokens=0),
                                 dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(precision="fp8")])
def test_bad_generation_settings_are_refused(bad):
    with pytest.raises(UserError):
        replace(SETTINGS, **bad)
