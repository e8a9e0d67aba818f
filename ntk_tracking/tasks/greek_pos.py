"""Part-of-speech tagging of Ancient Greek with a transformer (paper §4, UD Ancient Greek Perseus).

    git clone https://github.com/UniversalDependencies/UD_Ancient_Greek-Perseus
    mlflow run . -e greek_pos --env-manager local -P dataset=UD_Ancient_Greek-Perseus
    ntk-tracking analyze RUN_ID

NTK points are sentences: inputs are their padded feature ids and mask, outputs (positions ×
tags) are masked at padding and all tags summed.
"""

from __future__ import annotations

import dataclasses
import math

from ntk_tracking.models import transformer
from ntk_tracking.keys import TEST_ACCURACY, TRAIN_LOSS, split_key
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option

TAGSETS = ("upos", "xpos")  # = ntk_tracking.data.ud_pos.TAGSETS, without importing data for --help


@dataclasses.dataclass(frozen=True)
class GreekPosConfig(TaskConfig):
    """A transformer tagger on a UD treebank; defaults aim at ≥ 90 % UPOS on the Perseus test split."""

    tagset: str = option("upos", f"target column, one of {list(TAGSETS)}")
    max_length: int = option(64, "tokens per padded sequence; longer sentences are cut into pieces")
    min_count: int = option(2, "feature strings seen fewer times in train map to unknown")
    # Model.
    model_dim: int = option(128, "embedding and residual width")
    num_heads: int = option(4, "attention heads (must divide model_dim)")
    num_layers: int = option(2, "transformer blocks")
    mlp_dim: int = option(256, "hidden width of each block's MLP")
    dropout_rate: float = option(0.3, "dropout on embeddings and residual branches")
    attention_dropout_rate: float = option(0.1, "dropout on attention weights")
    word_dropout: float = option(0.3, "training: chance that a token's word and folded-form ids become unknown")
    # Optimizer.
    learning_rate: float = option(1e-3, "AdamW peak learning rate (linear warmup, cosine decay to a hundredth of it)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warmup")
    batch_size: int = option(32, "sentences per training step")
    # NTK probe.
    probe_max_tokens: int = option(16, "NTK probe points: sentence pieces of at most this many tokens, padded to it")

    def checks(self):
        finite = math.isfinite
        return [
            (self.tagset in TAGSETS, f"unknown tagset {self.tagset!r}; choose one of {list(TAGSETS)}"),
            (self.max_length >= 1, f"max_length must be ≥ 1 token, got {self.max_length}"),
            (self.min_count >= 1, f"min_count must be ≥ 1, got {self.min_count}"),
            (self.model_dim > 0 and self.num_heads > 0 and self.model_dim % self.num_heads == 0,
             f"model_dim ({self.model_dim}) must be a positive multiple of num_heads ({self.num_heads})"),
            (self.num_layers >= 0, f"num_layers must be ≥ 0, got {self.num_layers}"),
            (self.mlp_dim > 0, f"mlp_dim must be positive, got {self.mlp_dim}"),
            (0 <= self.dropout_rate < 1 and 0 <= self.attention_dropout_rate < 1 and 0 <= self.word_dropout < 1,
             "dropout rates must lie in [0, 1)"),
            (self.learning_rate > 0 and finite(self.learning_rate),
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (1 <= self.probe_max_tokens <= self.max_length,
             f"probe_max_tokens must lie in 1..max_length ({self.max_length}), got {self.probe_max_tokens}"),
        ] + super().checks()


def probe_points(split, max_tokens: int) -> ProbeSet:
    """The split's pieces with at most `max_tokens` tokens, cropped to that length, mask as output mask."""
    keep = split.mask.sum(axis=1) <= max_tokens
    if not keep.any():
        raise ValueError(f"no sentence has at most {max_tokens} tokens; raise probe_max_tokens")
    features, mask = split.features[keep, :max_tokens], split.mask[keep, :max_tokens]
    return ProbeSet({"features": features, "mask": mask}, output_mask=mask)


class GreekPosTask(Task):
    """A transformer encoder tagger on a Universal Dependencies treebank."""

    name = "greek_pos"
    config_class = GreekPosConfig
    defaults = dict(dataset="UD_Ancient_Greek-Perseus", epochs=20)
    summary = "a transformer part-of-speech tagger on UD Ancient Greek Perseus (paper §4)"
    architecture = transformer
    # A CoNLL-U treebank of a few short sentences (no treebank ships offline).
    learning_check = LearningCheck(
        dict(model_dim=8, num_heads=2, num_layers=1, mlp_dim=8, max_length=8, probe_max_tokens=8, batch_size=4,
             min_count=1, dropout_rate=0.1, attention_dropout_rate=0.0, word_dropout=0.2, epochs=6,
             learning_rate=0.03, warmup_epochs=0.5, cv_every=6),
        falls={TRAIN_LOSS: 1 / 3}, rises={split_key("train", "accuracy"): 0.4},
        above={split_key("train", "accuracy"): 0.9, TEST_ACCURACY: 0.9}, dataset_fixture="treebank")

    def run_name(self, config) -> str:
        return f"{config.task}-{config.tagset}-d{config.model_dim}-l{config.num_layers}"

    def load_data(self, config):
        from ntk_tracking.data.ud_pos import load_ud_pos, most_frequent_tag_baseline

        data = load_ud_pos(config.dataset, config.tagset, config.max_length, config.min_count,
                           config.train_size, config.test_size, config.seed)
        for split in data.splits:
            if split != "train":  # the reference every run should beat clearly
                data.info[f"baseline_{split}_accuracy"] = most_frequent_tag_baseline(
                    data.sentences["train"], data.sentences[split])
        return data

    def model_data_info(self, data):
        return {"vocab_size": data.vocab.size, "num_tags": data.num_tags}

    def init_state(self, config, data, model):
        from ntk_tracking.train.tagging import create_train_state

        return create_train_state(model, config, data)

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.tagging import fit

        return fit(config, data, state, start_epoch, on_epoch, progress=progress)

    def steps_per_epoch(self, config, data):
        from ntk_tracking.train.tagging import steps_per_epoch

        return steps_per_epoch(config, len(data.splits["train"]))

    def cv_variables(self, state):
        return {"params": state.params}

    def probe(self, config, data, model, context=None) -> Probe:
        from ntk_tracking.models import ntk_apply_fn

        # The multi-hot embedding is the same function as the lookup, seen by the structured rule.
        sets = {name: probe_points(split, config.probe_max_tokens) for name, split in data.splits.items()}
        return Probe(networks={"model": ntk_apply_fn(transformer.with_one_hot_embedding(model))}, sets=sets)


TASKS = {"greek_pos": GreekPosTask()}
