"""Training and validation data for a run, from a :class:`~inrun.run.config.RunConfig`.

Three kinds, all without a download: Python's standard-library sources (:mod:`.stdlib`),
scikit-learn's bundled datasets (:mod:`.sklearn`), and your own files (:mod:`.files`). Each
becomes an :class:`~inrun.run.data.base.ExampleSet` per split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    IGNORE_INDEX,
    DataError,
    ExampleSet,
    cap_per_source,
    is_held_out,
    preview_text,
    spread,
)
from .files import (
    label_classes,
    read_id_list,
    read_records,
    standardize,
    tabular_examples,
    text_examples,
)
from .packing import packed
from .sklearn import load_sklearn_dataset
from .stdlib import DEFAULT_PACKAGES, CodeCorpus, load_stdlib_corpus

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["DataError", "ExampleSet", "load_data"]


def load_data(config: RunConfig) -> tuple[ExampleSet, ExampleSet]:
    """``(train, validation)`` for the config's ``[data]`` and ``[validation]`` sections.

    Raises:
        DataError: unreadable files, bad rows, an empty split, or a subset naming unknown ids.
    """
    d, v = config.data, config.validation
    if d.kind == "stdlib":
        train, val = _stdlib(config)
    elif d.kind == "sklearn":
        train, val = load_sklearn_dataset(d.dataset, v.fraction, v.max_examples, d.max_per_source)
    else:
        train, val = _files(config)
    if d.subset is not None:
        train = _keep_subset(train, d.subset)
    if len(train) == 0:
        raise DataError("the training split is empty")
    if len(val) == 0:
        raise DataError("the validation split is empty: raise validation.fraction or give validation.path")
    if d.pack:
        train = packed(train, d.length)
    rows = len(train.packed) if train.packed is not None else len(train)
    if rows < config.training.batch_size:
        what = f"{rows} packed rows ({len(train)} documents)" if train.packed is not None else f"{len(train)} examples"
        raise DataError(f"the training split has {what}, fewer than training.batch_size ({config.training.batch_size})")
    return train, val


def _stdlib(config: RunConfig) -> tuple[ExampleSet, ExampleSet]:
    d, v = config.data, config.validation
    try:
        corpus_train, corpus_val = load_stdlib_corpus(
            d.packages or DEFAULT_PACKAGES,
            length=d.length,
            val_fraction=v.fraction,
            max_train_per_source=d.max_per_source,
            max_val=v.max_examples,
            documents=bool(d.pack),
        )
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None

    def convert(corpus: CodeCorpus) -> ExampleSet:
        chunks = corpus.chunks
        targets = corpus.tokens.clone()
        for r, n in enumerate(corpus.lengths or ()):
            targets[r, n:] = IGNORE_INDEX  # a document's padding
        return ExampleSet(
            ids=[c.id for c in chunks],
            sources=[c.source for c in chunks],
            inputs=corpus.tokens.clone(),
            targets=targets,
            previews=[preview_text(c.text) for c in chunks],
            locations=[c.location for c in chunks],
            task="lm",
        )

    return convert(corpus_train), convert(corpus_val)


def _files(config: RunConfig) -> tuple[ExampleSet, ExampleSet]:
    d, v = config.data, config.validation
    records = read_records(d.path, d.id_field)
    if v.path is not None:
        train_recs, val_recs = records, read_records(v.path, d.id_field)
    else:
        held = [is_held_out(r.fields[d.id_field], v.fraction) for r in records]
        train_recs = [r for r, h in zip(records, held) if not h]
        val_recs = [r for r, h in zip(records, held) if h]
    src = [r.fields.get(d.source_field) for r in train_recs]
    train_recs = [train_recs[k] for k in cap_per_source(src, d.max_per_source)]
    val_recs = [val_recs[k] for k in spread(len(val_recs), v.max_examples)]
    if d.features is None:
        make = lambda recs: text_examples(recs, d.length, d.id_field, d.text_field, d.source_field)  # noqa: E731
        return make(train_recs), make(val_recs)
    classes = label_classes([*train_recs, *val_recs], d.label_field)
    train = tabular_examples(train_recs, d.features, d.label_field, classes, d.id_field, d.source_field)
    val = tabular_examples(val_recs, d.features, d.label_field, classes, d.id_field, d.source_field)
    standardize(train, val)
    return train, val


def _keep_subset(train: ExampleSet, path: str) -> ExampleSet:
    wanted = read_id_list(path)
    index = {i: r for r, i in enumerate(train.ids)}
    by_text = {str(i): r for r, i in enumerate(train.ids)}
    rows, missing = [], []
    for i in wanted:
        r = index.get(i, by_text.get(str(i)))
        (rows.append(r) if r is not None else missing.append(i))
    if missing:
        raise DataError(
            f"data.subset {path}: {len(missing)} id(s) are not in the training split "
            f"(first: {missing[:3]}); was it written for another dataset?"
        )
    return train.subset(sorted(set(rows)))
