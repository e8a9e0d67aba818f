"""Universal Dependencies part-of-speech data: CoNLL-U files to padded token features and tags.

A treebank is a folder in the UD repository layout (`*-ud-train.conllu`, `*-ud-dev.conllu`,
`*-ud-test.conllu`) or one .conllu file. Multiword-token ranges (`3-4`) and empty nodes (`5.1`)
are skipped; forms are NFC-normalized. Each token becomes a row of feature ids (the word, its
folded form, suffixes, a prefix, its shape) into one shared id space; 0 is padding.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
import unicodedata

import numpy as np

PERSEUS = "UD_Ancient_Greek-Perseus"  # the paper's treebank: its repository's folder, cloned from GitHub
# The datasets this module reads (data/registry.py collects every module's) and the task that reads them.
DATASETS = {PERSEUS: "UD Ancient Greek Perseus treebank (Universal Dependencies, CoNLL-U): a local clone of "
                     f"github.com/UniversalDependencies/{PERSEUS}, passed as a folder; task greek_pos (data/ud_pos.py)"}
READ_BY = "greek_pos"
TAGSETS = {"upos": 3, "xpos": 4}  # tagset -> CoNLL-U column (0-based)
SPLITS = ("train", "dev", "test")
SUFFIX_LENGTHS = (1, 2, 3, 4)
PREFIX_LENGTH = 3
FEATURES = ("word", "folded") + tuple(f"suffix{k}" for k in SUFFIX_LENGTHS) + ("prefix", "shape")
HELD_OUT_FRACTION = 0.2  # of a lone file's sentences, held out as test when no test file exists
SPLIT_SEED = 20260
_ID = re.compile(r"^(\d+|\d+-\d+|\d+\.\d+)$")


@dataclasses.dataclass(frozen=True)
class Sentence:
    forms: tuple[str, ...]
    tags: tuple[str, ...]


def fold(form: str) -> str:
    """Lowercase without diacritics: ἀδύνατα and Ἀδυνατα fold alike."""
    decomposed = unicodedata.normalize("NFD", form.lower())
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def read_conllu(path, tagset: str = "upos") -> list[Sentence]:
    """The sentences of one CoNLL-U file with the `tagset` column; ValueError naming file and line."""
    import conllu

    if tagset not in TAGSETS:
        raise ValueError(f"unknown tagset {tagset!r}; choose one of {list(TAGSETS)}")
    path = pathlib.Path(path)
    column = TAGSETS[tagset]
    sentences, block, start = [], [], 1
    lines = path.read_text(encoding="utf-8").splitlines() + [""]
    for number, line in enumerate(lines, 1):
        if line.strip():
            if not block:
                start = number
            if not line.startswith("#"):
                _check_line(path, number, line, column, tagset)
            block.append(line)
            continue
        if block:
            try:
                tokens = conllu.parse_token_and_metadata("\n".join(block))
            except Exception as err:  # conllu raises its own ParseException
                raise ValueError(f"{path}: line {start}: malformed CoNLL-U sentence ({err})") from err
            words = [t for t in tokens if isinstance(t["id"], int)]
            if words:
                forms = tuple(unicodedata.normalize("NFC", t["form"]) for t in words)
                tags = tuple(t[tagset] for t in words)
                sentences.append(Sentence(forms, tags))
            block = []
    if not sentences:
        raise ValueError(f"{path}: no sentences found; is it a CoNLL-U file?")
    return sentences


def _check_line(path, number: int, line: str, column: int, tagset: str) -> None:
    fields = line.split("\t")
    where = f"{path}: line {number}"
    if len(fields) != 10:
        raise ValueError(f"{where}: expected 10 tab-separated CoNLL-U fields, found {len(fields)}; "
                         "fix the line (fields are separated by single tabs)")
    if not _ID.match(fields[0]):
        raise ValueError(f"{where}: bad token ID {fields[0]!r} (expected 7, 3-4 or 5.1)")
    if fields[0].isdigit() and fields[column] in ("", "_"):
        raise ValueError(f"{where}: token {fields[1]!r} has no {tagset.upper()} tag; "
                         f"pick the other tagset or fix the file")


def find_splits(path) -> dict[str, pathlib.Path]:
    """{split: file} of a UD folder (`*-ud-<split>.conllu`) or of a single .conllu file."""
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".conllu":
            raise ValueError(f"{path} is not a .conllu file; pass a CoNLL-U file or a UD treebank folder")
        for split in SPLITS:
            if path.name.endswith(f"-ud-{split}.conllu"):
                return {split: path}
        return {"dev": path}
    if not path.is_dir():
        raise ValueError(f"{path} does not exist; pass a UD treebank folder (e.g. a clone of "
                         "UD_Ancient_Greek-Perseus) or a .conllu file")
    files = {}
    for split in SPLITS:
        found = sorted(path.glob(f"*-ud-{split}.conllu"))
        if len(found) > 1:
            raise ValueError(f"{path} holds several {split} files {[f.name for f in found]}; keep one")
        if found:
            files[split] = found[0]
    if not files:
        raise ValueError(f"{path} holds no *-ud-train.conllu, *-ud-dev.conllu or *-ud-test.conllu "
                         "file; pass a UD treebank folder in the UD repository layout")
    return files


def read_treebank(path, tagset: str = "upos") -> tuple[dict[str, list[Sentence]], str]:
    """{split: sentences} with train and test always present, and a note on how they were made.

    A missing train or test split is carved from the file(s) present, deterministically by
    sentence (the same for every training seed): HELD_OUT_FRACTION of them become test, the rest train.
    """
    files = find_splits(path)
    splits = {split: read_conllu(f, tagset) for split, f in files.items()}
    note = "official splits: " + ", ".join(f"{s}={files[s].name}" for s in files)
    if "train" in splits and "test" in splits:
        return splits, note
    source = "train" if "train" in splits else "test" if "test" in splits else "dev"
    sentences = splits.pop(source)
    if len(sentences) < 2:
        raise ValueError(f"{files[source]} holds {len(sentences)} sentence(s); at least 2 are needed "
                         "to split it into train and test")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(sentences))
    num_test = max(1, int(round(len(sentences) * HELD_OUT_FRACTION)))
    splits["test"] = [sentences[i] for i in sorted(order[:num_test])]
    splits["train"] = [sentences[i] for i in sorted(order[num_test:])]
    note = (f"only {sorted(files)} found: {files[source].name} split by sentence (fixed seed) into "
            f"train {len(splits['train'])} / test {len(splits['test'])} sentences")
    return splits, note


def token_features(form: str) -> tuple[str, ...]:
    """The feature strings of one form, in FEATURES order."""
    lower, folded = form.lower(), fold(form)
    suffixes = tuple(lower[-k:] if len(lower) >= k else "" for k in SUFFIX_LENGTHS)
    if all(unicodedata.category(c)[0] in "PS" for c in form):
        shape = "punct"
    elif any(c.isdigit() for c in form):
        shape = "digit"
    elif form[:1].isupper():
        shape = "upper"
    else:
        shape = "lower"
    return (form, folded) + suffixes + (folded[:PREFIX_LENGTH], shape)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Feature strings -> ids in one shared id space (0 = padding), and tags -> ids."""

    features: tuple[dict, ...]  # per feature: string -> local id (0 = unknown)
    offsets: tuple[int, ...]  # global id = offset + local id
    tags: tuple[str, ...]

    @classmethod
    def build(cls, sentences: list[Sentence], min_count: int = 2, tags=None) -> "Vocabulary":
        """From the training sentences: feature strings seen at least `min_count` times."""
        counts = [collections.Counter() for _ in FEATURES]
        for s in sentences:
            for form in s.forms:
                for c, value in zip(counts, token_features(form)):
                    c[value] += 1
        features = tuple({v: i + 1 for i, v in enumerate(sorted(k for k, n in c.items() if n >= min_count))}
                         for c in counts)
        sizes = [len(f) + 1 for f in features]
        offsets = tuple(int(o) for o in 1 + np.cumsum([0] + sizes[:-1]))
        tags = tuple(sorted({t for s in sentences for t in s.tags})) if tags is None else tuple(tags)
        return cls(features, offsets, tags)

    @property
    def size(self) -> int:
        return self.offsets[-1] + len(self.features[-1]) + 1

    def encode_form(self, form: str) -> list[int]:
        return [o + f.get(v, 0) for o, f, v in zip(self.offsets, self.features, token_features(form))]

    def encode_tags(self, tags, where: str) -> list[int]:
        index = {t: i for i, t in enumerate(self.tags)}
        unknown = sorted({t for t in tags if t not in index})
        if unknown:
            raise ValueError(f"{where}: tag(s) {unknown} never occur in the training split")
        return [index[t] for t in tags]


