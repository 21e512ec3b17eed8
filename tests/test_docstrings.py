"""The examples of the docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import keras
import numpy
import tensorflow as tf

import tf_mtl

MODULES = sorted(m.name for m in pkgutil.walk_packages(tf_mtl.__path__, "tf_mtl."))


def test_docstring_examples():
    attempted, failed = 0, []
    for name in MODULES:
        result = doctest.testmod(importlib.import_module(name),
                                 extraglobs={"numpy": numpy, "tf": tf, "keras": keras,
                                             "tf_mtl": tf_mtl},
                                 optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        attempted += result.attempted
        if result.failed:
            failed.append(name)
    assert not failed, f"failing examples (printed above) in {failed}"
    assert attempted > 50
