"""The README's Python examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(block.replace("/tmp/", f"{tmp_path}/"), namespace)
    assert (tmp_path / "mask.keras").exists()
    mask = namespace["mine"].conditioned_layers[0]
    assert mask.target_capacity.numpy() < 0.5  # the schedule reached full sharing
    assert (tmp_path / "mpps_export" / "model.tflite").exists()
    yours = namespace["yours"]  # PCGrad and uncertainty weighting in a user's model
    assert yours.task_names == ("kind", "size")
    assert not np.allclose(yours.weighting.trainable_weights[0].numpy(), 0.0)
