"""The demo's data comes from Python itself: disjoint calibration and held-out sentences."""

from ziplm_planner.data import read_dataset
from ziplm_planner.demo import python_sentences, write_demo_texts


def test_python_sentences_are_plentiful_and_deterministic():
    sentences = python_sentences()
    assert len(sentences) > 1000 and sentences == python_sentences()
    assert all(6 <= len(s.split()) <= 60 for s in sentences)


def test_demo_texts_are_disjoint_and_readable(tmp_path):
    calibration, heldout = write_demo_texts(tmp_path, held_out=100)
    calib_texts = read_dataset(calibration).texts
    held_texts = read_dataset(heldout).texts
    assert len(held_texts) == 100 and len(calib_texts) > 900
    assert not set(calib_texts) & set(held_texts)
