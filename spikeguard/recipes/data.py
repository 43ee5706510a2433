"""Text data for the recipes: an offline corpus, tokenizers and a seeded LightningDataModule.

The whole path of the data, on one page:

    text   = load_text(source)                      # "pydoc" (embedded), a file/dir, "hf:<name>"
    ids    = tokenize(text, tokenizer)              # (N,) one long token stream
    blocks = ids[: K * T].view(K, T)                # K non-overlapping blocks of T = seq_len
    split  = randperm(K, seed) -> val | train       # disjoint, fixed by the seed
    batch  = {"input_ids": (B, T), "labels": (B, T)}

causal: labels are the input ids (Hugging Face causal LMs shift them internally).
masked: BERT masking (:func:`mask_tokens`), a pure function of (seed, split, epoch, index).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

__all__ = [
    "TASKS",
    "IGNORE_INDEX",
    "load_text",
    "ByteTokenizer",
    "tokenize",
    "mask_tokens",
    "TextDataModule",
]

TASKS = ("causal", "masked")
IGNORE_INDEX = -100  # the label torch's cross-entropy (and every HF model) ignores

_SOURCE_FORMS = (
    "'pydoc' (Python's documentation, embedded), a path to a text file, "
    "a directory of .txt files, or 'hf:<dataset>[:<config>]'"
)


# -- corpus --------------------------------------------------------------------------


def load_text(source: str | os.PathLike = "pydoc") -> str:
    """The text of a corpus, deterministic for a given source.

    Args:
        source: one of

            - ``"pydoc"``: Python's own documentation shipped with CPython
              (``pydoc_data.topics.topics``, ~465k characters), offline. Topics are
              joined in sorted-key order, separated by a blank line.
            - a path to a text file (read as UTF-8), or to a directory whose ``*.txt``
              files (searched recursively, in sorted path order) are joined, separated by
              a blank line.
            - ``"hf:<dataset>[:<config>]"``: the ``"text"`` column of the ``train`` split
              of a Hugging Face ``datasets`` dataset, rows joined by blank lines. Needs
              ``pip install datasets`` and the network (or its cache).
    """
    kind, value = _parse_source(source)
    if kind == "pydoc":
        from pydoc_data.topics import topics

        return _join(topics[key] for key in sorted(topics))
    if kind == "file":
        return Path(value).read_text(encoding="utf-8")
    if kind == "dir":
        files = sorted(p for p in Path(value).rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"source directory {str(value)!r} holds no .txt files")
        return _join(p.read_text(encoding="utf-8") for p in files)
    return _load_hf_text(value)


def _parse_source(source: str | os.PathLike) -> tuple[str, Any]:
    """(kind, value) for a source, or a ValueError naming the allowed forms."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be {_SOURCE_FORMS}; got {source!r}")
    if isinstance(source, str) and source == "pydoc":
        return "pydoc", None
    if isinstance(source, str) and source.startswith("hf:"):
        name, _, config = source[len("hf:"):].partition(":")
        if not name:
            raise ValueError(f"source {source!r} names no dataset: expected 'hf:<dataset>[:<config>]'")
        return "hf", (name, config or None)
    path = Path(source)
    if path.is_file():
        return "file", path
    if path.is_dir():
        return "dir", path
    raise ValueError(f"source must be {_SOURCE_FORMS}; got {str(source)!r} (no such file or directory)")


def _load_hf_text(name_and_config: tuple[str, str | None]) -> str:
    name, config = name_and_config
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as err:
        raise ImportError(
            f"source 'hf:{name}' needs the Hugging Face datasets library: pip install datasets"
        ) from err
    rows = datasets.load_dataset(name, config, split="train")
    if "text" not in rows.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column; its columns: {rows.column_names}")
    return _join(row for row in rows["text"] if row.strip())


def _join(texts) -> str:
    return "\n\n".join(text.strip("\n") for text in texts)


# -- tokenizers ----------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no vocabulary file, no unknown tokens, instant.

    Byte text has no mask token, so ``mask_token=True`` reserves id 256 for one
    (``vocab_size`` 257); :class:`TextDataModule` does that for ``task="masked"``. Random
    replacements in masking draw only from the 256 bytes.

    Args:
        mask_token: reserve id 256 as ``"[MASK]"``.
    """

    num_byte_ids = 256

    def __init__(self, mask_token: bool = False):
        self.mask_token = "[MASK]" if mask_token else None
        self.mask_token_id = self.num_byte_ids if mask_token else None
        self.vocab_size = self.num_byte_ids + int(mask_token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(mask_token={self.mask_token_id is not None})"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids``; invalid UTF-8 becomes U+FFFD, the mask id ``"[MASK]"``."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pieces, run = [], bytearray()
        for i in ids:
            if 0 <= i < self.num_byte_ids:
                run.append(i)
            elif i == self.mask_token_id:
                pieces += [run.decode("utf-8", errors="replace"), self.mask_token]
                run = bytearray()
            else:
                raise ValueError(f"id {i} is outside this ByteTokenizer's vocabulary [0, {self.vocab_size})")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """The token ids of ``text`` as one long stream, a LongTensor (N,), no special tokens.

    ``tokenizer`` is a :class:`ByteTokenizer` (a zero-copy view of the UTF-8 bytes, instant
    on the whole corpus), a Hugging Face tokenizer (called with
    ``add_special_tokens=False``), or any object with ``encode(text) -> ids``.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: the stream is meant to exceed model_max_length; blocks cut it later.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    elif callable(getattr(tokenizer, "encode", None)):
        ids = tokenizer.encode(text)
    else:
        raise TypeError(f"cannot tokenize with a {type(tokenizer).__name__}: it has no encode method")
    return torch.tensor(ids, dtype=torch.long)


