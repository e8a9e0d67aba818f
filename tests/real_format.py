"""Small datasets written in the real formats the loaders read, for tests in any folder: the CIFAR-10
releases (hub parquet, the binary batches) and a Universal Dependencies treebank (CoNLL-U)."""

from __future__ import annotations

import unicodedata

import numpy as np

from ntk_tracking.data import cifar10

# -- CIFAR-10 -------------------------------------------------------------------------------------


def random_split(n, seed, side=32, channels=3, classes=10):
    """Labels that a network can learn: the class sets the mean brightness of the image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = (labels * (250 // classes))[:, None, None, None]
    images = np.clip(base + rng.integers(0, 30, (n, side, side, channels)), 0, 255).astype(np.uint8)
    return images, labels


def hf_dict(splits, column="img"):
    import datasets
    from PIL import Image

    features = datasets.Features({column: datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(cifar10.CLASSES))})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {column: [Image.fromarray(im.squeeze()) for im in images], "label": labels.tolist()}, features=features)
        for name, (images, labels) in splits.items()})


def write_parquet(folder, splits):
    """The hub repository's layout: plain_text/{train,test}-00000-of-00001.parquet, PNG bytes."""
    (folder / "plain_text").mkdir(parents=True)
    for name, ds in hf_dict(splits).items():
        ds.to_parquet(str(folder / "plain_text" / f"{name}-00000-of-00001.parquet"))
    return folder


def write_binary(folder, splits):
    """cifar-10-batches-bin: 1 label byte + 3072 channel-major pixel bytes per record."""
    folder = folder / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def records(images, labels):
        return np.concatenate([labels[:, None].astype(np.uint8),
                               images.transpose(0, 3, 1, 2).reshape(len(labels), -1)], axis=1).tobytes()

    images, labels = splits["train"]
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        (folder / f"data_batch_{i + 1}.bin").write_bytes(records(images[part], labels[part]))
    (folder / "test_batch.bin").write_bytes(records(*splits["test"]))
    return folder.parent


# -- a UD treebank (CoNLL-U) ----------------------------------------------------------------------

NFD_ANTHROPOS = unicodedata.normalize("NFD", "ἄνθρωπος")
WORDS = {  # form -> (UPOS, XPOS)
    "ὁ": ("DET", "l-s---mn-"), "ἄνθρωπος": ("NOUN", "n-s---mn-"), "λόγος": ("NOUN", "n-s---mn-"),
    "λέγει": ("VERB", "v3spia---"), "γράφει": ("VERB", "v3spia---"), "καλῶς": ("ADV", "d--------"),
    "καὶ": ("CCONJ", "c--------"), "οὐ": ("ADV", "d--------"), ".": ("PUNCT", "u--------"),
}


def token_line(i, form, upos="_", xpos="_"):
    return f"{i}\t{form}\t_\t{upos}\t{xpos}\t_\t0\troot\t_\t_"


def sentence_text(forms, sent_id) -> str:
    lines = [f"# sent_id = {sent_id}"] + [token_line(i, f, *WORDS[unicodedata.normalize("NFC", f)])
                                          for i, f in enumerate(forms, 1)]
    return "\n".join(lines) + "\n\n"


def special_sentence() -> str:
    """A multiword range (3-4), an empty node (5.1) and a decomposed form."""
    return "\n".join([
        "# sent_id = special", "# text = ὁ ἄνθρωπος ...",
        token_line(1, "ὁ", *WORDS["ὁ"]), token_line(2, NFD_ANTHROPOS, *WORDS["ἄνθρωπος"]),
        "3-4\tκοὐ\t_\t_\t_\t_\t_\t_\t_\t_",
        token_line(3, "καὶ", *WORDS["καὶ"]), token_line(4, "οὐ", *WORDS["οὐ"]),
        token_line(5, "λέγει", *WORDS["λέγει"]),
        "5.1\tλέγει\tλέγω\tVERB\t_\t_\t_\t_\t2:conj\t_",
        token_line(6, ".", *WORDS["."]),
    ]) + "\n\n"


def corpus(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    text = ""
    for k in range(n):
        noun, verb = rng.choice(["ἄνθρωπος", "λόγος"]), rng.choice(["λέγει", "γράφει"])
        forms = ["ὁ", noun, verb] + (["καλῶς"] if rng.random() < 0.5 else []) + ["."]
        text += sentence_text(forms, f"s{seed}-{k}")
    return text


def write_treebank(folder):
    """A UD folder with train, dev and test files."""
    folder.mkdir()
    (folder / "xx_tiny-ud-train.conllu").write_text(special_sentence() + corpus(15, 0), encoding="utf-8")
    (folder / "xx_tiny-ud-dev.conllu").write_text(corpus(5, 1), encoding="utf-8")
    (folder / "xx_tiny-ud-test.conllu").write_text(corpus(6, 2), encoding="utf-8")
    return folder
