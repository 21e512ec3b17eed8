"""`train.py --strategy=multi_worker`: two worker processes on localhost
train like one process on two devices (`--strategy=mirrored`, which also
exports there), and a job killed in an epoch resumes from its last
checkpoint to the same result."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import tf_mtl  # noqa: F401 (registers the saved classes)
from test_resume import ENV, ROOT, _epochs_saved
from test_train import assert_export

RUN = ["--method=mpps", "--dataset=synthetic", "--width=0.25", "--epochs=2",
       "--batch_size=8", "--mpps_frozen_start=0", "--mpps_frozen_end=0", "--verbose=0"]
# One process, two logical CPUs: a MirroredStrategy of two replicas.
MIRRORED = ("import tensorflow as tf; cpu = tf.config.list_physical_devices('CPU')[0]; "
            "tf.config.set_logical_device_configuration("
            "cpu, [tf.config.LogicalDeviceConfiguration()] * 2); "
            "import train; from absl import app; app.run(train.main)")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _workers(output_dir):
    """Starts the two workers of a job (worker 0 is the chief)."""
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    return [subprocess.Popen(
        [sys.executable, "train.py", f"--output_dir={output_dir}",
         "--strategy=multi_worker", "--noexport", *RUN],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**ENV, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(2)]


def _finish(workers):
    """Waits for the workers; returns the chief's output."""
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs[0]


def _weights(path):
    return [w.numpy() for w in keras.saving.load_model(path).weights]


@pytest.mark.slow
def test_two_workers_train_as_one_mirrored_process_and_resume_after_a_kill(tmp_path):
    reference, job = tmp_path / "mirrored", tmp_path / "job"
    mirrored = subprocess.run([sys.executable, "-c", MIRRORED, f"--output_dir={reference}",
                               "--strategy=mirrored", "--export", *RUN], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    assert "mirrored strategy: 2 replicas" in mirrored.stdout
    assert_export(reference / "export")

    workers = _workers(job)
    deadline = time.time() + 300
    while _epochs_saved(job) < 1:
        assert all(w.poll() is None for w in workers) and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # into the second epoch (32 steps)
    workers[1].send_signal(signal.SIGKILL)  # a worker dies; the job is restarted
    workers[0].send_signal(signal.SIGKILL)
    for worker in workers:
        worker.communicate()
    assert not (job / "results.json").exists()  # killed in training
    assert "Resuming at epoch 2" in _finish(_workers(job))

    chief, other = _weights(job / "model.keras"), _weights(job / "workers" / "worker_1"
                                                           / "model.keras")
    expected = _weights(reference / "model.keras")
    for a, b, c in zip(chief, other, expected, strict=True):
        np.testing.assert_array_equal(a, b)  # the workers' replicas agree ...
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)  # ... and are one process's
    read = lambda d, name: json.loads((d / name).read_text())
    assert len(read(job, "history.json")["history"]["loss"]) == 2
    for key, value in read(reference, "results.json").items():
        names = isinstance(value, str) or key == "task_metrics"  # not measurements
        expected = value if names else pytest.approx(value, rel=1e-5)
        assert read(job, "results.json")[key] == expected, key