def _vocab_size(tokenizer: Any) -> int:
    # len() counts a Hugging Face tokenizer's added tokens, which .vocab_size leaves out.
    return len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)


# -- masking -------------------------------------------------------------------------


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    num_random_ids: int,
    mlm_probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, §3.1): ``(masked_ids, labels)``, same shape as the input.

    Each position is selected with probability p = ``mlm_probability``. A selected position
    becomes ``mask_token_id`` with probability 0.8, a uniform id in [0, ``num_random_ids``)
    with 0.1, and keeps its id with 0.1; its label is the original id. Unselected positions
    keep their id and get the label -100 (ignored by the loss). All randomness comes from
    ``generator``: the same generator state gives the same masks.
    """
    selected = torch.rand(input_ids.shape, generator=generator) < mlm_probability
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(num_random_ids, input_ids.shape, generator=generator)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    masked = torch.where(selected & (action < 0.8), mask_token_id, input_ids)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def _seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings), stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# -- datasets and sampling -----------------------------------------------------------


class _Blocks(Dataset):
    """Blocks of one split; item ``(epoch, i)`` is block i, masked for that epoch if masked."""

    def __init__(self, blocks: torch.Tensor, split: str, seed: int, masking: dict | None):
        self.blocks = blocks  # (K, T)
        self.split = split
        self.seed = seed
        self.masking = masking  # mask_tokens keyword arguments, or None for causal

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = (0, key) if isinstance(key, int) else key
        block = self.blocks[i]  # (T,)
        if self.masking is None:
            return {"input_ids": block, "labels": block}
        # Seeded per (split, epoch, block), so any worker, order or resume gives the same mask.
        generator = torch.Generator().manual_seed(_seed(self.seed, self.split, epoch, i))
        input_ids, labels = mask_tokens(block, generator=generator, **self.masking)
        return {"input_ids": input_ids, "labels": labels}


class _KeySampler(Sampler):
    """Yields ``(epoch, index)`` keys: a seeded permutation per epoch, or 0..n-1 at epoch 0.

    Lightning calls ``set_epoch`` at the start of every epoch (train and validation); in a
    plain loop call it yourself. Without shuffling the epoch is ignored, so validation sees
    the same blocks and the same masks every epoch.
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            return ((0, i) for i in range(self.n))
        generator = torch.Generator().manual_seed(_seed(self.seed, "shuffle", self.epoch))
        order = torch.randperm(self.n, generator=generator).tolist()
        return ((self.epoch, i) for i in order)


# -- the data module -----------------------------------------------------------------