@dataclasses.dataclass(frozen=True)
class TaggedSplit:
    """Points = sentence pieces of at most `length` tokens, padded: features (n, L, F) int32,
    tags (n, L) int32, mask (n, L) bool (True at real tokens)."""

    features: np.ndarray
    tags: np.ndarray
    mask: np.ndarray

    @property
    def inputs(self) -> dict:
        return {"features": self.features, "mask": self.mask}

    def __len__(self) -> int:
        return len(self.tags)


def encode(sentences: list[Sentence], vocab: Vocabulary, length: int, where: str = "") -> TaggedSplit:
    """Pad sentences to `length`; longer ones are cut into consecutive pieces (no token lost)."""
    pieces = [(s.forms[i:i + length], s.tags[i:i + length])
              for s in sentences for i in range(0, len(s.forms), length)]
    n = len(pieces)
    features = np.zeros((n, length, len(FEATURES)), np.int32)
    tags = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), bool)
    for p, (forms, piece_tags) in enumerate(pieces):
        k = len(forms)
        features[p, :k] = [vocab.encode_form(f) for f in forms]
        tags[p, :k] = vocab.encode_tags(piece_tags, where)
        mask[p, :k] = True
    return TaggedSplit(features, tags, mask)


@dataclasses.dataclass(frozen=True)
class PosData:
    """Encoded splits (`train`, `test`, and `dev` where the treebank has one) and their vocabulary."""

    splits: dict[str, TaggedSplit]
    vocab: Vocabulary
    sentences: dict[str, list[Sentence]]
    info: dict

    @property
    def num_tags(self) -> int:
        return len(self.vocab.tags)


