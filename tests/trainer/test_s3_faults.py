"""S3 I/O under transient faults: connection resets from a fault-injecting proxy in front of
moto. Uploads (boto3's TransferManager) and pyarrow reads ride out a short outage; with the
retries set low a long one fails in one picklable line naming the operation and the object.

No Ray workers here; the real runs through the proxy are in test_s3_faults_training.py.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid

import pytest

from finetune_trainer import storage
from finetune_trainer.errors import StorageError


def _tree(root, n_files: int, size: int) -> dict[str, bytes]:
    out = {}
    os.makedirs(root, exist_ok=True)
    for i in range(n_files):
        data = os.urandom(size)
        with open(os.path.join(root, f"part{i}.bin"), "wb") as f:
            f.write(data)
        out[f"part{i}.bin"] = data
    return out


def test_upload_rides_out_two_seconds_of_resets(s3_proxy, s3_server, tmp_path):
    # 8 small files and a multipart one, uploaded concurrently: the outage begins at the first
    # PUT. (With botocore's default retry quota, ~35 retries per client, the concurrent
    # requests spent it within 2 s and then none was retried: storage._retry_quota.)
    _tree(tmp_path / "src", 8, 1000)
    _tree(tmp_path / "src" / "big", 1, storage.UPLOAD_PART_BYTES + 999)
    prefix = f"faults-{uuid.uuid4().hex[:6]}/ckpt"
    dest = storage.resolve(f"s3://{s3_server.bucket}/{prefix}", storage.S3Settings(s3_proxy.endpoint))
    s3_proxy.arm(rb"PUT /", 2.0)
    began = time.monotonic()
    stats = storage.upload_dir(str(tmp_path / "src"), dest)
    assert s3_proxy.triggered_at is not None and s3_proxy.resets >= 1
    assert time.monotonic() - s3_proxy.triggered_at >= 2.0 - 0.1, "the upload ended inside the outage"
    assert stats.files == 9
    for path, rel, _ in storage.local_files(str(tmp_path / "src")):
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{rel}")["Body"].read()
        with open(path, "rb") as f:
            assert body == f.read(), rel
    print(f"upload through a 2 s outage: {time.monotonic() - began:.1f}s, {s3_proxy.resets} connections reset")


def test_long_outage_with_few_attempts_fails_in_one_picklable_line(s3_proxy, s3_server, tmp_path):
    _tree(tmp_path / "src", 2, 1000)
    prefix = f"faults-{uuid.uuid4().hex[:6]}/ckpt"
    dest = storage.resolve(f"s3://{s3_server.bucket}/{prefix}", storage.S3Settings(s3_proxy.endpoint, max_attempts=2))
    s3_proxy.arm(rb"PUT /", 20.0)
    try:
        with pytest.raises(StorageError) as info:
            storage.upload_dir(str(tmp_path / "src"), dest)
        assert s3_proxy.down(), "failed only after the outage: the retries were not low"
    finally:
        s3_proxy.outage(0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"S3 upload of s3://{s3_server.bucket}/{prefix}/part"), message
    assert "after up to 2 attempts" in message and "Connection" in message, message
    # the error crosses a process boundary (a Ray worker to the driver) intact
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is StorageError and str(again) == message


def test_pyarrow_filesystem_keeps_its_retries_through_pickle(s3_proxy, s3_server):
    key = f"faults-{uuid.uuid4().hex[:6]}/data.bin"
    data = os.urandom(5000)
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=data)

    def read(fs):
        with fs.open_input_stream(f"{s3_server.bucket}/{key}") as f:
            return f.read()

    # Ray Train pickles the storage filesystem into its controller and workers
    patient = pickle.loads(pickle.dumps(storage.s3_filesystem(storage.S3Settings(s3_proxy.endpoint))))
    assert isinstance(patient, storage.RetryingS3FileSystem)
    s3_proxy.outage(2.0)
    began = time.monotonic()
    assert read(patient) == data
    assert time.monotonic() - began >= 1.5  # it waited the outage out, it did not miss it
    assert s3_proxy.resets >= 1

    impatient = pickle.loads(pickle.dumps(storage.s3_filesystem(storage.S3Settings(s3_proxy.endpoint, max_attempts=1))))
    s3_proxy.outage(5.0)
    try:
        with pytest.raises(OSError):
            read(impatient)
    finally:
        s3_proxy.outage(0)