def _check_int(key: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an int, got {value!r}")
    if value < minimum:
        bound = f"> {minimum - 1}" if minimum > 0 else f">= {minimum}"
        raise ValueError(f"{key} must be {bound}, got {value!r}")


def _check_fraction(key: str, value: object, closed_right: bool) -> None:
    interval = "(0, 1]" if closed_right else "(0, 1)"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{key} must be a number in {interval}, got {value!r}")
    if not (0 < value < 1 or (closed_right and value == 1)):
        raise ValueError(f"{key} must be in {interval}, got {value!r}")


class TextDataModule(pl.LightningDataModule):
    """Language-model batches from one text corpus, deterministic given ``seed``.

    ``setup()`` loads the text, tokenizes it once into one stream, cuts it into
    non-overlapping blocks of ``seq_len`` tokens (the remainder is dropped) and splits the
    blocks by a seeded permutation into disjoint val and train sets. Batches are
    ``{"input_ids": LongTensor(B, T), "labels": LongTensor(B, T)}``.

    - ``task="causal"``: labels are the input ids (Hugging Face models shift internally).
    - ``task="masked"``: BERT masking (:func:`mask_tokens`), labels -100 where not masked.
      The tokenizer must have a mask token; ``tokenizer="byte"`` then uses
      ``ByteTokenizer(mask_token=True)`` (id 256 reserved, ``vocab_size`` 257).

    Train order is a seeded permutation per epoch and masks are seeded per (epoch, block),
    so the same seed gives the same batches in any worker, and a resumed run the same
    order and masks for a given epoch (Lightning calls the sampler's ``set_epoch``). Validation
    order and masks are the same every epoch. ``tokenizer`` and ``vocab_size`` are
    available from construction (a model can be sized before ``setup()``).

    Args:
        source: the corpus, see :func:`load_text`: ``"pydoc"`` (embedded, offline), a text
            file, a directory of ``.txt`` files, or ``"hf:<dataset>[:<config>]"``.
        tokenizer: ``"byte"`` (:class:`ByteTokenizer`), a Hugging Face tokenizer name or
            local directory (loaded with ``AutoTokenizer.from_pretrained``), or a tokenizer
            object (a Hugging Face tokenizer, or anything with ``encode`` and ``__len__``
            or ``vocab_size``).
        seq_len: tokens per block, T (> 1).
        batch_size: blocks per batch, B (> 0).
        val_fraction: share of blocks held out for validation, in (0, 1); at least one
            block goes to each split.
        task: ``"causal"`` or ``"masked"``.
        mlm_probability: share of positions selected for masking, in (0, 1]
            (``task="masked"`` only).
        seed: fixes the split, the train order of every epoch and every mask (>= 0).
        num_workers: DataLoader worker processes (>= 0).
        max_tokens: keep only the first ``max_tokens`` tokens of the stream (quick runs);
            ``None`` keeps all.
    """

    def __init__(
        self,
        source: str = "pydoc",
        tokenizer: Any = "byte",
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        task: str = "causal",
        mlm_probability: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
        max_tokens: int | None = None,
    ):
        super().__init__()
        _parse_source(source)
        _check_int("seq_len", seq_len, 2)
        _check_int("batch_size", batch_size, 1)
        _check_fraction("val_fraction", val_fraction, closed_right=False)
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        _check_fraction("mlm_probability", mlm_probability, closed_right=True)
        _check_int("seed", seed, 0)
        _check_int("num_workers", num_workers, 0)
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 1)
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])

        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.task = task
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.num_workers = num_workers
        self.max_tokens = max_tokens
        self.tokenizer = _resolve_tokenizer(tokenizer, task)
        self.vocab_size = _vocab_size(self.tokenizer)

        self.blocks: torch.Tensor | None = None  # (K, T), every block of the stream
        self.train_indices: torch.Tensor | None = None  # sorted block indices of each split
        self.val_indices: torch.Tensor | None = None
        self.train_dataset: _Blocks | None = None
        self.val_dataset: _Blocks | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize, block and split the corpus; later calls do nothing."""
        if self.blocks is not None:
            return
        ids = tokenize(load_text(self.source), self.tokenizer)  # (N,)
        if self.max_tokens is not None:
            ids = ids[: self.max_tokens]
        num_blocks = len(ids) // self.seq_len
        if num_blocks < 2:
            raise ValueError(
                f"the corpus gives {num_blocks} block(s) of seq_len={self.seq_len} from {len(ids)} "
                "tokens; need at least 2 (one train, one val): use a longer source or max_tokens, "
                "or a smaller seq_len"
            )
        self.blocks = ids[: num_blocks * self.seq_len].view(num_blocks, self.seq_len)  # (K, T)

        num_val = min(max(1, round(self.val_fraction * num_blocks)), num_blocks - 1)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(self.seed))
        self.val_indices = order[:num_val].sort().values
        self.train_indices = order[num_val:].sort().values

        masking = None
        if self.task == "masked":
            # Random replacements are text tokens: for bytes, never the reserved mask id.
            is_bytes = isinstance(self.tokenizer, ByteTokenizer)
            masking = dict(
                mask_token_id=self.tokenizer.mask_token_id,
                num_random_ids=ByteTokenizer.num_byte_ids if is_bytes else self.vocab_size,
                mlm_probability=self.mlm_probability,
            )
        self.train_dataset = _Blocks(self.blocks[self.train_indices], "train", self.seed, masking)
        self.val_dataset = _Blocks(self.blocks[self.val_indices], "val", self.seed, masking)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, shuffle=False)

    def probe_batch(self) -> dict[str, torch.Tensor]:
        """The first validation batch: the same blocks and masks on every call and every epoch."""
        self.setup()
        size = min(self.batch_size, len(self.val_dataset))
        return default_collate([self.val_dataset[(0, i)] for i in range(size)])

    def _loader(self, dataset: _Blocks, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=_KeySampler(len(dataset), self.seed, shuffle),
            num_workers=self.num_workers,
        )


def _resolve_tokenizer(tokenizer: Any, task: str) -> Any:
    """The tokenizer object for a ``tokenizer`` argument, checked against the task."""
    if isinstance(tokenizer, str):
        if tokenizer == "byte":
            tokenizer = ByteTokenizer(mask_token=task == "masked")
        else:
            from transformers import AutoTokenizer

            from spikeguard.recipes._paths import resolve_model_path

            try:
                tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"tokenizer must be 'byte' or a Hugging Face tokenizer name or directory that "
                    f"AutoTokenizer can load; got {tokenizer!r}: {err}"
                ) from err
    elif not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            f"tokenizer must be 'byte', a Hugging Face tokenizer name or directory, or a tokenizer "
            f"object with an encode method; got {tokenizer!r}"
        )
    if task == "masked" and getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(
            f"task='masked' needs a tokenizer with a mask token; the {type(tokenizer).__name__} given "
            "has none. Use a BERT-style tokenizer, or tokenizer='byte' (which reserves id 256 for it)"
        )
    return tokenizer
