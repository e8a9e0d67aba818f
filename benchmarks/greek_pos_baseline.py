"""greek_pos against the most-frequent-tag baseline (suffix fallback) on the same split.

    python benchmarks/greek_pos_baseline.py PATH/grc_perseus-ud-dev.conllu --set batch_size=8 epochs=30

PATH is a UD treebank folder or a .conllu file (a lone dev file is split into train and test).
Trains the task's default configuration (with --set overrides) without MLflow and prints token
accuracy on every evaluated split for the model and the baseline, on seen and unseen forms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_by_seen(train, sentences, seen: bool):
    """Only the tokens whose form does (or does not) occur in `train`."""
    from ntk_tracking.data.ud_pos import Sentence

    known = {f for s in train for f in s.forms}
    out = []
    for s in sentences:
        pairs = [(f, t) for f, t in zip(s.forms, s.tags) if (f in known) == seen]
        if pairs:
            out.append(Sentence(*map(tuple, zip(*pairs))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="UD treebank folder or .conllu file")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    args = p.parse_args(argv)

    import numpy as np

    from benchmarks.greek_pos_speed import parse_overrides
    from ntk_tracking.data.ud_pos import most_frequent_tag_baseline
    from ntk_tracking.tasks import get_task

    task = get_task("greek_pos")
    config = task.config(dataset=args.dataset, **parse_overrides(task, args.set)).validate()
    data = task.load_data(config)
    print(f"data: {data.info['splits_note']}; train tokens {data.info['train_tokens']}")
    t0 = time.perf_counter()
    model = task.build_model(config, data)
    state = task.fit(config, data, model, task.init_state(config, data, model), 0, lambda *a: None, progress=False)
    print(f"trained {config.epochs} epochs in {time.perf_counter() - t0:.0f} s")
    train = data.sentences["train"]
    print(f"{'split':6} {'tokens':>7} {'model':>7} {'baseline':>9} {'model seen/unseen':>18} {'baseline seen/unseen':>21}")
    for name, split in data.splits.items():
        if name == "train":
            continue
        pred = np.asarray(state.apply_fn({"params": state.params}, split.inputs).argmax(-1))
        ok = (pred == split.tags)[split.mask]  # tokens in sentence order, as the sentences list them
        known = {f for s in train for f in s.forms}
        seen = np.array([f in known for s in data.sentences[name] for f in s.forms])
        base = [most_frequent_tag_baseline(train, split_by_seen(train, data.sentences[name], k)) for k in (True, False)]
        print(f"{name:6} {ok.size:7d} {ok.mean():7.4f} {most_frequent_tag_baseline(train, data.sentences[name]):9.4f} "
              f"{ok[seen].mean():8.4f}/{ok[~seen].mean():.4f} {base[0]:11.4f}/{base[1]:.4f}")


if __name__ == "__main__":
    main()