def load_ud_pos(path, tagset: str = "upos", max_length: int = 64, min_count: int = 2,
                train_size: int | None = None, test_size: int | None = None, seed: int = 0) -> PosData:
    """A treebank folder or file, encoded; `train_size`/`test_size` keep that many sentences."""
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1 token, got {max_length}")
    if min_count < 1:
        raise ValueError(f"min_count must be ≥ 1, got {min_count}")
    sentences, note = read_treebank(path, tagset)
    for split, size in (("train", train_size), ("test", test_size)):
        if size is not None:
            if size > len(sentences[split]):
                raise ValueError(f"{split}_size={size}, but the {split} split has only "
                                 f"{len(sentences[split])} sentences")
            keep = np.random.default_rng([seed, SPLITS.index(split) + 1]).permutation(len(sentences[split]))
            sentences[split] = [sentences[split][i] for i in sorted(keep[:size])]
    vocab = Vocabulary.build(sentences["train"], min_count)
    # Tags seen only outside train still get ids (never predicted well, but counted as errors).
    extra = sorted({t for ss in sentences.values() for s in ss for t in s.tags} - set(vocab.tags))
    vocab = dataclasses.replace(vocab, tags=vocab.tags + tuple(extra))
    splits = {k: encode(v, vocab, max_length, f"{path} ({k})") for k, v in sentences.items()}
    info = {
        "source": str(path), "splits_note": note, "tagset": tagset, "tags": list(vocab.tags),
        "max_length": max_length, "min_count": min_count, "features": list(FEATURES),
        "feature_vocab_sizes": [len(f) + 1 for f in vocab.features], "vocab_size": vocab.size,
        **{f"{k}_sentences": len(v) for k, v in sentences.items()},
        **{f"{k}_points": len(splits[k]) for k in splits},
        **{f"{k}_tokens": int(splits[k].mask.sum()) for k in splits},
    }
    return PosData(splits, vocab, sentences, info)


def most_frequent_tag_baseline(train: list[Sentence], test: list[Sentence], max_suffix: int = 4) -> float:
    """Token accuracy of: the form's most frequent training tag; for unseen forms, that of the
    longest seen suffix (lowercased, up to `max_suffix` characters); else the commonest tag."""
    by_form = collections.defaultdict(collections.Counter)
    by_suffix = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for s in train:
        for form, tag in zip(s.forms, s.tags):
            by_form[form][tag] += 1
            overall[tag] += 1
            for k in range(1, max_suffix + 1):
                by_suffix[form.lower()[-k:]][tag] += 1
    default = overall.most_common(1)[0][0]

    def guess(form: str) -> str:
        if form in by_form:
            return by_form[form].most_common(1)[0][0]
        for k in range(max_suffix, 0, -1):
            if len(form) >= k and form.lower()[-k:] in by_suffix:
                return by_suffix[form.lower()[-k:]].most_common(1)[0][0]
        return default

    pairs = [(guess(f), t) for s in test for f, t in zip(s.forms, s.tags)]
    return sum(g == t for g, t in pairs) / len(pairs)
