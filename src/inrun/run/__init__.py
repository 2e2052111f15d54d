"""A run from a config: what ``inrun train`` and ``inrun demo`` run.

=================  =========================================================================
``config``         ``RunConfig``: the TOML config, its sections as frozen dataclasses, validated
``hf_config``      ``model.hf_config`` checked against transformers' own config fields
``runner``         the training loop of a run: data order, schedule, non-finite steps, rewind
``models``         the models a config can build (a Hugging Face causal LM, an MLP, a CNN),
                   their optimizer, schedule and loss
``data/``          the data a config can name: the standard library, scikit-learn, your files
=================  =========================================================================

The runner writes through the one writer of :mod:`inrun.store`, like every other loop.
"""
