"""Failed-attempt logs go next to the checkpoints: a file:// path or one signed S3 PUT."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from finetune_operator.logstore import LogStoreError, S3Credentials, log_uri, save_log

from operator_jobs import job


@pytest.fixture
def moto_s3(s3_server):
    """The session's moto S3 server (tests/conftest.py)."""
    return s3_server.endpoint


def save(j, log, creds):
    async def main():
        async with aiohttp.ClientSession() as session:
            return await save_log(session, j, "llama-0f1e2d3c-a1", log, creds)
    return asyncio.run(main())


def test_file_uri_writes_the_log_under_the_run(tmp_path):
    j = job(**{"spec.checkpoint.uri": f"file://{tmp_path}/ckpt", "spec.s3": None})
    uri = save(j, "line 1\nline 2\n", None)
    assert uri == f"file://{tmp_path}/ckpt/llama/logs/llama-0f1e2d3c-a1.log"
    assert (tmp_path / "ckpt/llama/logs/llama-0f1e2d3c-a1.log").read_text() == "line 1\nline 2\n"


def test_s3_put_is_signed_and_lands_next_to_the_checkpoints(moto_s3):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="eu-west-1",
                      aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")
    s3.create_bucket(Bucket="oplogs", CreateBucketConfiguration={
        "LocationConstraint": "eu-west-1"})
    j = job(**{"spec.s3.endpoint": moto_s3, "spec.checkpoint.uri": "s3://oplogs/runs"})
    uri = save(j, "ünïcode log\n", S3Credentials("AKIDTEST", "secret"))
    assert uri == log_uri(j, "llama-0f1e2d3c-a1") == \
        "s3://oplogs/runs/llama/logs/llama-0f1e2d3c-a1.log"
    body = s3.get_object(Bucket="oplogs", Key="runs/llama/logs/llama-0f1e2d3c-a1.log")["Body"]
    assert body.read().decode() == "ünïcode log\n"


def test_signature_is_checked_by_s3(moto_s3):
    """With moto's IAM check on, the right keys are accepted and a wrong secret is refused:
    the SigV4 signature is really computed, not just sent."""
    import boto3
    from moto.core.authorization import enable_iam_authentication

    kw = dict(endpoint_url=moto_s3, region_name="us-east-1",
              aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="operator")
    iam.put_user_policy(UserName="operator", PolicyName="s3", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", '
        '"Resource": "*"}]}'))
    key = iam.create_access_key(UserName="operator")["AccessKey"]
    boto3.client("s3", **kw).create_bucket(Bucket="signed")
    j = job(**{"spec.s3.endpoint": moto_s3, "spec.s3.region": "us-east-1",
               "spec.checkpoint.uri": "s3://signed/runs"})
    with enable_iam_authentication():
        good = S3Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        assert save(j, "ok\n", good) == "s3://signed/runs/llama/logs/llama-0f1e2d3c-a1.log"
        with pytest.raises(LogStoreError, match="HTTP 403"):
            save(j, "nope\n", S3Credentials(key["AccessKeyId"], "wrong-secret"))


def test_s3_without_credentials_is_refused_not_attempted():
    with pytest.raises(LogStoreError, match="no S3 credentials"):
        save(job(), "x", None)


def test_credentials_never_print():
    assert "secret" not in repr(S3Credentials("AKID", "secret", "tok"))
